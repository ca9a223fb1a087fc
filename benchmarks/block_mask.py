"""create_block_mask: flexattn (symbolic) vs torch (dense evaluation), one process.

Prints a markdown table: mask, length, flexattn ms, torch ms, tiles, tiles refined densely.
torch runs up to --torch-max tokens (it evaluates every (q, kv) pair).
Usage: python benchmarks/block_mask.py [--lengths 8192 32768 131072] [--torch-max 32768]
"""

import argparse
import time

import torch
from torch.nn.attention import flex_attention as torch_flex

import flexattn


def masks(n: int):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, 4096, (n // 64 + 1,), generator=g)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:n]
    side = int(n ** 0.5)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= 1024)

    def documents(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < n // 4) | (q_idx >= kv_idx)

    def natten(b, h, q_idx, kv_idx):
        return (torch.abs(q_idx // side - kv_idx // side) <= 3) & (torch.abs(q_idx % side - kv_idx % side) <= 3)

    return [causal, sliding_window, documents, prefix_lm, natten]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--torch-max", type=int, default=32768)
    args = parser.parse_args()
    print("| mask | length | flexattn ms | torch ms | tiles | refined densely |")
    print("|---|---|---|---|---|---|")
    for n in args.lengths:
        for mask_mod in masks(n):
            ours_ms, bm = best_of(lambda: flexattn.create_block_mask(mask_mod, None, None, n, n), 3)
            torch_ms = "-"
            if n <= args.torch_max:
                ms, theirs = best_of(lambda: torch_flex.create_block_mask(mask_mod, None, None, n, n, device="cpu"), 1)
                assert torch.equal(theirs.kv_num_blocks, bm.kv_num_blocks), mask_mod.__name__
                assert torch.equal(theirs.full_kv_num_blocks, bm.full_kv_num_blocks), mask_mod.__name__
                torch_ms = f"{ms:.0f}"
            print(f"| {mask_mod.__name__} | {n} | {ours_ms:.1f} | {torch_ms} | {bm.stats['tiles']} | "
                  f"{bm.stats['refined']} |", flush=True)


if __name__ == "__main__":
    main()
