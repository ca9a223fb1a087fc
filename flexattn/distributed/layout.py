"""Laying a full sequence out across ranks by a plan, and back."""

from __future__ import annotations

import datetime

import torch

import torch.distributed as dist

from flexattn.distributed.comm import all_gather_rows, group_rank_and_size, wait_or_fail
from flexattn.distributed.plan import ContextParallelPlan
from flexattn.errors import InputError

DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


def _check_dim(x: torch.Tensor, dim: int, name: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise InputError(f"dim={dim} is out of range for {name} of shape {list(x.shape)}")
    return dim % x.dim()


def shard(x: torch.Tensor, plan: ContextParallelPlan, rank: int | None = None, *, group=None,
          dim: int = 2) -> torch.Tensor:
    """Rank ``rank``'s shard of the full sequence ``x``: its positions ``plan.positions(rank)`` along ``dim``.

    ``x``: e.g. q, k or v (B, H, S, D), or a (B, H, S) lse, with S = ``plan.seq_len`` at ``dim``.
    ``rank`` defaults to this process's rank in ``group``. Differentiable (an index_select).

    Raises ``InputError`` when ``x`` has another length than the plan's sequence at ``dim``.

    Example::

        >>> plan = plan_context_parallel(block_mask, world_size=2)
        >>> q_local = shard(q, plan)   # (B, H, plan.shard_length(rank), D)
    """
    dim = _check_dim(x, dim, "x")
    if x.shape[dim] != plan.seq_len:
        raise InputError(f"x has length {x.shape[dim]} at dim {dim} but the plan lays out {plan.seq_len} positions; "
                         f"pass the full sequence (or plan for this length)")
    if rank is None:
        rank, _ = group_rank_and_size(group)
    if not 0 <= rank < plan.world_size:
        raise InputError(f"rank {rank} is out of range for a plan over {plan.world_size} ranks")
    return x.index_select(dim, plan.positions(rank).to(x.device))


def unshard(x, plan: ContextParallelPlan, *, group=None, dim: int = 2,
            timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> torch.Tensor:
    """The full sequence from its shards: ``x`` is this rank's shard (gathered from every rank of
    ``group``, a collective) or a list of every rank's shards (no communication).

    Returns a tensor with ``plan.seq_len`` positions at ``dim``, in global order, on every rank.
    Gradients do not flow through the gather (use it for outputs, checks and logging).

    Raises ``InputError`` for a shard of the wrong length (checked on every rank before the gather
    of the data, so no rank hangs), ``DistributedError`` when a peer does not answer in ``timeout``.

    Example::

        >>> out = unshard(out_local, plan)   # (B, H, plan.seq_len, D) on every rank
    """
    if isinstance(x, (list, tuple)):
        if len(x) != plan.world_size:
            raise InputError(f"unshard got {len(x)} shards for a plan over {plan.world_size} ranks")
        dims = {_check_dim(t, dim, "each shard") for t in x}
        dim = dims.pop()
        for r, t in enumerate(x):
            if t.shape[dim] != plan.shard_length(r):
                raise InputError(f"shard {r} has length {t.shape[dim]} at dim {dim}, the plan gives rank {r} "
                                 f"{plan.shard_length(r)} positions")
        positions = torch.cat([plan.positions(r) for r in range(plan.world_size)]).to(x[0].device)
        stacked = torch.cat([t.detach() for t in x], dim=dim)
        return torch.empty_like(stacked).index_copy_(dim, positions, stacked)
    dim = _check_dim(x, dim, "x")
    rank, world = group_rank_and_size(group)
    if world != plan.world_size:
        raise InputError(f"the group has {world} ranks but the plan lays out {plan.world_size}")
    longest = max(plan.shard_length(r) for r in range(world))
    # Every rank learns every rank's shard length first: a bad shard fails everywhere, never hangs.
    rows = all_gather_rows(torch.tensor([x.shape[dim], x.dim()], dtype=torch.int64), group, timeout, rank, world,
                           "unshard: agreeing on shard lengths")
    for r in range(world):
        if tuple(rows[r].tolist()) != (plan.shard_length(r), x.dim()):
            raise InputError(f"rank {r} passed a {int(rows[r, 1])}-D shard of length {int(rows[r, 0])} at dim {dim}; "
                             f"the plan gives it {plan.shard_length(r)} positions (this rank: {x.dim()}-D)")
    moved = x.detach().movedim(dim, 0)
    padded = moved.new_zeros((longest, *moved.shape[1:]))
    padded[:moved.shape[0]] = moved
    gathered = [torch.empty_like(padded) for _ in range(world)]
    wait_or_fail(dist.all_gather(gathered, padded, group=group, async_op=True), timeout, rank, "unshard: all_gather")
    shards = [g[:plan.shard_length(r)].movedim(0, dim) for r, g in enumerate(gathered)]
    return unshard(shards, plan, dim=dim)
