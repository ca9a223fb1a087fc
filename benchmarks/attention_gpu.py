"""GPU attention benchmark: flexattn's Triton back end vs torch.compile(flex_attention) vs SDPA.

Prints one table (TFLOP/s counting only unmasked score elements: forward 4*D
flops each, forward+backward 3.5x that), bf16, B=4, H=16, in one process::

    PYTHONPATH=. python benchmarks/attention_gpu.py --seq 1024 4096 16384 --dims 64 128

``--check`` first compares the Triton kernels with the dense reference on CUDA
(fp32 and bf16, forward and backward, and the split-KV decode kernels at one
query token) and prints the relative errors.
"""

from __future__ import annotations

import argparse

import torch
import triton.testing
from torch.nn.attention import flex_attention as torch_flex

from codegen import reference
from flexattn import dispatch
from flexattn.analysis import create_block_mask
from flexattn.trace import trace_mask_mod, trace_score_mod

B, H, WINDOW, N_DOCS = 4, 16, 256, 8


def _run(backend: str, q, k, v, **kw):
    """(out, lse, max_scores) of ``backend`` on traced graphs (``flexattn.dispatch``)."""
    return dispatch.run(backend, dispatch.call_of(q, k, v, **kw))


def triton_attention(q, k, v, **kw):
    return _run("triton", q, k, v, **kw)


def mods(S: int, device):
    """name -> (score_mod or None, mask_mod); buffers are closed over as in user code."""
    slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=device) / H)
    lengths = torch.distributions.Dirichlet(torch.ones(N_DOCS)).sample() * S
    doc_id = _doc_ids(lengths, S, device)

    def causal(b, h, q, kv):
        return q >= kv

    def alibi(score, b, h, q, kv):
        return score + slopes[h] * (kv - q)

    def sliding(b, h, q, kv):
        return (q >= kv) & (q - kv <= WINDOW)

    def documents(b, h, q, kv):
        return (doc_id[q] == doc_id[kv]) & (q >= kv)

    return {"causal": (None, causal), "alibi+causal": (alibi, causal),
            "sliding window": (None, sliding), "packed documents": (None, documents)}


def _doc_ids(lengths, S, device):
    bounds = lengths.cumsum(0).round().long().clamp(max=S)
    return torch.bucketize(torch.arange(S), bounds, right=True).clamp(max=N_DOCS - 1).to(device)


def flexattn_fn(score_mod, mask_mod, block_mask):
    score = trace_score_mod(score_mod) if score_mod else None
    mask = trace_mask_mod(mask_mod)

    def run(q, k, v):
        return triton_attention(q, k, v, score_graph=score.graph if score else None,
                                score_buffers=list(score.buffers) if score else [], mask_graph=mask.graph,
                                mask_buffers=list(mask.buffers), block_mask=block_mask, scale=None,
                                enable_gqa=False, kernel_options={})[0]
    return run


def bench(fn, q, k, v, backward: bool) -> float:
    if not backward:
        return triton.testing.do_bench(lambda: fn(q, k, v))
    out = fn(q, k, v)
    grad = torch.randn_like(out)

    def step():
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
    return triton.testing.do_bench(step)


def check(device="cuda"):
    """Largest relative errors of the Triton kernels against the dense reference."""
    torch.manual_seed(0)
    S = 300
    for dtype in (torch.float32, torch.bfloat16):
        for name, (score_mod, mask_mod) in mods(S, device).items():
            q, k, v = (torch.randn(2, H, S, 96, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            bm = create_block_mask(mask_mod, 1, 1, S, S, device=device, BLOCK_SIZE=128)
            score = trace_score_mod(score_mod) if score_mod else None
            mask = trace_mask_mod(mask_mod)
            kw = dict(score_graph=score.graph if score else None, score_buffers=list(score.buffers) if score else [],
                      mask_graph=mask.graph, mask_buffers=list(mask.buffers), block_mask=bm, scale=None,
                      enable_gqa=False, kernel_options={})
            out = triton_attention(q, k, v, **kw)[0]
            ref = _run("reference", q.float(), k.float(), v.float(), **kw)[0]
            grad = torch.randn_like(out)
            got = torch.autograd.grad(out, (q, k, v), grad)
            want = torch.autograd.grad(ref, (q, k, v), grad.float())
            errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip((out, *got), (ref, *want))]
            print(f"check {str(dtype):15s} {name:17s} rel err out/dq/dk/dv: " + " ".join(f"{e:.1e}" for e in errs))


def check_decode(device="cuda"):
    """The split-KV decode kernels (one query token, GQA 4:1) against the dense reference."""
    torch.manual_seed(0)
    S, Hkv = 1000, H // 4
    last = S - 1
    masks = {"causal, offset": lambda b, h, q, kv: kv <= last + q,
             "sliding, offset": lambda b, h, q, kv: (kv <= last + q) & (last + q - kv < WINDOW)}
    for dtype in (torch.float32, torch.bfloat16):
        for name, mask_mod in masks.items():
            q = torch.randn(B, H, 1, 128, device=device, dtype=dtype)
            k, v = (torch.randn(B, Hkv, S, 128, device=device, dtype=dtype) for _ in range(2))
            bm = create_block_mask(mask_mod, 1, 1, 1, S, device=device, BLOCK_SIZE=(1, 128))
            mask = trace_mask_mod(mask_mod)
            kw = dict(score_graph=None, score_buffers=[], mask_graph=mask.graph, mask_buffers=list(mask.buffers),
                      block_mask=bm, scale=None, enable_gqa=True, kernel_options={})
            out = triton_attention(q, k, v, **kw)[0]
            ref = _run("reference", q.float(), k.float(), v.float(), **kw)[0]
            print(f"check decode {str(dtype):15s} {name:17s} rel err out: "
                  f"{((out.float() - ref).norm() / ref.norm()).item():.1e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        check()
        check_decode()
    compiled_flex = torch.compile(torch_flex.flex_attention, dynamic=False)
    print(f"GPU: {torch.cuda.get_device_name()}, bf16, B={B}, H={H}; TFLOP/s over unmasked work")
    print(f"{'mod':17s} {'D':>4s} {'S':>6s} {'pass':>8s} {'flexattn':>9s} {'torch flex':>11s} {'SDPA':>7s} {'ratio':>6s}")
    for D in args.dims:
        for S in args.seq:
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            for name, (score_mod, mask_mod) in mods(S, "cuda").items():
                bm = create_block_mask(mask_mod, 1, 1, S, S, device="cuda")
                torch_bm = torch_flex.create_block_mask(mask_mod, 1, 1, S, S, device="cuda")
                dense = reference.block_mask_to_dense(bm, trace_mask_mod(mask_mod).graph,
                                                      list(trace_mask_mod(mask_mod).buffers), 1, 1, "cuda")
                unmasked = dense.sum().item() * B * H
                ours = flexattn_fn(score_mod, mask_mod, bm)
                theirs = lambda q, k, v: compiled_flex(q, k, v, score_mod=score_mod, block_mask=torch_bm)  # noqa: E731
                if name == "causal":
                    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
                elif S <= 8192:
                    mask = dense[0, 0]
                    if score_mod is not None:
                        bias = (torch.exp2(-8.0 * torch.arange(1, H + 1, device="cuda") / H)[:, None, None]
                                * (torch.arange(S, device="cuda")[None, :] - torch.arange(S, device="cuda")[:, None]))
                        mask = bias.masked_fill(~mask, float("-inf")).to(torch.bfloat16)
                    sdpa = lambda q, k, v, m=mask: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
                else:
                    sdpa = None  # a dense mask at this length does not fit the comparison's memory budget
                for backward in (False, True):
                    flops = 4 * D * unmasked * (3.5 if backward else 1.0)
                    times = [bench(fn, q, k, v, backward) if fn else float("nan") for fn in (ours, theirs, sdpa)]
                    tflops = [flops / (t * 1e-3) / 1e12 for t in times]
                    print(f"{name:17s} {D:4d} {S:6d} {'fwd+bwd' if backward else 'fwd':>8s} {tflops[0]:9.1f} "
                          f"{tflops[1]:11.1f} {tflops[2]:7.1f} {tflops[0] / tflops[1]:6.2f}", flush=True)


if __name__ == "__main__":
    main()
