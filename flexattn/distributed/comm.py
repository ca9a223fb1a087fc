"""torch.distributed traffic of context parallel attention: the agreement check and the K/V exchange.

Every wait has a timeout; one that passes raises ``DistributedError`` naming the rank, the step
and the peer, so a rank whose peers never arrive fails instead of hanging. Point-to-point sends
carry exactly the units ``plan.recv`` lists (K and V packed along the feature dim: one message per
pair of ranks that share a non-empty tile, none between the others).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flexattn.distributed.plan import ContextParallelPlan
from flexattn.errors import DistributedError


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank, world size) of this process in ``group`` (None: the default group).

    Raises ``DistributedError`` when torch.distributed is not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError("torch.distributed is not initialised: call torch.distributed.init_process_group("
                               "backend, ...) on every rank first (gloo on CPU, nccl on GPUs)")
    return dist.get_rank(group), dist.get_world_size(group)


def wait_or_fail(work, timeout: datetime.timedelta, rank: int, step: str) -> None:
    """Wait for ``work``; ``DistributedError`` naming ``rank`` and ``step`` when ``timeout`` passes first."""
    try:
        work.wait(timeout=timeout)
    except RuntimeError as error:
        raise DistributedError(f"rank {rank}: {step} did not complete within {timeout.total_seconds():g} s "
                               f"(a peer failed, is stuck, or called something else); the process group is "
                               f"unusable now. Cause: {str(error).splitlines()[0][:300]}") from error


def all_gather_rows(row: torch.Tensor, group, timeout: datetime.timedelta, rank: int, world: int,
                    step: str) -> torch.Tensor:
    """(world, n) of every rank's 1-D int64 ``row`` (the cheap agreement check before any exchange).

    On an NCCL group the row travels on this rank's current GPU (NCCL moves device memory only).
    """
    if dist.get_backend(group) == "nccl":
        row = row.to(torch.device("cuda", torch.cuda.current_device()))
    rows = [torch.empty_like(row) for _ in range(world)]
    wait_or_fail(dist.all_gather(rows, row, group=group, async_op=True), timeout, rank, step)
    return torch.stack(rows).cpu()


def all_reduce_sum(tensor: torch.Tensor, group, timeout: datetime.timedelta, rank: int, step: str) -> torch.Tensor:
    """``tensor`` summed over the ranks of ``group`` (in place; returned)."""
    wait_or_fail(dist.all_reduce(tensor, group=group, async_op=True), timeout, rank, step)
    return tensor


@dataclass
class Pending:
    """Sends and receives in flight: ``wait()`` returns what each peer sent (None: nothing)."""

    works: list
    peers: list
    buffers: list
    timeout: datetime.timedelta
    rank: int
    step: str

    def wait(self) -> list:
        for work, peer in zip(self.works, self.peers):
            wait_or_fail(work, self.timeout, self.rank, f"{self.step} (with rank {peer})")
        return self.buffers


class Exchange:
    """The K/V traffic of one rank for one plan: forward (units out to who needs them) and backward
    (their gradients back to their owners).

    ``remote_units``: the units this rank receives, ascending (the layout of the remote K/V it
    attends to). Built once per (plan, rank) and kept with the local masks.
    """

    def __init__(self, plan: ContextParallelPlan, rank: int):
        self.plan, self.rank = plan, rank
        offset, local = 0, {}
        for u in plan.units[rank]:
            local[u] = offset
            offset += plan.unit_length(u)
        world = plan.world_size
        # Local positions of the units each peer receives from this rank, in the peer's order.
        self.send_index = [torch.cat([torch.arange(local[u], local[u] + plan.unit_length(u))
                                      for u in plan.recv[j][rank]]) if plan.recv[j][rank] else None
                           for j in range(world)]
        self.recv_lengths = [sum(plan.unit_length(u) for u in plan.recv[rank][j]) for j in range(world)]
        by_source = [u for j in range(world) for u in plan.recv[rank][j]]
        self.remote_units = tuple(sorted(by_source))
        source_positions = plan.unit_positions(by_source)
        order = source_positions.argsort()
        # Source order -> ascending global order (None when they already agree: one source, or sorted).
        self.order = None if torch.equal(order, torch.arange(order.numel())) else order
        self.inverse = None if self.order is None else order.argsort()

    def start_forward(self, packed: torch.Tensor, group, timeout, step: str) -> Pending:
        """Send this rank's units ``packed`` (B, H, shard_length, C) to the ranks that need them; receive the others'."""
        sends = [None if idx is None else packed.index_select(2, idx.to(packed.device)) for idx in self.send_index]
        shapes = [None if n == 0 else (*packed.shape[:2], n, packed.shape[3]) for n in self.recv_lengths]
        return self._start(sends, shapes, packed, group, timeout, step)

    def assemble(self, received: list) -> torch.Tensor | None:
        """The received units (from ``start_forward(...).wait()``) as one tensor in ascending global order."""
        parts = [b for b in received if b is not None]
        if not parts:
            return None
        stacked = torch.cat(parts, dim=2)
        return stacked if self.order is None else stacked.index_select(2, self.order.to(stacked.device))

    def start_backward(self, grad_remote: torch.Tensor, group, timeout, step: str) -> Pending:
        """Send the gradient of the received units (ascending order) back to their owners; receive ours."""
        if self.inverse is not None:
            grad_remote = grad_remote.index_select(2, self.inverse.to(grad_remote.device))
        parts = list(grad_remote.split(self.recv_lengths, dim=2))
        sends = [None if n == 0 else part.contiguous() for part, n in zip(parts, self.recv_lengths)]
        shapes = [None if idx is None else (*grad_remote.shape[:2], idx.numel(), grad_remote.shape[3])
                  for idx in self.send_index]
        return self._start(sends, shapes, grad_remote, group, timeout, step)

    def scatter_add(self, grad_own: torch.Tensor, received: list) -> torch.Tensor:
        """``grad_own`` plus each peer's gradient for the units it received from this rank."""
        for idx, part in zip(self.send_index, received):
            if idx is not None:
                grad_own = grad_own.index_add(2, idx.to(grad_own.device), part)
        return grad_own

    def _start(self, sends, shapes, like: torch.Tensor, group, timeout, step) -> Pending:
        works, peers, buffers = [], [], []
        for peer, shape in enumerate(shapes):
            buffer = None if shape is None else torch.empty(shape, dtype=like.dtype, device=like.device)
            buffers.append(buffer)
            if buffer is not None:
                works.append(dist.irecv(buffer, group=group, group_src=peer))
                peers.append(peer)
        for peer, tensor in enumerate(sends):
            if tensor is not None:
                works.append(dist.isend(tensor.contiguous(), group=group, group_dst=peer))
                peers.append(peer)
        return Pending(works, peers, buffers, timeout, self.rank, step)
