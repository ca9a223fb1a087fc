"""Decode benchmark (CPU, fp32): one new query token per sequence against a long KV cache.

Shapes: B=8, Hq=32, Hkv=8 (GQA), D=128, Q_LEN=1, KV_LEN 4k/16k/32k. The
sequences of a batch have different lengths (row b holds KV_LEN * (1 - b/16)
tokens), as in a serving batch; two masks:

* ``causal``: causal with an offset, ``kv_idx <= length[b] - 1 + q_idx``;
* ``sliding``: the same, limited to the last WINDOW tokens.

Rows: flexattn (``backend="auto"``, which takes the split-KV decode path,
``codegen/torch_backend/decode/``), ``torch.compile(torch flex_attention)``,
``scaled_dot_product_attention`` with a dense bool mask, and flexattn on a
paged cache holding the same data, twice: "paged" as the pool places the
pages of sequences that grow side by side, page by page in turn (mostly long
runs, see ``flexattn.page_pool``), and "paged, scattered" with every page then
moved to a random place, as long churn in a busy pool may leave them (the
worst case: each page a jump). The implementations take turns call by call, so
a drifting machine slows them alike. Decode is memory-bound, so
next to the time each row reports the K/V bytes the mask needs (fp32, each
needed position's key and value read once) divided by the time, and the
machine's copy bandwidth measured on a large tensor copy (bytes read +
written per second). The "paged / contiguous" column comes from a second
interleaved run of just the flexattn rows, for at least PAIR_SECONDS (many
more calls than the run of all rows where a row is cheap): the median, and in
brackets the quartiles, of the ratio of each paged call's time to the
contiguous call's of the same turn (the machine drifts less within a turn
than between medians taken over the run). Conversion of the logical
BlockMask to pages is timed apart ("convert"): it is per step, not per layer.

Run: ``python benchmarks/decode.py`` (``--kv-lens 4096 --no-compile`` for a quick run).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.attention.flex_attention as torch_flex
import torch.nn.functional as F

import flexattn
from codegen.torch_backend.decode.cpu_kernels import load_kernels
from flexattn.paged import PagedKVCache

B, H_Q, H_KV, HEAD_DIM, WINDOW, PAGE_SIZE = 8, 32, 8, 128, 1024, 128
BLOCK_SIZE = (1, PAGE_SIZE)  # one query row; kv tiles of a page
PAIR_SECONDS = 4.5  # the paged / contiguous ratios: their own run of the flexattn rows, at least this long


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    return interleaved({"fn": fn}, reps)["fn"]


def interleaved(fns: dict, reps: int) -> dict:
    """Median seconds of each function (see ``turns``)."""
    return {name: statistics.median(t) for name, t in turns(fns, reps).items()}


def turns(fns: dict, reps: int) -> dict:
    """Seconds of each function's calls, turn by turn; they take turns, so a drifting machine hits
    all alike, and the order of the turn rotates, so no function always runs right after the same
    other one (a call leaves caches, and idle threads still spinning, to the next)."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict = {name: [] for name in fns}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def turn_ratios(fns: dict, base: str, reps: int) -> dict:
    """Per function but ``base``: the (lower quartile, median, upper quartile) of its call's time
    over ``base``'s in the same turn."""
    times = turns(fns, reps)
    quartiles = {}
    for name in fns:
        if name != base:
            ratios = sorted(t / t_base for t, t_base in zip(times[name], times[base]))
            quartiles[name] = (ratios[len(ratios) // 4], statistics.median(ratios), ratios[3 * len(ratios) // 4])
    return quartiles


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    """GB/s of ``dst.copy_(src)`` on a large fp32 tensor, counting bytes read and written."""
    src = torch.randn(n_bytes // 4)
    dst = torch.empty_like(src)
    return 2 * n_bytes / timed(lambda: dst.copy_(src), 5) / 1e9


def masks(lengths: torch.Tensor, window: int = WINDOW):
    """The mask_mods by name, for the per-row lengths (flexattn and torch trace the same functions)."""
    last = lengths - 1

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= last[b] + q_idx

    def sliding(b, h, q_idx, kv_idx):
        q = last[b] + q_idx
        return (kv_idx <= q) & (q - kv_idx < window)

    return {"causal": causal, "sliding": sliding}


def paged_copy(k: torch.Tensor, v: torch.Tensor, lengths: list[int], page_size: int = PAGE_SIZE):
    """A PagedKVCache (on k's device, caches in k's dtype) holding the same K/V, its pages placed by the
    pool as the sequences grow page by page in turn, in a pool that just fits them."""
    n_pages = sum(-(-n // page_size) for n in lengths)
    cache = PagedKVCache(n_pages, page_size, len(lengths), device=k.device)
    k_cache = k.new_zeros(1, k.shape[1], cache.n_positions, k.shape[3])
    v_cache = v.new_zeros(1, v.shape[1], cache.n_positions, v.shape[3])
    for pages in range(1, max(lengths) // page_size + 2):
        for b, n in enumerate(lengths):
            cache.reserve(b, min(n, pages * page_size))
    for b, n in enumerate(lengths):
        cache.assign(torch.tensor([b], device=k.device), torch.arange(n, device=k.device)[None],
                     k[b:b + 1, :, :n], v[b:b + 1, :, :n], k_cache, v_cache)
    return cache, k_cache, v_cache


def scattered(cache: PagedKVCache, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: list[int]):
    """A copy of a full pool with every page moved to a random place (data and page tables alike)."""
    moved = PagedKVCache(cache.n_pages, cache.page_size, cache.max_batch_size)
    for b, n in enumerate(lengths):
        moved.reserve(b, n)  # the same pages per slot, so the pool's record of free pages (none) holds
    assert moved.free_pages == 0
    place = torch.randperm(cache.n_pages, generator=torch.Generator().manual_seed(0))  # page p goes to place[p]
    owned = cache.page_table >= 0
    moved.page_table[owned] = place[cache.page_table[owned].long()].int()
    moved.physical_to_logical[:, place] = cache.physical_to_logical

    def move(x):
        pages = x.view(1, x.shape[1], cache.n_pages, cache.page_size, -1)
        out = torch.empty_like(pages)
        out[:, :, place] = pages
        return out.view_as(x)

    return moved, move(k_cache), move(v_cache)


def bench_length(kv_len: int, reps: int, compile_torch: bool, bandwidth: float) -> list[tuple]:
    torch.manual_seed(0)
    q = torch.randn(B, H_Q, 1, HEAD_DIM)
    k = torch.randn(B, H_KV, kv_len, HEAD_DIM)
    v = torch.randn(B, H_KV, kv_len, HEAD_DIM)
    lengths = [kv_len - b * kv_len // 16 for b in range(B)]
    pools = {"flexattn paged": paged_copy(k, v, lengths)}
    pools["flexattn paged, scattered"] = scattered(*pools["flexattn paged"], lengths)
    compiled_flex = torch.compile(torch_flex.flex_attention, dynamic=False) if compile_torch else None
    rows = []
    for name, mask_mod in masks(torch.tensor(lengths)).items():
        needed = sum(min(n, WINDOW) if name == "sliding" else n for n in lengths)
        kv_bytes = 2 * needed * H_KV * HEAD_DIM * 4

        def report(impl, seconds, vs_contiguous=""):
            gbps = kv_bytes / seconds / 1e9
            rows.append((name, kv_len, impl, seconds * 1e3, gbps, 100 * gbps / bandwidth, vs_contiguous))

        logical = flexattn.create_block_mask(mask_mod, B, None, 1, kv_len, BLOCK_SIZE=BLOCK_SIZE)
        fns = {"flexattn": lambda: flexattn.flex_attention(q, k, v, block_mask=logical, enable_gqa=True)}
        expected = fns["flexattn"]()
        for impl, (cache, k_cache, v_cache) in pools.items():
            fns[impl] = partial(flexattn.flex_attention, q, *cache.expand_kv(k_cache, v_cache, B),
                                block_mask=cache.convert_logical_block_mask(logical), enable_gqa=True)
            torch.testing.assert_close(fns[impl](), expected, rtol=1e-5, atol=1e-5)
        if compiled_flex is not None:
            theirs = torch_flex.create_block_mask(mask_mod, B, None, 1, kv_len, device="cpu", BLOCK_SIZE=PAGE_SIZE)
            fns["torch.compile(flex_attention)"] = lambda: compiled_flex(q, k, v, block_mask=theirs, enable_gqa=True)
            torch.testing.assert_close(fns["torch.compile(flex_attention)"](), expected, rtol=1e-4, atol=1e-4)
        dense = flexattn.create_mask(mask_mod, B, 1, 1, kv_len)
        fns["scaled_dot_product_attention"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense,
                                                                                     enable_gqa=True)
        torch.testing.assert_close(fns["scaled_dot_product_attention"](), expected, rtol=1e-4, atol=1e-4)
        seconds = interleaved(fns, reps)
        ours = {impl: fns[impl] for impl in ("flexattn", *pools)}
        ratios = turn_ratios(ours, "flexattn", max(reps, round(PAIR_SECONDS / sum(seconds[impl] for impl in ours))))
        for impl, time_s in seconds.items():
            low, median, high = ratios.get(impl, (None,) * 3)
            report(impl, time_s, "" if median is None else f"{median:.3f}x ({low:.2f}-{high:.2f})")
        cache = pools["flexattn paged"][0]
        convert = timed(lambda: cache.convert_logical_block_mask(logical), reps)
        rows.append((name, kv_len, "  convert_logical_block_mask", convert * 1e3, None, None, ""))
    return rows


def main(kv_lens=(4096, 16384, 32768), reps: int = 10, compile_torch: bool = True) -> None:
    torch.set_grad_enabled(False)
    load_kernels()  # else the first calls run on the torch path while the CPU kernels load
    bandwidth = copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={B} Hq={H_Q} Hkv={H_KV} D={HEAD_DIM} "
          f"Q_LEN=1 fp32, window {WINDOW}, page {PAGE_SIZE}, flexattn backend auto = "
          f"{flexattn.dispatch.default_backend('cpu')}")
    print(f"copy bandwidth (read + write): {bandwidth:.1f} GB/s\n")
    print("| mask | KV_LEN | implementation | ms | K/V GB/s | % of copy bw | paged / contiguous |")
    print("|---|---|---|---|---|---|---|")
    for kv_len in kv_lens:
        for name, n, impl, ms, gbps, share, ratio in bench_length(kv_len, reps, compile_torch, bandwidth):
            rate = "" if gbps is None else f"{gbps:.1f}"
            pct = "" if share is None else f"{share:.0f}%"
            print(f"| {name} | {n} | {impl} | {ms:.2f} | {rate} | {pct} | {ratio} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-lens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(flex_attention)")
    args = parser.parse_args()
    main(tuple(args.kv_lens), args.reps, not args.no_compile)
