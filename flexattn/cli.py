"""The ``flexattn`` command.

``flexattn demo``: trace a mod, build its block mask, run attention, print what happened.
``flexattn inspect FILE.py:NAME``: show what the compiler does with a mod: its IR, what it
depends on, its symbolic form, the tile classification, the block mask and the kernel source;
with ``--plan``, which path of the back end a call with that mod takes, and why the earlier
paths were skipped (``flexattn.explain_call``).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect as pyinspect
import sys
import time
import traceback
from pathlib import Path

import torch

import flexattn
from flexattn import passes
from flexattn.analysis.symbolic import to_sympy


class CommandError(Exception):
    """A user mistake the command reports in one line (exit code 2)."""


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _alibi(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - q_idx) * 0.0625 * (h + 1)


def demo(size: int) -> None:
    """Trace a mod, build its block mask, run attention, print what happened."""
    start = time.perf_counter()
    traced = flexattn.trace_score_mod(_alibi)
    trace_ms = (time.perf_counter() - start) * 1e3
    print("score_mod IR:\n" + str(traced.graph) + "\n")
    print("mask_mod IR:\n" + str(flexattn.trace_mask_mod(_causal).graph) + "\n")
    start = time.perf_counter()
    block_mask = flexattn.create_block_mask(_causal, None, None, size, size)
    mask_ms = (time.perf_counter() - start) * 1e3
    print(f"{block_mask!r}\n{block_mask.tile_string()}\n{block_mask.explain()}\n")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, size, 64, generator=g) for _ in range(3))
    start = time.perf_counter()
    out = flexattn.flex_attention(q, k, v, score_mod=_alibi, block_mask=block_mask)
    attn_ms = (time.perf_counter() - start) * 1e3
    ref = flexattn.flex_attention(q, k, v, score_mod=_alibi, block_mask=block_mask, backend="reference")
    print(f"trace {trace_ms:.1f} ms | block mask {mask_ms:.1f} ms | attention (first call) {attn_ms:.1f} ms")
    print(f"sparsity {block_mask.sparsity():.1f}% | max |out - reference| = {(out - ref).abs().max().item():.2e}")


def _load_mod(spec: str):
    """``FILE.py:NAME`` -> the mod (calling NAME if it is a zero-argument factory)."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise CommandError(f"expected FILE.py:NAME, got {spec!r}")
    if not Path(path).is_file():
        raise CommandError(f"no such file: {path}")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise CommandError(f"{path} has no name {name!r}")
    mod = getattr(module, name)
    if not callable(mod):
        raise CommandError(f"{name} in {path} is not callable")
    arity = len(pyinspect.signature(mod).parameters)
    if arity == 0:
        mod = mod()
        arity = len(pyinspect.signature(mod).parameters)
    if arity not in (4, 5):
        raise CommandError(f"{name} takes {arity} arguments: a mask_mod takes 4 (b, h, q_idx, kv_idx), "
                           "a score_mod 5 (score, b, h, q_idx, kv_idx)")
    return mod, arity


def inspect_mod(args) -> None:
    mod, arity = _load_mod(args.target)
    traced = flexattn.trace(mod)
    kind = traced.graph.kind
    print(f"== IR ({kind})\n{traced.graph}\n")
    print(f"== depends on: {', '.join(sorted(passes.depends_on(traced.graph))) or 'nothing'}\n")
    print(f"== symbolic form\n{to_sympy(traced.graph)}\n")
    if kind == "mask_mod":
        block_mask = flexattn.create_block_mask(mod, args.batch, args.heads, args.q_len, args.kv_len,
                                                BLOCK_SIZE=args.block_size)
        print(f"== tiles\n{block_mask.explain()}\n\n== block mask\n{block_mask.tile_string()}\n")
        if args.png:
            block_mask.plot(args.png)
            print(f"wrote {args.png}\n")
    if args.plan:
        _print_plan(mod, kind, block_mask if kind == "mask_mod" else None, args)
        return
    kernel = flexattn.compile(mod if kind == "score_mod" else None, mod if kind == "mask_mod" else None,
                              backend=args.source)
    print(f"== generated {args.source} source\n{kernel.source}")


def _print_plan(mod, kind: str, block_mask, args) -> None:
    """The path a call with ``mod`` takes on random (batch, heads, length, head dim) inputs."""
    B, H = args.batch or 1, args.heads or 1
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, args.q_len, args.head_dim, generator=g)
    k, v = (torch.randn(B, H, args.kv_len, args.head_dim, generator=g) for _ in range(2))
    options = {"BLOCK_SIZE": args.block_size} if block_mask is None else {}
    choice = flexattn.explain_call(q, k, v, score_mod=mod if kind == "score_mod" else None, block_mask=block_mask,
                                   kernel_options=options, backend=args.source, print_it=False)
    print(f"== plan for query ({B}, {H}, {args.q_len}, {args.head_dim}), key/value length {args.kv_len}\n{choice}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flexattn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo_parser = sub.add_parser("demo", help="trace a mod, build its block mask, run attention")
    demo_parser.add_argument("--size", type=int, default=1024)
    insp = sub.add_parser("inspect", help="show the IR, tiles, block mask and kernel source of a mod")
    insp.add_argument("target", help="FILE.py:NAME (a mod, or a zero-argument factory returning one)")
    insp.add_argument("--q-len", type=int, default=1024)
    insp.add_argument("--kv-len", type=int, default=1024)
    insp.add_argument("--block-size", type=int, default=128)
    insp.add_argument("--batch", type=int, default=None)
    insp.add_argument("--heads", type=int, default=None)
    insp.add_argument("--png", help="write a picture of the block mask here")
    insp.add_argument("--source", choices=["torch", "triton"], default="torch")
    insp.add_argument("--plan", action="store_true",
                      help="instead of the kernel source, show which path a call with this mod takes and why")
    insp.add_argument("--head-dim", type=int, default=64, help="head dim of the --plan call's inputs")
    insp.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            demo(args.size)
        else:
            inspect_mod(args)
    except (CommandError, flexattn.FlexAttnError, OSError, SyntaxError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"flexattn: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
