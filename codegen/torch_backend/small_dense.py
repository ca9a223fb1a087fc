"""A short call's whole score matrix on torch's fused CPU kernel, with the mask as one additive tensor.

A call against fewer than ``MIN_KV_TILES`` KV tiles (a decoding step on a short cache, a short
prompt, a small model's forward) is, in the generated loop, a few pieces whose cost is their
thirty-odd small torch ops each, not arithmetic. Here the mask is evaluated once over the call's
(B, Hq, L, S) positions and combined with the BlockMask's tile classes as flex attention defines
them (FULL tiles kept whole, PARTIAL ones where the mask_mod holds, EMPTY ones dropped); q, k, v
and that mask as an additive 0 / -inf tensor go to torch's fused flash kernel in one call, which
returns out and the lse (and, through ``codegen.autograd``, its backward kernel the gradients).
Keys that no query row of a KV head attends are zeroed first, since the kernel reads every key.
The query heads of a KV head enter as one head's rows, (B, Hkv, G * L, E), so K/V are not expanded
for GQA, except where that would repeat a mask no head reads G times (``_Mask``). Rows that keep
no position give out 0 and lse -inf.

Served: no score_mod (the fused kernel only adds the mask), the fused kernel's other conditions
(``fused_paths.why_not_fused``: one head dim, CPU, no max_scores), at most ``MAX_CELLS`` positions
(the additive mask's size), and, unless forced, fewer than ``MIN_KV_TILES`` KV tiles or a
decoding step with no EMPTY tile (nothing for split-KV to skip), and a mask that is either small
or visits most of its tiles (computing the skipped ones costs less than the block-sparse paths'
per-piece work; docs/performance.md). Packed documents go to
``fused_documents`` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from codegen.autograd import differentiable
from codegen.decoding import why_not_decoding
from codegen.torch_backend.decode import MIN_KV_TILES
from codegen.torch_backend.fused import _backward, fused_forward, with_lse_column
from codegen.torch_backend.fused_paths import why_not_fused
from codegen.torch_backend.kernel import compile_kernel
from flexattn.block_mask import EMPTY, FULL, PARTIAL
from flexattn.call import Call, needs_grad

NEG_INF = float("-inf")
MAX_CELLS = 1 << 24  # B * Hq * L * S: the additive mask in float32 stays under 64 MiB
# Past SMALL_CELLS query-key positions per head, the whole matrix is computed only where the
# BlockMask visits at least MIN_VISITED of its tiles (a causal mask does; a window or documents skip more).
SMALL_CELLS = 1 << 16
MIN_VISITED = 0.5
SCORE_BOUND = 1e30  # a score bound under this is finite in float32 (max 3.4e38) and bf16, with the mask added


def why_not_small_dense(call: Call, forced: bool) -> str | None:
    """Why ``call`` is not a short call this path computes (None: it is)."""
    reason = why_not_fused(call)
    if reason is not None:
        return reason
    if call.score_graph is not None:
        return "a score_mod: the fused kernel only adds a mask"
    reason = why_not_sized(call, "the additive mask")
    if reason is not None or forced:
        return reason
    L, S = call.shape[3:]
    kv_block = call.block_size[1]
    if S >= MIN_KV_TILES * kv_block and (why_not_decoding(call) is not None or has_empty_tiles(call)):
        return (f"KV_LEN={S} spans {MIN_KV_TILES} KV tiles of {kv_block} or more (and is not a decoding step that "
                "visits every tile): the block-sparse paths skip more")
    if L * S > SMALL_CELLS and call.block_mask is not None:
        visited = float((call.block_mask.tile_classes() != EMPTY).float().mean())
        if visited < MIN_VISITED:
            return f"the BlockMask visits {visited:.0%} of its tiles (< {MIN_VISITED:.0%}): the block-sparse paths skip the rest"
    return None


def why_not_sized(call: Call, what: str) -> str | None:
    """The size rule of the paths that hold a whole (B, Hq, Q_LEN, KV_LEN) matrix, ``what``: some
    positions, and at most ``MAX_CELLS``."""
    B, Hq, _, L, S = call.shape
    if L == 0 or S == 0:
        return "no query rows or no keys"
    if B * Hq * L * S > MAX_CELLS:
        return f"B * Hq * Q_LEN * KV_LEN = {B * Hq * L * S} positions > {MAX_CELLS}: {what} would be too big"
    return None


def has_empty_tiles(call: Call) -> bool:
    """Whether the call's BlockMask has an EMPTY tile (one the block-sparse paths skip)."""
    return call.block_mask is not None and bool((call.block_mask.tile_classes() == EMPTY).any())


@dataclass(frozen=True)
class _Mask:
    """A call's mask as the kernel takes it. ``stacked``: the query heads of a KV head enter as one
    head's rows, q (B, Hkv, G * L, E); else K/V are expanded to the query heads (a mask that no
    head reads, on several query rows with GQA: it then broadcasts over the heads, where stacked
    rows would repeat it G times). ``additive``: 0 / -inf in the compute float, broadcastable to
    the kernel's (B, heads, rows, S); ``unread``: the flat (B * Hkv * S) indices of the keys no row
    of their KV head attends, or None;
    ``empty`` (B or 1, Hq or 1, L): the rows that attend nothing, or None where every row attends."""

    stacked: bool
    additive: torch.Tensor | None = None
    unread: torch.Tensor | None = None
    empty: torch.Tensor | None = None

    @cached_property
    def dropped(self) -> torch.Tensor | None:
        """Bool, True where ``additive`` is -inf (for ``dense_scores``, which masks the scores), or None."""
        return None if self.additive is None else self.additive.isneginf()


def mask_of_call(call: Call) -> _Mask:
    """The ``_Mask`` of ``call``: made from the positions the BlockMask's build kept where it
    evaluated every position (``BlockMask.attended_positions``), else evaluated here. Kept with the
    BlockMask, which every layer of a step shares (and its copies: a model's mask served again from
    ``flexattn.mod_cache``), while its lists and those kept positions, or else the mask_mod's
    buffers, are unchanged."""
    if call.block_mask is None:
        return _Mask(True)  # every tile FULL, the mask_mod never asked (as in flex attention)
    B, Hq, Hkv, L, S = call.shape
    key = (B, Hq, Hkv, L, S, call.block_size, str(call.query.device), call.compute_dtype,
           None if call.mask_graph is None else call.mask_graph.structural_key())
    kept = call.block_mask.attended_positions(call.mask_buffers)
    if kept is None or kept.shape[-2:] != (L, S):
        return call.block_mask.derived("small dense mask", key, lambda: _evaluate(call, _kept_by_tiles(call)),
                                       call.mask_buffers)
    return call.block_mask.derived("small dense mask", key, lambda: _evaluate(call, kept), (kept,))


def _evaluate(call: Call, kept: torch.Tensor) -> _Mask:
    B, Hq, Hkv, L, S = call.shape
    kept = kept.to(call.query.device)
    nb, nh = kept.shape[:2]
    stacked = nh > 1 or L == 1 or Hq == Hkv
    if stacked and nh == 1:
        rows = kept  # broadcast over the KV heads (one query row, or no GQA: the rows do not repeat)
    elif stacked:
        rows = kept.expand(nb, Hq, L, S).reshape(nb, Hkv, -1, S)
    else:
        rows = kept  # (B or 1, 1, L, S) over the expanded heads
    additive = torch.full(rows.shape, NEG_INF, dtype=call.compute_dtype, device=rows.device).masked_fill_(rows, 0.0)
    # The flat (B * Hkv * S) indices of the keys no row reads, for ``index_select`` / ``index_fill``.
    unread = rows.any(dim=2).logical_not_().expand(B, Hkv, S).reshape(-1).nonzero().squeeze(1)
    attends = kept.any(dim=-1)
    return _Mask(stacked, additive, unread if len(unread) else None,
                 None if bool(attends.all()) else attends.logical_not_())


def unread_zeroed(x: torch.Tensor, mask: _Mask, shape: tuple, q: torch.Tensor | None = None,
                  scale: float = 1.0) -> torch.Tensor:
    """``x`` (K or V, (B or 1, Hkv, S, D), any layout) as (B, Hkv, S, D) = ``shape``, with the keys
    ``mask`` says no row reads set to 0 where they could change the result: a kernel that
    multiplies every key and value turns a NaN or inf there into a NaN result (a paged pool's free
    pages may hold anything), and so does a key whose score with the queries ``q`` (scaled by
    ``scale``) could overflow to inf, which the -inf mask turns into NaN.

    Those keys are looked at first and ``x`` is copied only when one of them is unsafe: a copy of
    K or V costs more than the look, and far more than the attention of a decoding step. The look
    bounds every score by Cauchy-Schwarz, |q . k| <= ||Q|| ||K_unread|| (Frobenius norms); a NaN
    or inf makes a norm non-finite, and a norm that overflows is unsafe too."""
    B, Hkv, S, D = shape
    x = x.expand(B, -1, -1, -1)
    if mask.unread is None:
        return x
    if x.is_contiguous():
        rows = x.view(-1, D).index_select(0, mask.unread)  # (unread keys, D)
    else:
        sequence_head, position = mask.unread // S, mask.unread % S
        rows = x[sequence_head // Hkv, sequence_head % Hkv, position]
    bound = float(torch.linalg.vector_norm(rows))
    if q is not None:
        bound *= float(torch.linalg.vector_norm(q)) * scale
    if bound < SCORE_BOUND:  # False for NaN and inf
        return x
    return torch.index_fill(x.reshape(-1, D), 0, mask.unread, 0.0).view(B, Hkv, S, D)


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


class _SmallDense:
    """The path as ``codegen.autograd`` runs it: q (B, Hq, L, E) and k, v (B or 1, Hkv, S, E) in any
    float dtype; out (B, Hq, L, Ev) and lse (B, Hq, L) in the compute float."""

    def __init__(self, call: Call):
        self.call, self.mask = call, mask_of_call(call)

    def _inputs(self, q, k, v):
        """q, k, v in the compute float as the kernel takes them (``_Mask.stacked``), unread keys zeroed."""
        B, Hq, Hkv, _, S = self.call.shape
        compute = self.call.compute_dtype
        # Keys no row of a KV head attends may hold anything (a paged pool's free pages, NaN): the
        # kernel multiplies every key and value (a NaN key's score would stay NaN under the -inf
        # mask, a NaN value would turn its 0 weight into NaN).
        k = unread_zeroed(k.to(compute), self.mask, (B, Hkv, S, k.shape[-1]), q, self.call.scale)
        v = unread_zeroed(v.to(compute), self.mask, (B, Hkv, S, v.shape[-1]))
        if self.mask.stacked:
            return q.to(compute).reshape(B, Hkv, -1, q.shape[-1]), k, v
        return q.to(compute), k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)

    def _rows(self, x):
        """(B, Hq, L, D) as the kernel's (B, heads, rows, D)."""
        B, _, Hkv, _, _ = self.call.shape
        return x.reshape(B, Hkv, -1, x.shape[-1]) if self.mask.stacked else x

    def forward(self, q, k, v, score_buffers):
        B, Hq, _, L, _ = self.call.shape
        out, lse = fused_forward(*self._inputs(q, k, v), 0.0, False, attn_mask=self.mask.additive, scale=self.call.scale)
        lse = lse.reshape(B, Hq, L)
        if self.mask.empty is not None:  # the kernel gives a row that keeps nothing out 0 and lse 0: flex's is -inf
            lse = lse.masked_fill(self.mask.empty, NEG_INF)
        return out.reshape(B, Hq, L, -1), lse, None

    def backward(self, q, k, v, out, lse, grad_out, grad_lse, score_buffers, slots):
        B, Hq, Hkv, L, S = self.call.shape
        dtypes, key_batch = (q.dtype, k.dtype, v.dtype), k.shape[0]
        grad_out = grad_out.to(out.dtype)
        if grad_lse is not None:
            q, k, v, out, grad_out = with_lse_column(q, k, v, out, grad_out, grad_lse, lse)
        q, k, v = self._inputs(q, k, v)
        # Rows that attend nowhere: lse +inf makes every weight exp(s - lse) zero.
        lse = self._rows(torch.where(lse == NEG_INF, float("inf"), lse).unsqueeze(-1)).squeeze(-1)
        dq, dk, dv = _backward(self._rows(grad_out.contiguous()), q, k, v, self._rows(out), lse, 0.0, False,
                               attn_mask=self.mask.additive, scale=self.call.scale)
        if grad_lse is not None:
            dq, dk, dv = (x[..., :-1] for x in (dq, dk, dv))
        if not self.mask.stacked:  # the query heads of one KV head add up
            dk, dv = (x.unflatten(1, (Hkv, -1)).sum(2) for x in (dk, dv))
        if key_batch != B:  # K/V of batch 1, broadcast over the batch
            dk, dv = dk.sum(0, keepdim=True), dv.sum(0, keepdim=True)
        return dq.reshape(B, Hq, L, -1).to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), []


def small_dense(call: Call):
    """``(out, lse, None)`` of ``call`` (see the module docstring), differentiable in q, k and v:
    out (B, Hq, L, Ev) in the query's dtype, lse (B, Hq, L) in the compute float."""
    launch = _SmallDense(call)
    if needs_grad(call.query, call.key, call.value):
        out, lse, _ = differentiable(launch, call.query, call.key, call.value)
    else:
        out, lse, _ = launch.forward(call.query, call.key, call.value, ())
    return out.to(call.query.dtype), lse, None
