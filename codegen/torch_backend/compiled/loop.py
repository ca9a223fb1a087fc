"""The block-sparse flash loop of the compiled generic path (Python), around compiled per-tile functions.

The loop is the eager loop's (``template``): per query block row it visits
the row's pieces (``tiles.plan_rows``), multiplies on BLAS (``runtime``) and
merges pieces by online softmax. The elementwise work of a piece is two
compiled calls forward (``tile_scores``: the mods and row maxima; ``update``:
the weights, their row sums and the rescale of earlier pieces) and one
backward (``tile_grad``). ``TileFunctions`` holds a kernel's functions, each
compiled and plain; a piece of one query row or one column takes the plain
one, because ``torch.compile`` specialises sizes 0 and 1 (that would be a
new compilation on the caller's thread).

``forward``/``backward`` take the arguments of the eager module's functions,
so ``kernel.Kernel`` runs them unchanged (with its autograd.Function).
"""

from __future__ import annotations

import torch

from codegen.torch_backend.runtime import gather, grad_chunk, pad_to_tiles, query_key, scatter_add, weights_value

NEG_INF = float("-inf")
LOG2E = 1.4426950408889634
EXP2_FLOOR = -126.0
_FLOAT_CONSTS = torch.float64  # float constants keep full precision for float64 inputs


def update(x, row_max, new_max, row_sum):
    """Online softmax over one piece: x (B, Hq, r, N) masked scores; row_max the maxima before this
    piece, new_max after it (B, Hq, r). Returns the weights exp(x - new_max), the new row sums and
    the factor (B, Hq, r) for the accumulator of earlier pieces (0 where there were none)."""
    shift = torch.where(new_max == NEG_INF, 0.0, new_max)
    p = torch.where(x == NEG_INF, 0.0, torch.exp2(((x - shift.unsqueeze(-1)) * LOG2E).clamp(min=EXP2_FLOOR)))
    rescale = torch.where(row_max == NEG_INF, 0.0, torch.exp2((row_max - shift) * LOG2E))
    return p, row_sum * rescale + p.sum(dim=-1), rescale


class TileFunctions:
    """A kernel's per-tile functions: ``plain`` (the Python functions) and ``compiled`` (their
    ``torch.compile`` wrappers, or None to run plain everywhere), and its printed ``mask_mod``
    (None without one) with ``mask_reads``: whether it reads (b, h). ``pick(r, n)`` chooses for a tile."""

    def __init__(self, plain: dict, compiled: dict | None, mask_mod=None, mask_reads=(False, False)):
        self.plain, self.compiled, self.mask_mod, self.mask_reads = plain, compiled, mask_mod, mask_reads

    def pick(self, r: int, n: int) -> dict:
        return self.compiled if self.compiled is not None and r > 1 and n > 1 else self.plain


def tensor_consts(values: list, like: torch.Tensor) -> list:
    """Constants as tensors (run-time values for a compiled function, never specialised on): ints
    and bools 0-d, floats of one element and one dimension (the tile functions view them as 0-d:
    dynamo reads a 0-d float64 input as a Python float, which it then specialises on)."""
    out = []
    for value in values:
        if isinstance(value, bool):
            out.append(torch.tensor(value))
        elif isinstance(value, int):
            out.append(torch.tensor(value, dtype=torch.int64))
        else:
            out.append(torch.tensor([value], dtype=_FLOAT_CONSTS))
    return out


def keep(fns, b, h, q_idx, piece, mask_buffers, mask_consts, cf):
    """The bool tile (Bk, Hk, r, N) of entries to keep, contiguous: False past KV_LEN and at padded
    slots; on PARTIAL columns the mask_mod, evaluated at its own broadcast shape. Bk is B where the
    mask reads ``b`` or the tiles differ per batch (else 1), Hk likewise: one shape per kernel
    signature, so the compiled tile functions see the same size-1 pattern in every piece."""
    n = piece.kv_idx.shape[-1]
    valid = piece.valid if piece.valid is not None else torch.ones(1, 1, 1, n, dtype=torch.bool)
    reads_b, reads_h = fns.mask_reads
    # (1, 1, ...) for shared tiles (full_cols per (b, h) where their classes differ), (Bm, Hm, ...) per (b, h)
    listed = piece.kv_idx.shape if piece.full_cols is None else piece.full_cols.shape
    shape = (b.shape[0] if reads_b else listed[0], h.shape[1] if reads_h else listed[1], q_idx.shape[2], n)
    out = valid.expand(shape).clone()
    for start, stop in piece.partial_runs if fns.mask_mod is not None else ():
        kept = torch.as_tensor(fns.mask_mod(b, h, q_idx, piece.kv_idx[..., start:stop], mask_buffers, mask_consts, cf))
        if piece.full_cols is not None:  # FULL for some (b, h): attended whole there
            kept = kept | piece.full_cols[..., start:stop]
        out[..., start:stop] &= kept
    return out


def _indices(B, Hq, row):
    return (torch.arange(B).view(B, 1, 1, 1), torch.arange(Hq).view(1, Hq, 1, 1),
            torch.arange(row.q_start, row.q_stop).view(1, 1, -1, 1))


@torch.no_grad()  # as inside the autograd.Function: compiled graphs guard on the grad mode
def forward(fns, q, k, v, rows, kv_block, scale, score_buffers, score_consts, mask_buffers, mask_consts):
    """As the eager module's ``forward``: (out (B, Hq, L, Ev), lse, max_scores (B, Hq, L))."""
    B, Hq, L, _ = q.shape
    group = Hq // k.shape[1]
    k_pad, v_pad = pad_to_tiles(k, kv_block), pad_to_tiles(v, kv_block)
    out = q.new_zeros(B, Hq, L, v.shape[-1])
    lse = q.new_full((B, Hq, L), NEG_INF)
    max_scores = q.new_full((B, Hq, L), NEG_INF)
    q = q * scale
    consts = tensor_consts(score_consts, q)
    buffers = [buf.detach() for buf in score_buffers]
    for row in rows:
        r = row.q_stop - row.q_start
        q_row = q[:, :, row.q_start:row.q_stop]
        b, h, q_idx = _indices(B, Hq, row)
        row_max = q.new_full((B, Hq, r), NEG_INF)
        row_sum = q.new_zeros(B, Hq, r)
        acc = None
        for piece in row.pieces:
            tile = fns.pick(r, piece.kv_idx.shape[-1])
            kept = keep(fns, b, h, q_idx, piece, mask_buffers, mask_consts, q.dtype)
            s = query_key(q_row, gather(k_pad, piece, kv_block, group))
            x, new_max = tile["tile_scores"](s, b, h, q_idx, piece.kv_idx, kept, row_max, buffers, consts)
            p, row_sum, rescale = tile["update"](x, row_max, new_max, row_sum)
            pv = weights_value(p, gather(v_pad, piece, kv_block, group))
            acc = pv if acc is None else pv.add_(acc * rescale.unsqueeze(-1))
            row_max = new_max
        rows_out = slice(row.q_start, row.q_stop)
        empty = row_max == NEG_INF
        out[:, :, rows_out] = torch.where(empty.unsqueeze(-1), 0.0, acc / row_sum.unsqueeze(-1))
        lse[:, :, rows_out] = torch.where(empty, NEG_INF, row_max + torch.log(row_sum))
        max_scores[:, :, rows_out] = row_max
    return out, lse, max_scores


@torch.no_grad()
def backward(fns, q, k, v, out, lse, grad_out, grad_lse, rows, kv_block, scale, score_buffers, grad_buffer_slots,
             score_consts, mask_buffers, mask_consts):
    """As the eager module's ``backward``: (grad_q, grad_k, grad_v, [grads of the slotted buffers])."""
    B, Hq, L, _ = q.shape
    group = Hq // k.shape[1]
    k_pad, v_pad = pad_to_tiles(k, kv_block), pad_to_tiles(v, kv_block)
    grad_q = torch.zeros_like(q)
    grad_k, grad_v = torch.zeros_like(k_pad), torch.zeros_like(v_pad)
    slots = list(grad_buffer_slots)
    grad_buffers = [torch.zeros_like(score_buffers[i]) for i in slots]
    delta = (grad_out * out).sum(dim=-1)
    if grad_lse is not None:  # d lse / d s = P: the lse's gradient folds into delta
        delta = delta - torch.where(lse == NEG_INF, 0.0, grad_lse)
    safe_lse = torch.where(lse == NEG_INF, 0.0, lse)
    q = q * scale
    consts = tensor_consts(score_consts, q)
    buffers = [buf.detach() for buf in score_buffers]
    for row in rows:
        rows_in = slice(row.q_start, row.q_stop)
        q_row, grad_out_row = q[:, :, rows_in], grad_out[:, :, rows_in]
        b, h, q_idx = _indices(B, Hq, row)
        for piece in row.pieces:
            tile = fns.pick(row.q_stop - row.q_start, piece.kv_idx.shape[-1])
            kept = keep(fns, b, h, q_idx, piece, mask_buffers, mask_consts, q.dtype)
            k_chunk, v_chunk = gather(k_pad, piece, kv_block, group), gather(v_pad, piece, kv_block, group)
            p, grad_s, grads = tile["tile_grad"](
                query_key(q_row, k_chunk), query_key(grad_out_row, v_chunk), safe_lse[:, :, rows_in],
                delta[:, :, rows_in], b, h, q_idx, piece.kv_idx, kept, buffers, slots, consts)
            scatter_add(grad_v, grad_chunk(p, grad_out_row, v_chunk.shape[1]), piece, kv_block, group)
            grad_q[:, :, rows_in] += weights_value(grad_s, k_chunk)
            scatter_add(grad_k, grad_chunk(grad_s, q_row, k_chunk.shape[1]), piece, kv_block, group)
            for total, grad in zip(grad_buffers, grads):
                total += grad
    S = k.shape[2]
    return grad_q.mul_(scale), grad_k[:, :, :S], grad_v[:, :, :S], grad_buffers
