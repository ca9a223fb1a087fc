"""The ``flexattn`` command: ``flexattn demo`` (the README's main job)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

import flexattn


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
    print(f"{block_mask}\n{block_mask.to_string()}\n")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, size, 64, generator=g) for _ in range(3))
    start = time.perf_counter()
    out = flexattn.flex_attention(q, k, v, score_mod=_alibi, block_mask=block_mask)
    attn_ms = (time.perf_counter() - start) * 1e3
    ref = flexattn.flex_attention(q, k, v, score_mod=_alibi, block_mask=block_mask, backend="reference")
    print(f"trace {trace_ms:.1f} ms | block mask {mask_ms:.1f} ms | attention (first call) {attn_ms:.1f} ms")
    print(f"sparsity {block_mask.sparsity():.1f}% | max |out - reference| = {(out - ref).abs().max().item():.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flexattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo_parser = sub.add_parser("demo", help="trace a mod, build its block mask, run attention")
    demo_parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
