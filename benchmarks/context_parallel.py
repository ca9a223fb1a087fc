"""Context parallelism: how evenly the planner spreads attention work, and what 2 gloo processes cost.

``planner``: for causal, sliding-window, packed-document and NATTEN (2-D neighbourhood) masks at
128k-1M positions and 2-64 ranks, the per-rank work (non-empty tiles) max/mean of flexattn's plan
(rule: ``flexattn/distributed/plan.py``) against contiguous and zigzag sharding (and LPT alone),
the K/V positions the busiest rank receives against an all-gather's, and the planning time.

``gloo``: 2 processes on this machine (one torch thread each), 16k (and 32k) positions: the time
of ``context_parallel_attention`` (forward, forward + backward) against single-process
``flex_attention`` on the full sequence (2 torch threads), taking turns in one run, and the bytes
each rank receives against an all-gather of K/V. With ``--backend nccl`` the same script runs on
one GPU per process (``torchrun --nproc-per-node N benchmarks/context_parallel.py gloo --backend nccl``).

Run: ``python benchmarks/context_parallel.py planner`` / ``python benchmarks/context_parallel.py gloo``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexattn
from flexattn.distributed import context_parallel_attention, plan_context_parallel, shard
from flexattn.distributed.plan import STRATEGIES, UnitWork, choose

RANKS = (2, 4, 8, 16, 64)
LENGTHS = (131072, 524288, 1048576)
WINDOW = 8192  # sliding window half-width, positions
NATTEN_WIDTH, NATTEN_RADIUS = 1024, 8  # image rows of 1024 positions; |row|, |col| distance <= 8


def causal(b, h, q, kv):
    return q >= kv


def window(b, h, q, kv):
    return (q - kv).abs() <= WINDOW


def documents(n: int, seed: int = 0):
    """Packed documents, causal within each: lengths exponential with mean n / 16 (at least 512)."""
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.empty(64).exponential_(generator=g) * n / 16).clamp_min(512).long()
    doc = torch.repeat_interleave(torch.arange(64), lengths)[:n]
    doc = torch.cat([doc, torch.full((n - doc.numel(),), 64)])

    def document_mask(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)
    return document_mask


def natten(b, h, q, kv):
    rows, cols = q // NATTEN_WIDTH - kv // NATTEN_WIDTH, q % NATTEN_WIDTH - kv % NATTEN_WIDTH
    return (rows.abs() <= NATTEN_RADIUS) & (cols.abs() <= NATTEN_RADIUS)


def planner(lengths, ranks) -> None:
    print("| mask | positions | ranks | ours: layout | ours max/mean | contiguous | zigzag | LPT | "
          "busiest rank receives (ours / all-gather) | planning, s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in lengths:
        for name, mod in (("causal", causal), ("sliding window", window), ("documents", documents(n)),
                          ("NATTEN", natten)):
            bm = flexattn.create_block_mask(mod, None, None, n, n)
            work = UnitWork.of(bm)
            for r in ranks:
                started = time.perf_counter()
                ours = plan_context_parallel(bm, r)
                seconds = time.perf_counter() - started
                others = {s: choose(work, bm, r, s).balance for s in STRATEGIES}
                busiest = max(ours.received_positions(k) for k in range(r))
                gather = n - min(ours.shard_length(k) for k in range(r))
                print(f"| {name} | {n // 1024}k | {r} | {ours.strategy} | {ours.balance:.3f} | "
                      f"{others['contiguous']:.3f} | {others['zigzag']:.3f} | {others['lpt']:.3f} | "
                      f"{busiest / 1024:.0f}k / {gather / 1024:.0f}k | {seconds:.2f} |", flush=True)


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _gloo_rank(rank: int, world: int, init: str, backend: str, lengths, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")
    B, H, D = 1, 4, 64
    for n in lengths:
        for name, mod in (("causal", causal), ("documents", documents(n))):
            bm = flexattn.create_block_mask(mod, None, None, n, n, device=device)
            plan = plan_context_parallel(bm, world)
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, H, n, D, generator=g).to(device) for _ in range(3))
            local = [shard(t, plan).requires_grad_() for t in (q, k, v)]
            full = [t.clone().requires_grad_() for t in (q, k, v)]

            def cp_forward():
                with torch.no_grad():
                    context_parallel_attention(*local, block_mask=bm, plan=plan)

            def cp_train():
                context_parallel_attention(*local, block_mask=bm, plan=plan).sum().backward()

            def single(train: bool):
                def run():
                    torch.set_num_threads(world)  # the cores both ranks use, given to one process
                    with torch.set_grad_enabled(train):
                        out = flexattn.flex_attention(*full, block_mask=bm)
                        if train:
                            out.sum().backward()
                    torch.set_num_threads(1)
                return run

            row = {}
            for label, ours, theirs in (("forward", cp_forward, single(False)), ("fwd+bwd", cp_train, single(True))):
                ours()  # warm-up: kernels built, plan and local masks cached
                times = {"cp": [], "single": []}
                for _ in range(repeats):  # taking turns: rank 0 alone (the others wait), then all ranks
                    if rank == 0:
                        times["single"].append(_timed(theirs, 1))
                    dist.barrier()
                    times["cp"].append(_timed(ours, 1))
                    dist.barrier()
                row[label] = (statistics.median(times["cp"]), statistics.median(times["single"]) if rank == 0 else 0)
            per_position = B * H * 2 * D * q.element_size()  # K and V
            received = max(plan.received_positions(r) for r in range(world)) * per_position
            gathered = (n - min(plan.shard_length(r) for r in range(world))) * per_position
            if rank == 0:
                print(f"| {name} | {n // 1024}k | {plan.strategy} ({plan.balance:.2f}) | "
                      f"{row['forward'][0]:.2f} / {row['forward'][1]:.2f} | "
                      f"{row['fwd+bwd'][0]:.2f} / {row['fwd+bwd'][1]:.2f} | "
                      f"{received / 2**20:.1f} MiB / {gathered / 2**20:.1f} MiB |", flush=True)
    dist.destroy_process_group()


def gloo(lengths, repeats: int, backend: str, world: int) -> None:
    print(f"| mask | positions | layout (max/mean) | forward, s: {world} ranks / 1 process | "
          f"fwd+bwd, s: {world} ranks / 1 process | K/V received by the busiest rank: ours / all-gather |")
    print("|---|---|---|---|---|---|")
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        _gloo_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", backend, lengths, repeats)
        return
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gloo_rank, args=(world, f"file://{tmp}/init", backend, lengths, repeats), nprocs=world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("planner", "gloo"))
    parser.add_argument("--lengths", type=int, nargs="*")
    parser.add_argument("--ranks", type=int, nargs="*", default=list(RANKS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    if args.part == "planner":
        planner(args.lengths or LENGTHS, args.ranks)
    else:
        gloo(args.lengths or (16384,), args.repeats, args.backend, args.world)


if __name__ == "__main__":
    main()
