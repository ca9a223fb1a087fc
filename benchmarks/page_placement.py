"""Page placement under serving churn: how long the runs of consecutive pages are that live
sequences own, flexattn's PagedKVCache against torch's PagedAttention.

CPU decode reads a sequence's keys and values page by page; runs of consecutive
pages read like one contiguous cache, pages scattered one by one cost 10-20%
more (benchmarks/decode.py, "paged, scattered"). This replays one stream of
requests through both caches' ``reserve`` / ``erase`` (bookkeeping only, no
attention): SLOTS sequences decode side by side, one token per step each; a
request has a random prompt (reserved at once) and a random number of new
tokens; when it finishes (or the pool cannot grow it) it is erased and the
slot takes the next request. Every SAMPLE_EVERY steps it records the live
sequences' pages per run (pages owned / runs of consecutive pages). Pools of
several sizes, from one too small for the load (requests cut short) to one with
room to spare.

Run: ``python benchmarks/page_placement.py``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch.nn.attention.experimental._paged_attention import PagedAttention as TorchPagedAttention

from flexattn.errors import PagedCacheError
from flexattn.paged import PagedKVCache

PAGE_SIZE, SLOTS, SAMPLE_EVERY = 128, 8, 250
PROMPT, NEW_TOKENS = (64, 4096), (64, 4096)  # uniform ranges of a request's lengths


def requests(seed: int):
    """An endless stream of (prompt, total length) pairs."""
    rng = random.Random(seed)
    while True:
        prompt = rng.randint(*PROMPT)
        yield prompt, prompt + rng.randint(*NEW_TOKENS)


def replay(cache, steps: int, seed: int) -> tuple[list[float], int, float]:
    """Replay the stream through ``cache``; returns (pages per run at each sample, requests served,
    seconds spent in reserve / erase)."""
    stream = requests(seed)
    length, target = [0] * SLOTS, [0] * SLOTS
    served, spent, samples = 0, 0.0, []

    def call(fn, *args) -> bool:
        nonlocal spent
        start = time.perf_counter()
        try:
            fn(*(torch.tensor([a]) if isinstance(cache, TorchPagedAttention) else a for a in args))
            return True
        except (AssertionError, PagedCacheError):  # a full pool, torch's and ours
            return False
        finally:
            spent += time.perf_counter() - start

    def admit(slot):
        nonlocal served
        prompt, total = next(stream)
        if call(cache.reserve, slot, prompt):
            length[slot], target[slot], served = prompt, total, served + 1

    for slot in range(SLOTS):
        admit(slot)
    for step in range(1, steps + 1):
        for slot in range(SLOTS):
            done = length[slot] >= target[slot]
            if done or not call(cache.reserve, slot, length[slot] + 1):
                call(cache.erase, slot)
                length[slot] = target[slot] = 0
                admit(slot)
            else:
                length[slot] += 1
        if step % SAMPLE_EVERY == 0:
            samples.append(pages_per_run(cache.page_table))
    return samples, served, spent


def pages_per_run(page_table: torch.Tensor) -> float:
    """Pages owned by all slots over their runs of consecutive physical pages (in physical order, the
    order in which decode reads a slot's tiles)."""
    pages, runs = 0, 0
    for row in page_table.tolist():
        owned = sorted(p for p in row if p >= 0)
        pages += len(owned)
        runs += bool(owned) + sum(1 for a, b in zip(owned, owned[1:]) if b != a + 1)
    return pages / max(runs, 1)


def main(pool_sizes=(200, 300, 450, 800), steps: int = 20000, seed: int = 0) -> None:
    print(f"torch {torch.__version__}; {SLOTS} slots, pages of {PAGE_SIZE}, prompts {PROMPT[0]}-{PROMPT[1]}, "
          f"new tokens {NEW_TOKENS[0]}-{NEW_TOKENS[1]}, {steps} decode steps, a sample every {SAMPLE_EVERY}\n")
    print("| pages in pool | cache | requests served | pages per run: median | min | reserve + erase s |")
    print("|---|---|---|---|---|---|")
    for n_pages in pool_sizes:
        caches = {"flexattn PagedKVCache": PagedKVCache(n_pages, PAGE_SIZE, SLOTS),
                  "torch PagedAttention": TorchPagedAttention(n_pages, PAGE_SIZE, SLOTS, device="cpu")}
        for name, cache in caches.items():
            samples, served, spent = replay(cache, steps, seed)
            print(f"| {n_pages} | {name} | {served} | {statistics.median(samples):.1f} | {min(samples):.1f} "
                  f"| {spent:.2f} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-sizes", type=int, nargs="+", default=[200, 300, 450, 800])
    parser.add_argument("--steps", type=int, default=20000)
    args = parser.parse_args()
    main(tuple(args.pool_sizes), args.steps)
