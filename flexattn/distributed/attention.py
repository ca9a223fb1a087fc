"""context_parallel_attention: flex attention over a sequence sharded across ranks.

Per call, on each rank: (1) one small all_gather checks that every rank agrees on the plan, the
shapes and its own shard length (a bad rank fails everywhere, before any data moves); (2) the K/V
units other ranks need leave by point-to-point sends while this rank attends its own queries to
its own keys; (3) it then attends to the received units and merges the two partial results by
their log-sum-exp. Both partial calls are ordinary ``flex_attention`` calls on local tensors with
local BlockMasks cut out of the global one (whole tiles, so FULL/PARTIAL/EMPTY carry over), and
mods wrapped to read ``q_idx`` and ``kv_idx`` through position tables (captured int64 buffers,
as the paged cache maps physical to logical positions): the user's mods see global positions,
and every rank traces the same IR. Backward sends each received unit's K/V gradient back to its
owner and all-reduces the gradients of captured float tensors.
"""

from __future__ import annotations

import datetime
import weakref
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from flexattn.api import AuxRequest, flex_attention
from flexattn.block_mask import BlockMask
from flexattn.distributed.comm import Exchange, all_reduce_sum
from flexattn.distributed.plan import ContextParallelPlan
from flexattn.errors import InputError
from flexattn.lse import merge_attention
from flexattn.trace import trace_score_mod

_parts: "weakref.WeakKeyDictionary[BlockMask, dict]" = weakref.WeakKeyDictionary()


def _at_global_mask(mask_mod, q_pos, kv_pos):
    def global_mask(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_pos[q_idx], kv_pos[kv_idx])
    global_mask.__name__ = f"global_{getattr(mask_mod, '__name__', 'mask_mod')}"
    return global_mask


def _at_global_score(score_mod, q_pos, kv_pos):
    def global_score(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_pos[q_idx], kv_pos[kv_idx])
    global_score.__name__ = f"global_{getattr(score_mod, '__name__', 'score_mod')}"
    return global_score


@dataclass
class _Part:
    """One partial attention of a rank: its queries against one set of key units."""

    block_mask: BlockMask
    q_pos: torch.Tensor
    kv_pos: torch.Tensor


@dataclass
class LocalParts:
    """What a rank needs for a plan and mask: its own part, the remote part (or None), the exchange."""

    own: _Part
    remote: _Part | None
    exchange: Exchange


def _tiles(units, unit: int, block: int, n_blocks: int) -> torch.Tensor:
    per = unit // block
    return torch.cat([torch.arange(u * per, min((u + 1) * per, n_blocks)) for u in units])


def _part(classes, block_mask, plan, q_units, kv_units, device) -> _Part:
    qb, kb = block_mask.BLOCK_SIZE
    rows = _tiles(q_units, plan.unit, qb, classes.shape[2])
    cols = _tiles(kv_units, plan.unit, kb, classes.shape[3])
    q_pos, kv_pos = plan.unit_positions(q_units).to(device), plan.unit_positions(kv_units).to(device)
    local = classes.index_select(2, rows).index_select(3, cols).contiguous().to(device)
    mask = BlockMask.from_tile_classes(local, block_mask.BLOCK_SIZE, (q_pos.numel(), kv_pos.numel()),
                                       _at_global_mask(block_mask.mask_mod, q_pos, kv_pos))
    return _Part(mask, q_pos, kv_pos)


def local_parts(block_mask: BlockMask, plan: ContextParallelPlan, rank: int, device) -> LocalParts:
    """The local BlockMasks, position tables and exchange of ``rank`` (kept per mask, plan, rank and device)."""
    visited = block_mask.visited_tiles()
    classes = visited.tile_classes()
    key = (plan, rank, str(device))
    cached = _parts.setdefault(block_mask, {}).get(key)
    if cached is not None and cached[0] is classes:
        return cached[1]
    exchange = Exchange(plan, rank)
    own = _part(classes, visited, plan, plan.units[rank], plan.units[rank], device)
    remote = _part(classes, visited, plan, plan.units[rank], exchange.remote_units, device) \
        if exchange.remote_units else None
    parts = LocalParts(own, remote, exchange)
    _parts[block_mask][key] = (classes, parts)
    return parts


def grad_buffers_of(score_mod) -> tuple[torch.Tensor, ...]:
    """The float tensors requiring grad that ``score_mod`` captures (views resolved to their base).

    Raises ``InputError`` when the mod builds such a tensor anew on every call (then the attention
    call's own trace would hold another tensor than this one and its gradient would be lost).
    """
    if score_mod is None:
        return ()
    traces = [trace_score_mod(score_mod).buffers for _ in range(2)]
    bases = []
    for first, second in zip(*traces):
        if first.is_floating_point() and first.requires_grad:
            a, b = first, second
            while a._base is not None:
                a = a._base
            while b._base is not None:
                b = b._base
            if a is not b:
                raise InputError(f"score_mod '{getattr(score_mod, '__name__', 'score_mod')}' computes a tensor that "
                                 f"requires grad (shape {list(first.shape)}) inside the mod on every call; compute "
                                 f"it once outside the mod and capture the result, so its gradient can be reduced "
                                 f"across ranks")
            if not any(a is seen for seen in bases):
                bases.append(a)
    return tuple(bases)


@dataclass
class ShardedCall:
    parts: LocalParts
    score_mod: object
    group: object
    rank: int
    timeout: datetime.timedelta
    kwargs: dict
    grad: bool  # grad mode at the call (inside forward it is always off)


def _attend(call: ShardedCall, part: _Part, q, k, v):
    score = None if call.score_mod is None else _at_global_score(call.score_mod, part.q_pos, part.kv_pos)
    kwargs = dict(call.kwargs)
    kwargs["kernel_options"] = dict(kwargs["kernel_options"] or {})
    out, aux = flex_attention(q, k, v, score_mod=score, block_mask=part.block_mask,
                              return_aux=AuxRequest(lse=True), **kwargs)
    return out, aux.lse


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().requires_grad_(grad)


class ContextParallelFunction(torch.autograd.Function):
    """(query, key, value, *captured float tensors) -> (out, lse) of this rank's queries, across ranks.

    The local computation is recorded by autograd inside ``forward`` (so its backward is flexattn's
    own, the lse included); ``backward`` adds the communication: K/V gradients back to their
    owners, captured tensors' gradients summed over ranks.
    """

    @staticmethod
    def forward(ctx, call: ShardedCall, query, key, value, *buffers):
        ctx.call, ctx.buffers = call, buffers
        E = key.shape[-1]
        with torch.set_grad_enabled(call.grad):
            q, k, v = (_leaf(t, call.grad and t.requires_grad) for t in (query, key, value))
            pending = call.parts.exchange.start_forward(torch.cat([key.detach(), value.detach()], dim=-1),
                                                        call.group, call.timeout, "forward K/V exchange")
            out, lse = _attend(call, call.parts.own, q, k, v)
            received = call.parts.exchange.assemble(pending.wait())
            remote = ()
            if received is not None:
                remote = (_leaf(received[..., :E], k.requires_grad), _leaf(received[..., E:], v.requires_grad))
                out_r, lse_r = _attend(call, call.parts.remote, q, *remote)
                out, lse = merge_attention([out, out_r], [lse, lse_r])
        ctx.inner = (out, lse, (q, k, v), remote)
        return out.detach(), lse.detach()

    @staticmethod
    @once_differentiable  # the inner backward builds no graph: a second derivative raises, never silently 0
    def backward(ctx, grad_out, grad_lse):
        call = ctx.call
        out, lse, (q, k, v), remote = ctx.inner
        del ctx.inner
        inputs = (q, k, v, *remote, *ctx.buffers)
        wrt = [t for t in inputs if t.requires_grad]
        found = iter(torch.autograd.grad((out, lse), wrt, (grad_out, grad_lse), allow_unused=True))
        grads = [None if not t.requires_grad else _or_zeros(next(found), t) for t in inputs]
        dq, dk, dv = grads[:3]
        exchange_kv = k.requires_grad or v.requires_grad  # the same on every rank (checked before the forward)
        if exchange_kv:
            dk, dv = _or_zeros(dk, k), _or_zeros(dv, v)
            grad_remote = torch.cat([_or_zeros(g, t) for g, t in zip(grads[3:5], remote)], dim=-1) if remote else \
                torch.cat([dk, dv], dim=-1)[:, :, :0]
            pending = call.parts.exchange.start_backward(grad_remote, call.group, call.timeout,
                                                         "backward K/V gradient exchange")
        buffer_grads = [all_reduce_sum(g.contiguous(), call.group, call.timeout, call.rank,
                                       f"backward all_reduce of captured tensor {i}")
                        for i, g in enumerate(grads[3 + len(remote):])]
        if exchange_kv:
            packed = call.parts.exchange.scatter_add(torch.cat([dk, dv], dim=-1), pending.wait())
            E = k.shape[-1]
            dk = packed[..., :E] if k.requires_grad else None
            dv = packed[..., E:] if v.requires_grad else None
        return (None, dq, dk, dv, *buffer_grads)


def _or_zeros(grad, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad
