"""Block masks of masks that read captured tables: flexattn's create_block_mask against torch's.

The zoo's table-lookup masks (BigBird's random blocks, routing by cluster ids, sorted or not)
and packed documents from per-batch ids, at 8k tokens. Each row builds the mask with
flexattn and with torch's ``create_block_mask`` (dense evaluation on CPU), taking turns;
median of ``--reps`` calls (nothing is cached between calls). Both masks are checked equal first.

    python benchmarks/table_masks.py [--size 8192] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import flex_attention as torch_flex

import flexattn

sys.path.insert(0, str(Path(__file__).parents[1] / "examples" / "zoo"))
import bigbird, routing  # noqa: E401, E402
from _dense import qkv, randn  # noqa: E402


def cases(size):
    _, k, _ = qkv(2, 4, size, 64)
    cluster = routing.clusters_of(k, randn(16, 64, seed=7, grad=False))
    order = torch.argsort(cluster, dim=-1, stable=True)
    lengths = torch.tensor([[size // 2, size // 4, size // 4], [size // 8, size // 2, 3 * size // 8]])
    doc = torch.stack([torch.repeat_interleave(torch.arange(3), row) for row in lengths])
    return {
        "BigBird (64 global, window 192, 3 random 64-blocks)": (bigbird.make_bigbird(bigbird.random_blocks(size)), None),
        "routing, 16 clusters, token order (B=2)": (routing.make_routing(cluster), 2),
        "routing, 16 clusters, sorted (B=2)": (routing.make_sorted_routing(torch.gather(cluster, 1, order), order), 2),
        "documents from per-batch ids doc[b, q] (B=2)": (lambda b, h, q, kv: doc[b, q] == doc[b, kv], 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    builders = {"flexattn": flexattn.create_block_mask,
                "torch": lambda *a: torch_flex.create_block_mask(*a, device="cpu")}
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.size} tokens")
    print("| mask | flexattn ms | torch ms | torch / flexattn | tiles refined at positions |")
    print("|---|---|---|---|---|")
    for name, (mod, B) in cases(args.size).items():
        built = {impl: build(mod, B, None, args.size, args.size) for impl, build in builders.items()}
        if not torch.equal(built["flexattn"].to_dense(), built["torch"].to_dense()):
            raise AssertionError(f"{name}: flexattn's tiles differ from torch's")
        refined = built["flexattn"].stats["refined"]
        times = {impl: [] for impl in builders}
        for _ in range(args.reps):
            for impl, build in builders.items():
                start = time.perf_counter()
                build(mod, B, None, args.size, args.size)
                times[impl].append(time.perf_counter() - start)
        ours, theirs = (statistics.median(times[impl]) * 1000 for impl in builders)
        print(f"| {name} | {ours:.0f} | {theirs:.0f} | {theirs / ours:.1f} | {refined} |", flush=True)


if __name__ == "__main__":
    main()
