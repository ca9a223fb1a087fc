"""The variant zoo on CPU: each examples/zoo variant at a realistic size, flexattn against torch.

Rows: the user code of each ``examples/zoo`` file, run unchanged twice: with
flexattn, and with torch (the example module's ``flexattn`` swapped for a
namespace holding ``torch.compile(torch flex_attention)``, torch's
``create_block_mask``, ``BlockMask`` and ``AuxRequest``; torch's compile of each
variant is warmed up once, seconds). The last column is
``scaled_dot_product_attention`` with the variant's dense bool mask (from
torch's ``create_mask``): the dense baseline, without the variant's score_mod.
Forward, fp32; the implementations take turns call by call (median of
``--reps``). "block mask" columns: flexattn's ``create_block_mask`` and
torch's (eager, dense evaluation), first call.

    python benchmarks/zoo.py                # the table (several minutes)
    python benchmarks/zoo.py --only swin    # rows whose name contains "swin"
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as torch_flex

import flexattn

sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "zoo"))
import attention_sinks, bigbird, differential, moa, neighborhood, nsa, packed_prefix_lm  # noqa: E401, E402
import routing, s2_attention, sigmoid, swin, tree_attention  # noqa: E401, E402
from _dense import qkv, randn  # noqa: E402

TORCH = types.SimpleNamespace(flex_attention=torch.compile(torch_flex.flex_attention),
                              create_block_mask=lambda *a, **kw: torch_flex.create_block_mask(*a, device="cpu", **kw),
                              BlockMask=torch_flex.BlockMask, AuxRequest=torch_flex.AuxRequest)


@contextmanager
def using(ns, *modules):
    """Run the examples' user code with ``ns`` (flexattn itself, or TORCH) as their ``flexattn``."""
    saved = [m.flexattn for m in modules]
    for m in modules:
        m.flexattn = ns
    try:
        yield ns
    finally:
        for m, old in zip(modules, saved):
            m.flexattn = old


def inputs(size, heads=8, dim=64, **kw):
    return [x.detach() for x in qkv(1, heads, size, dim, **kw)]


# Each case: (name, build(ns) -> block mask, run(ns, block_mask) -> out, dense mask_mod + (B, H, L, S) for SDPA).
def case_sinks(n=8192):
    attention_sinks.WINDOW = 1020  # StreamingLLM's 4 + 1020 cache (the example's own window is smaller)
    q, k, v = inputs(n)
    sinks = randn(8, seed=3, grad=False)
    build = lambda ns: ns.create_block_mask(attention_sinks.streaming, None, None, n, n)  # noqa: E731

    def run(ns, bm):
        with using(ns, attention_sinks):
            return attention_sinks.attention_with_sinks(q, k, v, sinks, bm)
    return f"attention sinks (4 + window {attention_sinks.WINDOW}), {n // 1024}k", build, run, \
        (attention_sinks.streaming, 1, 1, n, n), (q, k, v)


def case_differential(n=4096):
    D = differential.DIM
    q1, k1, v = inputs(n, differential.HEADS, D, v_dim=2 * D)
    q2, k2, _ = inputs(n, differential.HEADS // differential.GROUP, D, seed=10)
    lambdas = [randn(D, seed=20 + i, scale=0.1, grad=False) for i in range(4)]
    build = lambda ns: ns.create_block_mask(differential.causal, None, None, n, n)  # noqa: E731

    def run(ns, bm):
        with using(ns, differential):
            return differential.diff_attention(q1, k1, q2, k2, v, *lambdas, bm)
    return f"differential (8 + 4 heads), {n // 1024}k", build, run, (differential.causal, 1, 1, n, n), (q1, k1, v)


def case_sigmoid(n=4096):
    q, k, v = inputs(n)
    _, causal, sigmoid_attention = sigmoid.make_sigmoid_attention(n)
    build = lambda ns: ns.create_block_mask(causal, None, None, n, n)  # noqa: E731

    def run(ns, bm):
        with using(ns, sigmoid):
            return sigmoid_attention(q, k, v, bm)
    return f"sigmoid attention, causal, {n // 1024}k", build, run, (causal, 1, 1, n, n), (q, k, v)


def fused(ns, force):
    """flexattn's kernel_options forcing torch's fused CPU kernel (the "auto" choice is slower for some rows)."""
    return {"kernel_options": {"FUSED": True}} if force and ns is flexattn else {}


def case_moa(n=8192, force=False):
    q, k, v = inputs(n)
    mask_mod = moa.make_moa(n)
    build = lambda ns: ns.create_block_mask(mask_mod, None, moa.HEADS, n, n)  # noqa: E731
    run = lambda ns, bm: ns.flex_attention(q, k, v, block_mask=bm, **fused(ns, force))  # noqa: E731
    return f"MoA (spans {int(moa.spans(n).min())}..{int(moa.spans(n).max())}), {n // 1024}k" \
        f"{', FUSED=True' if force else ''}", build, run, (mask_mod, 1, moa.HEADS, n, n), (q, k, v)


def case_neighborhood(dims, size=8192):
    shape, kernel, dilation, stride = neighborhood.grids(size)[dims]
    n = int(torch.tensor(shape).prod())
    q, k, v = inputs(n)
    mask_mod = neighborhood.neighborhood(shape, kernel, dilation, stride)
    build = lambda ns: ns.create_block_mask(mask_mod, None, None, n, n)  # noqa: E731
    run = lambda ns, bm: ns.flex_attention(q, k, v, block_mask=bm)  # noqa: E731
    name = f"{dims} NA {'x'.join(map(str, shape))}, kernel {kernel}, dilation {dilation}, stride {stride}"
    return name, build, run, (mask_mod, 1, 1, n, n), (q, k, v)


def case_swin(shifted, size=56 * 56):
    side = round(size ** 0.5 / swin.M) * swin.M
    height, width = side, side + swin.M
    n = height * width
    q, k, v = inputs(n, swin.HEADS, swin.DIM)
    table = randn(swin.HEADS, 2 * swin.M - 1, 2 * swin.M - 1, seed=5, grad=False)
    window_mask, relative_bias = swin.make_swin(width, swin.region_ids(height, width, swin.M // 2 * shifted), table)
    build = lambda ns: ns.create_block_mask(window_mask, None, None, n, n)  # noqa: E731
    run = lambda ns, bm: ns.flex_attention(q, k, v, score_mod=relative_bias, block_mask=bm)  # noqa: E731
    return f"Swin {'shifted ' if shifted else ''}windows {height}x{width}, M={swin.M}, bias", build, run, \
        (window_mask, 1, 1, n, n), (q, k, v)


def case_nsa(n=8192):
    q, _, _ = inputs(n, nsa.HQ)
    k, v = (x[:, ::nsa.HQ // nsa.HKV].contiguous() for x in inputs(n, nsa.HQ, seed=1)[1:])
    chosen = nsa.select_blocks(nsa.importance(q, k))

    def build(ns):
        with using(ns, nsa):
            return nsa.block_mask_from(chosen, n)

    def selected(b, h, q_idx, kv_idx):
        return chosen[b, h, q_idx // nsa.BLOCK, kv_idx // nsa.BLOCK] & (q_idx >= kv_idx)
    run = lambda ns, bm: ns.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)  # noqa: E731
    return f"NSA selection (top {nsa.TOPK} + {nsa.LOCAL + 1} of {nsa.BLOCK}), GQA 8/2, {n // 1024}k", build, run, \
        (selected, 1, nsa.HQ, n, n), (q, k, v)


def case_s2(n=8192):
    q, k, v = inputs(n)
    mask_mod = s2_attention.make_s2(n, n // 4)
    build = lambda ns: ns.create_block_mask(mask_mod, None, 8, n, n)  # noqa: E731
    run = lambda ns, bm: ns.flex_attention(q, k, v, block_mask=bm)  # noqa: E731
    return f"S2-attention (groups of {n // 4}), {n // 1024}k", build, run, (mask_mod, 1, 8, n, n), (q, k, v)


def case_tree(prefix=16384):
    T = tree_attention.TREE
    q, k, v = inputs(T, kv_len=prefix + T)
    mask_mod = tree_attention.make_tree_mask(prefix, tree_attention.ancestor_table(tree_attention.random_tree(T)))
    build = lambda ns: ns.create_block_mask(mask_mod, None, None, T, prefix + T, BLOCK_SIZE=(T, 128))  # noqa: E731
    run = lambda ns, bm: ns.flex_attention(q, k, v, block_mask=bm)  # noqa: E731
    return f"tree attention, {T} tokens over a {prefix // 1024}k cache", build, run, \
        (mask_mod, 1, 1, T, prefix + T), (q, k, v)


def case_bigbird(n=8192):
    q, k, v = inputs(n)
    mask_mod = bigbird.make_bigbird(bigbird.random_blocks(n))
    build = lambda ns: ns.create_block_mask(mask_mod, None, None, n, n)  # noqa: E731
    run = lambda ns, bm: ns.flex_attention(q, k, v, block_mask=bm)  # noqa: E731
    return f"BigBird (64 global, window {bigbird.WINDOW}, 3 random blocks), {n // 1024}k", build, run, \
        (mask_mod, 1, 1, n, n), (q, k, v)


def case_routing(sort, n=8192):
    q, k, v = inputs(n)
    cluster = routing.clusters_of(k, randn(routing.CLUSTERS, 64, seed=7, grad=False))
    if sort:
        order = torch.argsort(cluster, dim=-1, stable=True)
        mask_mod = routing.make_sorted_routing(torch.gather(cluster, 1, order), order)
        index = order[:, None, :, None].expand(-1, 8, -1, 64)
        q, k, v = (x.gather(2, index) for x in (q, k, v))  # sorted once, outside the timed call
    else:
        mask_mod = routing.make_routing(cluster)
    build = lambda ns: ns.create_block_mask(mask_mod, 1, None, n, n)  # noqa: E731
    run = lambda ns, bm: ns.flex_attention(q, k, v, block_mask=bm)  # noqa: E731
    return f"routing, {routing.CLUSTERS} clusters, {'sorted' if sort else 'token order'}, {n // 1024}k", build, run, \
        (mask_mod, 1, 1, n, n), (q, k, v)


def case_prefix_lm(n=8192, force=False):
    q, k, v = inputs(n)
    lengths, _, prefix_ends = packed_prefix_lm.packed_documents(n)
    mask_mod = packed_prefix_lm.make_prefix_lm(torch.repeat_interleave(torch.arange(len(lengths)), lengths),
                                               prefix_ends)
    build = lambda ns: ns.create_block_mask(mask_mod, None, None, n, n)  # noqa: E731
    run = lambda ns, bm: ns.flex_attention(q, k, v, block_mask=bm, **fused(ns, force))  # noqa: E731
    return f"prefix-LM, {len(lengths)} packed documents, {n // 1024}k{', FUSED=True' if force else ''}", build, run, \
        (mask_mod, 1, 1, n, n), (q, k, v)


CASES = [case_sinks, case_differential, case_sigmoid, case_moa, lambda: case_moa(force=True),
         lambda: case_neighborhood("2-D"), lambda: case_neighborhood("3-D"), lambda: case_swin(False),
         lambda: case_swin(True), case_nsa, case_s2, case_tree, case_bigbird, lambda: case_routing(False),
         lambda: case_routing(True), case_prefix_lm, lambda: case_prefix_lm(force=True)]


def first_call_ms(fn):
    start = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - start) * 1e3


def measure(case, reps):
    name, build, run, (mask_mod, B, H, L, S), (q, k, v) = case
    ours_mask, ours_mask_ms = first_call_ms(lambda: build(flexattn))
    theirs_mask, theirs_mask_ms = first_call_ms(lambda: build(TORCH))
    dense = torch_flex.create_mask(mask_mod, B, H, L, S, device="cpu")
    gqa = q.shape[1] != k.shape[1]
    fns = {"ours": lambda: run(flexattn, ours_mask), "torch": lambda: run(TORCH, theirs_mask),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=gqa)}
    ours = fns["ours"]()
    try:
        theirs, compile_ms = first_call_ms(fns["torch"])  # torch.compile of this variant
        error = f"{((ours - theirs).abs().max() / ours.abs().max()).item():.0e}"
    except Exception as e:  # noqa: BLE001 - torch's CPU flex_attention refuses some calls (e.g. return_lse)
        del fns["torch"]
        compile_ms, error = None, "torch: no lse on CPU" if "return_lse" in str(e) else f"torch: {str(e)[:60]}"
    times = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            times[key].append(first_call_ms(fn)[1])
    ms = {key: statistics.median(t) for key, t in times.items()}
    tiles = ours_mask.tile_classes()
    refined = ours_mask.stats["refined"] if ours_mask.stats else "-"
    torch_cells = (f"{ms['torch']:.1f} | {ms['ours'] / ms['torch']:.2f} | {compile_ms / 1e3:.1f}" if "torch" in ms
                   else "- | - | -")
    print(f"| {name} | {100 * (tiles == 0).float().mean():.1f}% | {refined} | {ours_mask_ms:.0f} | "
          f"{theirs_mask_ms:.0f} | {ms['ours']:.1f} | {torch_cells} | {ms['sdpa']:.1f} | "
          f"{ms['ours'] / ms['sdpa']:.2f} | {error} |", flush=True)

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="only rows whose name contains this")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, forward; "
          f"load average (1, 5, 15 min) at the start: {os.getloadavg()}")
    print("| variant | empty tiles | refined densely | flexattn block mask ms | torch block mask ms | flexattn ms "
          "| torch flex (compiled) ms | flexattn / torch | torch compile s | SDPA, dense mask ms | flexattn / SDPA "
          "| max rel. diff to torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    for make in CASES:
        torch._dynamo.reset()  # a fresh compile per variant: torch's recompile limit would otherwise fall back to eager
        case = make()
        if args.only in case[0]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                measure(case, args.reps)
    print(f"total {time.perf_counter() - start:.0f} s; load average (1, 5, 15 min) at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
