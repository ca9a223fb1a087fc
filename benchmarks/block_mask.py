"""create_block_mask: flexattn (symbolic) vs torch (dense evaluation), one process.

Prints a markdown table: mask, length, flexattn ms (first call, best of 3), torch ms,
tiles, tiles refined densely, peak memory. torch runs up to --torch-max tokens (it
evaluates every (q, kv) pair). Each row runs in a fresh process, so the first call
is cold and the peak RSS (ru_maxrss, which includes importing torch) is the row's own.
Usage: python benchmarks/block_mask.py [--lengths 8192 32768 131072 1048576] [--torch-max 32768]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch.nn.attention import flex_attention as torch_flex

import flexattn


def masks(n: int):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, 4096, (n // 64 + 1,), generator=g)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:n]
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    side = int(n ** 0.5)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= 1024)

    def documents(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    def documents_searchsorted(b, h, q_idx, kv_idx):
        """The documents mask written with the starts (a binary search, or counting for few documents)."""
        same = torch.searchsorted(starts, q_idx, right=True) == torch.searchsorted(starts, kv_idx, right=True)
        return same & (q_idx >= kv_idx)

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < n // 4) | (q_idx >= kv_idx)

    def natten(b, h, q_idx, kv_idx):
        return (torch.abs(q_idx // side - kv_idx // side) <= 3) & (torch.abs(q_idx % side - kv_idx % side) <= 3)

    return [causal, sliding_window, documents, documents_searchsorted, prefix_lm, natten]


def best_of(fn, repeats: int) -> float:
    times, result = [], None
    for _ in range(repeats):
        del result  # so that two results never live at once
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, result


def one_row(name: str, n: int, with_torch: bool) -> dict:
    mask_mod = next(m for m in masks(n) if m.__name__ == name)
    first_ms, bm = best_of(lambda: flexattn.create_block_mask(mask_mod, None, None, n, n), 1)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # of the first call (and import)
    del bm
    ours_ms, bm = best_of(lambda: flexattn.create_block_mask(mask_mod, None, None, n, n), 3)
    row = {"first_ms": first_ms, "best_ms": ours_ms, "tiles": bm.stats["tiles"], "refined": bm.stats["refined"],
           "peak_gb": peak_gb, "torch_ms": None}
    if with_torch:
        ms, theirs = best_of(lambda: torch_flex.create_block_mask(mask_mod, None, None, n, n, device="cpu"), 1)
        assert torch.equal(theirs.kv_num_blocks, bm.kv_num_blocks), name
        assert torch.equal(theirs.full_kv_num_blocks, bm.full_kv_num_blocks), name
        row["torch_ms"] = ms
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 1048576])
    parser.add_argument("--torch-max", type=int, default=32768)
    parser.add_argument("--row", nargs=2, metavar=("MASK", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        n = int(args.row[1])
        print(json.dumps(one_row(args.row[0], n, n <= args.torch_max)))
        return
    print("| mask | length | flexattn first call ms | flexattn best of 3 ms | torch ms | tiles | refined densely "
          "| peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.lengths:
        for mask_mod in masks(n):
            out = subprocess.run([sys.executable, __file__, "--row", mask_mod.__name__, str(n),
                                  "--torch-max", str(args.torch_max)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            torch_ms = "-" if row["torch_ms"] is None else f"{row['torch_ms']:.0f}"
            print(f"| {mask_mod.__name__} | {n} | {row['first_ms']:.1f} | {row['best_ms']:.1f} | {torch_ms} | "
                  f"{row['tiles']} | {row['refined']} | {row['peak_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
