"""Decoding against a short cache: the whole score matrix of the call on torch's fused CPU kernel.

A decoding call (``codegen.decoding``: a few query rows, no gradient) against fewer than
``MIN_KV_TILES`` KV tiles is one piece of a few tiles in the generated loop, whose cost there is
its thirty-odd small torch ops, not arithmetic. Here the mask is evaluated once over the call's
(B, Hq, L, S) positions and combined with the BlockMask's tile classes as flex attention defines
them (FULL tiles kept whole, PARTIAL ones where the mask_mod holds, EMPTY ones dropped); q, k, v
and that mask as an additive 0 / -inf tensor go to torch's fused flash kernel in one call, which
returns out and the lse. Keys that no query row of a KV head attends are zeroed first, since
the kernel reads every key. The query heads of a KV head enter as one head's rows, (B, Hkv, G * L, E),
so K/V are not expanded for GQA. Rows that keep no position give out 0 and lse -inf.

Served: no score_mod (the fused kernel only adds the mask), the fused kernel's other conditions
(``fused_paths.why_not_fused``: one head dim, CPU, no max_scores).
"""

from __future__ import annotations

import torch

from codegen.decoding import why_not_decoding
from codegen.torch_backend.decode import MIN_KV_TILES
from codegen.torch_backend.fused import fused_forward
from codegen.torch_backend.fused_paths import why_not_fused
from codegen.torch_backend.kernel import compile_kernel
from flexattn.block_mask import FULL, PARTIAL
from flexattn.call import Call

NEG_INF = float("-inf")


def why_not_dense(call: Call, forced: bool) -> str | None:
    """Why ``call`` is not a short-cache decoding call this path computes (None: it is)."""
    reason = why_not_decoding(call) or why_not_fused(call)
    if reason is not None:
        return reason
    if call.score_graph is not None:
        return "a score_mod: the fused kernel only adds a mask"
    _, _, _, L, S = call.shape
    if L == 0 or S == 0:
        return "no query rows or no keys"
    kv_block = call.block_size[1]
    if S >= MIN_KV_TILES * kv_block and not forced:
        return f"KV_LEN={S} spans {MIN_KV_TILES} KV tiles of {kv_block} or more: the split-KV paths read it faster"
    return None


def _mask(call: Call):
    """None (every position attended: no BlockMask) or (additive, unread, empty): additive
    (B or 1, Hkv or 1, G * L or L, S) 0 / -inf in the compute float, broadcast by the kernel; unread
    the flat (B * Hkv * S) indices of the keys no row of their KV head attends (None: there are
    none); empty (B or 1, Hq or 1, L) the rows that
    attend nothing. The mask is the one the BlockMask's build kept where it evaluated every
    position (``BlockMask.attended_positions``), else evaluated here. Kept with the
    BlockMask, which every layer of a step shares, while its lists and the mask_mod's buffers are
    unchanged."""
    if call.block_mask is None:
        return None  # every tile FULL, the mask_mod never asked (as in flex attention)
    B, Hq, Hkv, L, S = call.shape
    key = (B, Hq, Hkv, L, S, call.block_size, str(call.query.device), call.compute_dtype,
           None if call.mask_graph is None else call.mask_graph.structural_key())
    return call.block_mask.derived("dense decode mask", key, lambda: _evaluate(call), call.mask_buffers)


def _evaluate(call: Call):
    B, Hq, Hkv, L, S = call.shape
    kept = call.block_mask.attended_positions(call.mask_buffers)
    if kept is None or kept.shape[-2:] != (L, S):
        kept = _kept_by_tiles(call)
    kept = kept.to(call.query.device)
    nb, nh = kept.shape[:2]
    # The kernel broadcasts the mask: one that no head reads stays (B or 1, 1, rows, S) where each
    # KV head's rows repeat it (a single query row, or no GQA); a decoding step's usual shape.
    if nh == 1 and (L == 1 or Hq == Hkv):
        rows = kept
    else:
        rows = kept.expand(nb, Hq, L, S).reshape(nb, Hkv, -1, S)
    additive = torch.full(rows.shape, NEG_INF, dtype=call.compute_dtype, device=rows.device).masked_fill_(rows, 0.0)
    unread = ~rows.any(dim=2)
    # The flat (B * Hkv * S) indices of the keys no row reads, for ``index_fill`` (about half the
    # time of a ``where`` over the keys).
    unread = unread.expand(B, Hkv, S).reshape(-1).nonzero().squeeze(1) if bool(unread.any()) else None
    return additive, unread, ~kept.any(dim=-1)


def _kept_by_tiles(call: Call) -> torch.Tensor:
    """(B or 1, Hq or 1, L, S) bool: the tile classes, and the mask_mod in PARTIAL tiles."""
    B, Hq, _, L, S = call.shape
    device = call.query.device
    q_block, kv_block = call.block_size
    q_idx, kv_idx = torch.arange(L, device=device), torch.arange(S, device=device)
    classes = call.block_mask.tile_classes().to(device)[:, :, q_idx // q_block][..., kv_idx // kv_block]
    kept = classes == FULL
    if call.mask_graph is not None:
        kernel = compile_kernel(None, call.mask_graph)
        # Asked with each sequence's and query head's own b and h, as flex attention asks it.
        holds = kernel.namespace["mask_mod"](
            torch.arange(B, device=device).view(-1, 1, 1, 1), torch.arange(Hq, device=device).view(1, -1, 1, 1),
            q_idx.view(1, 1, -1, 1), kv_idx.view(1, 1, 1, -1), call.mask_buffers, kernel.constants[1],
            call.compute_dtype)
        kept = kept | ((classes == PARTIAL) & torch.as_tensor(holds, dtype=torch.bool, device=device))
    return kept


def dense_decode(call: Call):
    """``(out, lse, None)`` of ``call`` (see the module docstring): out (B, Hq, L, Ev) in the query's
    dtype, lse (B, Hq, L) in the compute float."""
    B, Hq, Hkv, L, S = call.shape
    compute = call.compute_dtype
    q = call.query.to(compute).reshape(B, Hkv, -1, call.query.shape[-1])
    k, v = (t.to(compute).expand(B, -1, -1, -1) for t in (call.key, call.value))
    mask = _mask(call)
    if mask is None:
        out, lse = fused_forward(q, k, v, 0.0, False, scale=call.scale)
        return out.reshape(B, Hq, L, -1).to(call.query.dtype), lse.reshape(B, Hq, L), None
    additive, unread, empty = mask
    # Keys no row of a KV head attends may hold anything (a paged pool's free pages, NaN): the
    # kernel multiplies every key and value, so they are zeroed (a NaN key's score would stay
    # NaN under the -inf mask, a NaN value would turn its 0 weight into NaN).
    if unread is not None:
        k, v = (torch.index_fill(t.reshape(-1, t.shape[-1]), 0, unread, 0.0).view(B, Hkv, S, -1) for t in (k, v))
    out, lse = fused_forward(q, k, v, 0.0, False, attn_mask=additive, scale=call.scale)
    # The kernel gives a row that keeps nothing out 0 and lse 0: flex attention's lse is -inf there.
    lse = lse.reshape(B, Hq, L).masked_fill(empty, NEG_INF)
    return out.reshape(B, Hq, L, -1).to(call.query.dtype), lse, None
