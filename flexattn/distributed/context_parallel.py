"""The public entry point: ``context_parallel_attention``, and the agreement check it runs first."""

from __future__ import annotations

import datetime
import functools

import torch

from flexattn import dispatch
from flexattn.analysis import create_block_mask
from flexattn.api import validate_inputs
from flexattn.block_mask import BlockMask
from flexattn.distributed.attention import ShardedCall, ContextParallelFunction, grad_buffers_of, local_parts
from flexattn.distributed.comm import all_gather_rows, group_rank_and_size
from flexattn.distributed.layout import DEFAULT_TIMEOUT
from flexattn.distributed.plan import ContextParallelPlan, plan_context_parallel, plan_for_units
from flexattn.errors import DistributedError, FlexAttnError, InputError
from flexattn.kernel_options import normalize
from flexattn.masks import noop_mask

# The agreement row every rank contributes: a status, then what all ranks must share, then its own length.
_FIELDS = ("status", "plan", "seq_len", "world", "batch", "q_heads", "kv_heads", "head_dim", "value_dim", "dtype",
           "grads", "buffers", "length")
_SHARED = slice(1, 12)
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _row(status: int, plan, world, query, key, value, n_buffers) -> torch.Tensor:
    shapes = [query.shape[0], query.shape[1], key.shape[1], key.shape[-1], value.shape[-1]] \
        if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)) else [-1] * 5
    dtype = query.dtype if isinstance(query, torch.Tensor) else None
    grads = sum(bool(getattr(t, "requires_grad", False) and torch.is_grad_enabled()) << i
                for i, t in enumerate((query, key, value)))
    length = query.shape[2] if isinstance(query, torch.Tensor) and query.dim() == 4 else -1
    return torch.tensor([status, plan.fingerprint() if plan else -1, plan.seq_len if plan else -1, world, *shapes,
                         _DTYPES.index(dtype) if dtype in _DTYPES else -1, grads, n_buffers, length],
                        dtype=torch.int64)


def _agree(rows: torch.Tensor, rank: int, plan: ContextParallelPlan | None, error: Exception | None) -> None:
    """Raise on every rank when any rank failed its own checks or the ranks disagree."""
    failed = rows[:, 0].nonzero().flatten().tolist()
    if error is not None:
        raise error
    if failed:
        raise DistributedError(f"rank {rank}: rank(s) {failed} failed their input checks (each raised the reason); "
                               f"no data was exchanged")
    for r in range(rows.shape[0]):
        differ = [name for name, a, b in zip(_FIELDS[_SHARED], rows[r, _SHARED].tolist(), rows[rank, _SHARED].tolist())
                  if a != b]
        if differ:
            raise DistributedError(f"rank {rank}: rank {r} disagrees on {', '.join(differ)} (rank {r}: "
                                   f"{rows[r].tolist()}, rank {rank}: {rows[rank].tolist()}, fields {_FIELDS}); "
                                   "every rank must pass the same BlockMask, plan, shapes and dtype")


def context_parallel_attention(query, key, value, score_mod=None, block_mask: BlockMask | None = None, *,
                               plan: ContextParallelPlan | None = None, group=None, scale: float | None = None,
                               enable_gqa: bool = False, return_lse: bool = False, kernel_options: dict | None = None,
                               backend: str = "auto", timeout: datetime.timedelta = DEFAULT_TIMEOUT):
    r"""``flex_attention`` of a sequence sharded across the ranks of ``group``; call it on every rank.

    Args:
        query: this rank's shard (B, Hq, L_r, E), key (B, Hkv, L_r, E), value (B, Hkv, L_r, Ev), laid out by
            ``shard(x, plan)``: L_r = ``plan.shard_length(rank)``.
        score_mod, block_mask: as for ``flex_attention``, written for the GLOBAL sequence (the mask's
            Q_LEN == KV_LEN is the full length); the mods see global positions. ``block_mask=None``
            needs ``plan`` (attention everywhere).
        plan: the layout the shards follow (default ``plan_context_parallel(block_mask, world_size)``).
        group: a torch.distributed process group (default: the default group).
        scale, enable_gqa, kernel_options, backend: as for ``flex_attention`` (used by each rank's local calls).
        return_lse: also return this rank's lse (B, Hq, L_r), differentiable.
        timeout: how long any wait on a peer may take before ``DistributedError``.

    Returns this rank's out (B, Hq, L_r, Ev) (and lse), equal to the matching rows of single-process
    ``flex_attention`` on the full sequence; gradients flow to query, key, value and the float
    tensors the score_mod captures (summed over ranks, as one process would compute them). Every
    rank must run backward through its output when one does (the gradient exchange is collective).

    Raises (on every rank, before any K/V moves): ``InputError`` on the rank whose shard length or
    shapes do not fit (``DistributedError`` on the others), ``BlockMaskError`` for a mask of
    another global length than the plan, ``DistributedError`` when ranks disagree on the plan,
    shapes, dtype or group size, or a peer does not answer within ``timeout`` (naming rank and step).

    Example (on each of 2 ranks, after ``torch.distributed.init_process_group("gloo", ...)``)::

        >>> bm = create_block_mask(causal, None, None, 4096, 4096)
        >>> plan = plan_context_parallel(bm, 2)
        >>> out = context_parallel_attention(shard(q, plan), shard(k, plan), shard(v, plan), block_mask=bm)
        >>> full = unshard(out, plan)   # equals flex_attention(q, k, v, block_mask=bm)
    """
    rank, world = group_rank_and_size(group)
    error, buffers = None, ()
    try:
        plan, block_mask = _plan_and_mask(block_mask, plan, world)
        query, key, value = _check_local(query, key, value, enable_gqa, plan, rank)
        buffers = grad_buffers_of(score_mod)
        parts = local_parts(block_mask, plan, rank, query.device)
        normalize(kernel_options)  # a bad option fails here, on every rank, not inside the exchange
        kwargs = dict(scale=scale, enable_gqa=enable_gqa, kernel_options=kernel_options, backend=dispatch.pick_backend(backend, query.device.type))
    except FlexAttnError as caught:
        error = caught
    rows = all_gather_rows(_row(0 if error is None else 1, None if error else plan, world, query, key, value,
                                len(buffers)), group, timeout, rank, world, "agreement check before the exchange")
    _agree(rows, rank, plan, error)
    call = ShardedCall(parts, score_mod, group, rank, timeout, kwargs, torch.is_grad_enabled())
    out, lse = ContextParallelFunction.apply(call, query, key, value, *buffers)
    return (out, lse) if return_lse else out


def _plan_and_mask(block_mask, plan, world: int):
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        block_mask = BlockMask.from_torch(block_mask)
    if block_mask is None:
        if plan is None:
            raise InputError("pass block_mask (create_block_mask(noop_mask, None, None, N, N) for attention "
                             "everywhere) or plan: the layout of the shards comes from one of them")
        block_mask = _attend_everywhere(plan.seq_len, plan.block_size)
    if plan is None:
        plan = plan_context_parallel(block_mask, world)
    if plan.world_size != world:
        raise InputError(f"the plan lays the sequence out over {plan.world_size} ranks but the group has {world}; "
                         f"plan with plan_context_parallel(block_mask, {world})")
    return plan_for_units(block_mask, plan), block_mask


@functools.lru_cache(maxsize=8)
def _attend_everywhere(seq_len: int, block_size: tuple[int, int]) -> BlockMask:
    return create_block_mask(noop_mask, None, None, seq_len, seq_len, BLOCK_SIZE=block_size)


def _check_local(query, key, value, enable_gqa: bool, plan: ContextParallelPlan, rank: int):
    query, key, value = validate_inputs(query, key, value, enable_gqa)
    expected = plan.shard_length(rank)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.shape[2] != expected:
            raise InputError(f"rank {rank}: {name} has {t.shape[2]} positions but the plan gives this rank "
                             f"{expected} (of {plan.seq_len}); lay the inputs out with shard(x, plan)")
    return query, key, value
