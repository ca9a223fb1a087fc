"""Block-sparse attention on torch's fused CPU flash-attention kernel.

Without a score_mod, attention restricted to a set of FULL tiles is plain
softmax attention, which torch's fused kernel (the one behind SDPA on CPU,
``_scaled_dot_product_flash_attention_for_cpu``) computes in one C++ pass,
returning its log-sum-exp. So this path:

* covers the BlockMask's FULL tiles with few, large rectangles (boxes of a
  quadtree over the tile matrix or runs along its rows, whichever are fewer,
  neighbours merged) and runs each rectangle as one fused call, with no mask;
* gathers the FULL tiles of rows where they are scattered (several short runs: a top-k block
  selection) into one key sequence per row, rows of equal counts batched into one call, the
  query heads of a KV head stacked as rows (``gathered``);
* runs the PARTIAL tiles as batches of single tiles (a tile's queries against
  its keys), the mask_mod evaluated into an additive 0 / -inf mask; tiles of
  one q-row go to different batches, so each batch updates a row once;
* runs PARTIAL tiles whose mask is a few rectangles and causal triangles
  (``subtiles``: a window edge off the tile diagonal, a sink column) as those
  pieces, batched by shape, with no mask;
* merges every result into the output by its log-sum-exp: online softmax at
  the granularity of rectangles and tile batches. EMPTY tiles are never read.

The backward runs the fused backward kernel on the same rectangles and
batches with the *final* output and lse (which is what flash-attention's
backward needs per block) and adds up the gradients.

Aligned squares of tiles that are exactly causal triangles (``fused_plan.triangle_squares``)
run in the kernel's causal mode, on reversed sequences for ``q <= kv`` triangles.

A score_mod that adds a separable bias (``flexattn.analysis.separable``:
ALiBi, linear position biases, per-key tables) runs here too: in rectangles
and causal squares (of at most ``MAX_BIASED_SQUARE`` tiles) the row factors
become extra head-dim features of q and the column factors extra features of
k (so the kernel's q.k adds the bias), row-only terms shift the lse; in
PARTIAL tiles the bias goes into the additive mask.

The torch back end takes these paths (``fused_documents``, ``fused_tiles`` in
``codegen.torch_backend.paths``) when the score_mod is absent or separable
(with no buffer needing a gradient), head dims of q/k/v are equal, max_scores
is not requested (the fused kernel does not return it) (``fused_paths.why_not_fused``),
and the plan is one the fused kernel is fast on (``fused_plan.why_not_pays``: its FULL area in
tall rectangles or wide strips, and an estimated cost below the generated loop's).
"""

from __future__ import annotations

from functools import cached_property

import torch

from codegen.torch_backend import fused_plan, gathered
from codegen.torch_backend.fused_plan import PlanUnit, chunks, evaluate_on_tiles, tile_env
from flexattn.block_mask import UPPER
from flexattn.lse import merge

NEG_INF = float("-inf")
MAX_BIAS_SPAN = 2.0 ** 16  # |row factor| x span of a column factor: beyond, fp32 features lose digits
# Causal squares with a separable bias, at most this many tiles a side: a square's bias features are
# relative to one column, but each row's largest weights sit at its own diagonal, so the features there
# grow with the side, and with them the rounding error (measured in docs/performance.md).
MAX_BIASED_SQUARE = 2
FEATURE_ALIGN = 8  # extra head-dim features are padded to a multiple of this

_fused_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_fused_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def packed_head_dim(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride in its last dim. torch's fused CPU kernel reads q, k, v and out as if
    their head dim had stride 1, with no check: a key stored (B, H, E, S) and viewed (B, H, S, E), or
    a head dim expanded from size 1, gives a wrong result, no error (docs/architecture.md)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def fused_forward(q, k, v, *args, **kwargs):
    """torch's fused CPU forward on (q, k, v) with packed head dims: ``(out, lse)``."""
    return _fused_forward(packed_head_dim(q), packed_head_dim(k), packed_head_dim(v), *args, **kwargs)


def _backward(grad_out, q, k, v, out, lse, *args, **kwargs):
    return _fused_backward(*map(packed_head_dim, (grad_out, q, k, v, out)), lse, *args, **kwargs)



class Features:
    """A separable bias evaluated for one call: per product term a row factor (B, Hq, L) and a
    column factor (B, Hq, S), and the row-only terms (B, Hq, L); all float64."""

    def __init__(self, bias, score_buffers, B: int, Hq: int, L: int, S: int):
        b, h = torch.arange(B).view(-1, 1, 1), torch.arange(Hq).view(1, -1, 1)
        rows_env = {"b": b, "h": h, "q_idx": torch.arange(L).view(1, 1, -1)}
        cols_env = {"b": b, "h": h, "kv_idx": torch.arange(S).view(1, 1, -1)}
        self.bias, self.score_buffers = bias, score_buffers
        self.rows = [(t.sign * bias.factor(t.rows, rows_env, score_buffers)).expand(B, Hq, L)
                     for t in bias.products]
        self.columns = [bias.factor(t.columns, cols_env, score_buffers).expand(B, Hq, S) for t in bias.products]
        self.row_only = bias.row_only(rows_env, score_buffers).expand(B, Hq, L)
        self._span: float | None = None

    def span(self) -> float:
        """The largest |row factor| x (range of its column factor): how big the features get."""
        if self._span is None:
            self._span = max((float(r.abs().max() * (c.max() - c.min())) for r, c in zip(self.rows, self.columns)),
                             default=0.0)
        return self._span


class FusedInputs:
    """The tensors of one call in the compute float: q (B, Hq, L, E), K/V per KV head (``k_heads``,
    ``v_heads``), and per unit of query heads as ``unit_keys`` gives them (GQA)."""

    def __init__(self, q, k, v, block, scale, mask_graph, mask_buffers, features: Features | None = None):
        group = q.shape[1] // k.shape[1]
        q, k, v = map(packed_head_dim, (q, k, v))  # once per call, not per rectangle (``fused_forward``)
        self.q, self.k_heads, self.v_heads = q, k, v
        self.group, self.block, self.scale = group, block, scale
        self.mask_graph, self.mask_buffers = mask_graph, mask_buffers
        self.features = features
        self.L, self.S = q.shape[2], k.shape[2]

    def unit_keys(self, unit: PlanUnit) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (Bu, Hu, S, E) of the unit's query heads: where they share one KV head, that head
        as a view with head stride 0 (the fused kernel reads heads by their strides), else K/V
        expanded to every query head, copied once per call."""
        h = unit.h
        if self.group == 1:
            return self.k_heads[unit.b, h], self.v_heads[unit.b, h]
        if h.start // self.group == (h.stop - 1) // self.group:
            one = slice(h.start // self.group, h.start // self.group + 1)
            return tuple(x[unit.b, one].expand(-1, h.stop - h.start, -1, -1) for x in (self.k_heads, self.v_heads))
        return tuple(x[unit.b, h] for x in self._expanded)

    def gathered_keys(self, unit: PlanUnit) -> gathered.UnitKeys:
        """K/V as the unit's gathered calls read them (``gathered.UnitKeys``)."""
        return gathered.UnitKeys(*self.unit_keys(unit), self.k_heads, self.v_heads, unit.b, unit.h, self.group)

    @cached_property
    def _expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(x.repeat_interleave(self.group, dim=1) for x in (self.k_heads, self.v_heads))

    def rectangle(self, unit: PlanUnit, rows: slice, cols: slice):
        """(q, k, v) of a rectangle for the fused kernel, and the shift its lse needs (or None).

        With a separable bias, q gains the row factors (divided by the scale, which the
        kernel multiplies back) and k the column factors minus their value at a reference
        column; what that subtraction and the row-only terms take off every score of a row
        is added back to the lse. The reference is the column where the bias is largest, so
        the features are small where the weights are (fp32 keeps their digits).
        """
        (k, v), q = self.unit_keys(unit), self.q[unit.b, unit.h]
        q, k, v = q[:, :, rows], k[:, :, cols], v[:, :, cols]
        if self.features is None:
            return q, k, v, None
        f = self.features
        shift = f.row_only[unit.b, unit.h, rows].clone()
        if not f.rows:  # only row terms: softmax is unchanged, the lse shifts
            return q, k, v, shift.to(q.dtype)
        q_extra, k_extra = [], []
        for row, column in zip(f.rows, f.columns):
            row, column = row[unit.b, unit.h, rows], column[unit.b, unit.h, cols]
            rises = row.mean(-1, keepdim=True) >= 0  # per (b, h): is row * column largest at the largest column?
            reference = torch.where(rises, column.amax(-1, keepdim=True), column.amin(-1, keepdim=True))
            q_extra.append(row / self.scale)
            k_extra.append(column - reference)
            shift += row * reference
        pad = -(len(q_extra)) % FEATURE_ALIGN
        q = torch.cat([q, torch.stack(q_extra, -1).to(q.dtype), q.new_zeros(*q.shape[:-1], pad)], -1)
        k = torch.cat([k, torch.stack(k_extra, -1).to(k.dtype), k.new_zeros(*k.shape[:-1], pad)], -1)
        v = torch.cat([v, v.new_zeros(*v.shape[:-1], len(q_extra) + pad)], -1)
        return q, k, v, shift.to(q.dtype)

    def rows(self, rect):
        q_block, kv_block = self.block
        return (slice(rect[0] * q_block, min(rect[1] * q_block, self.L)),
                slice(rect[2] * kv_block, min(rect[3] * kv_block, self.S)))

    def tile_mask(self, unit: PlanUnit, tiles: torch.Tensor, Bu: int) -> torch.Tensor:
        """Bool (B_u * P, H_u or 1, q_block, kv_block), laid out like ``_tiles_of``: the mask_mod on
        the tiles, False out of range."""
        env, keep = tile_env(unit.b, unit.h, tiles, self.block, self.L, self.S)
        if self.mask_graph is not None:
            keep = evaluate_on_tiles(self.mask_graph, env, self.mask_buffers).to(torch.bool) & keep
        keep = keep.expand(Bu, -1, len(tiles), -1, -1)  # (B_u, H_u or 1, P, q_block, kv_block)
        return keep.transpose(1, 2).reshape(Bu * len(tiles), keep.shape[1], *keep.shape[3:])

    def tile_bias(self, unit: PlanUnit, tiles: torch.Tensor, keep: torch.Tensor, dtype) -> torch.Tensor:
        """The fused kernel's additive mask for a batch of tiles: -inf where not kept, else the
        score_mod's bias (the score_mod of a zero score), laid out like ``tile_mask``."""
        if self.features is None:
            return _bias(keep, dtype)
        q_block, kv_block = self.block
        Bu = keep.shape[0] // len(tiles)
        env, _ = tile_env(unit.b, unit.h, tiles, self.block, self.L, self.S)
        env["score"] = torch.zeros((), dtype=dtype)
        bias = evaluate_on_tiles(self.features.bias.graph, env, self.features.score_buffers).to(dtype)
        bias = bias.expand(Bu, bias.shape[1], len(tiles), q_block, kv_block)
        bias = bias.transpose(1, 2).reshape(Bu * len(tiles), bias.shape[1], q_block, kv_block)
        return torch.where(keep, bias, NEG_INF)


def _flipper(kind: int | None):
    """An UPPER triangle (q <= kv) is a causal one on both sequences reversed (LOWER, or None
    for a rectangle: as it is)."""
    return (lambda x: x.flip(2)) if kind == UPPER else (lambda x: x)


def _tiles_of(x: torch.Tensor, block: int, index: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> the tiles ``index`` as a batch (B * P, H, block, D) (zero rows past N)."""
    B, H, N, D = x.shape
    if N % block == 0:
        picked = x.view(B, H, -1, block, D).index_select(2, index)  # (B, H, P, block, D)
    else:  # a ragged last tile: only the picked tiles are padded (padding x would copy all of it)
        positions = index.view(-1, 1) * block + torch.arange(block)
        picked = x.index_select(2, positions.clamp(max=N - 1).flatten()).view(B, H, len(index), block, D)
        picked.masked_fill_((positions >= N).view(1, 1, len(index), block, 1), 0.0)
    return picked.transpose(1, 2).reshape(B * len(index), H, block, D)


def _positions(tiles: torch.Tensor, block: int, lo: int, hi: int, reverse: bool) -> torch.Tensor:
    """Flat positions lo..hi of each tile (P,) (hi - 1 down to lo with ``reverse``): (P * (hi - lo),)."""
    index = tiles.view(-1, 1) * block + torch.arange(lo, hi)
    return (index.flip(-1) if reverse else index).flatten()


def _gather(x: torch.Tensor, positions: torch.Tensor, P: int) -> torch.Tensor:
    """(B, H, N, D) at ``positions`` of P tiles -> a batch (B * P, H, n, D) (a view for B = 1)."""
    B, H, _, D = x.shape
    picked = x.index_select(2, positions).view(B, H, P, -1, D).transpose(1, 2)
    return picked[0] if B == 1 else picked.reshape(B * P, H, -1, D)


def _scatter_layout(x: torch.Tensor, B: int) -> torch.Tensor:
    """A batch (B * P, H, n, ...) -> (B, H, P * n, ...), matching ``_positions``."""
    x = x.view(B, -1, *x.shape[1:]).transpose(1, 2)
    return x.reshape(*x.shape[:2], -1, *x.shape[4:])


def _subtile_calls(q, k, v, block, unit: PlanUnit):
    """Per batch of cut PARTIAL tiles (``subtiles``): (group, q rows' positions, gathered q / k / v).
    An UPPER triangle's positions run backwards: the kernel's causal mode then keeps it."""
    q_block, kv_block = block
    for g in unit.subtiles:
        reverse = g.kind == UPPER
        for tiles in g.batches:
            rows = _positions(tiles[:, 0], q_block, g.r0, g.r1, reverse)
            cols = _positions(tiles[:, 1], kv_block, g.c0, g.c1, reverse)
            yield g, rows, cols, _gather(q, rows, len(tiles)), _gather(k, cols, len(tiles)), _gather(v, cols, len(tiles))


def _from_tiles(x: torch.Tensor, B: int) -> torch.Tensor:
    """(B * P, H, block, ...) -> (B, H, P, block, ...)."""
    return x.view(B, -1, *x.shape[1:]).transpose(1, 2)


def _bias(keep: torch.Tensor, dtype) -> torch.Tensor:
    """The fused kernel's additive mask: 0 where kept, -inf elsewhere (it takes no bool masks)."""
    return torch.where(keep, 0.0, NEG_INF).to(dtype)


def forward(p: FusedInputs, units: list[PlanUnit]) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, L, D) and lse (B, Hq, L); rows that attend nowhere give 0 and -inf."""
    B, Hq, L, D = p.q.shape
    q_block, kv_block = p.block
    padded = L + (-L % q_block)  # whole q tiles, so a batch of tiles writes through views
    out = p.q.new_zeros(B, Hq, padded, D)
    lse = p.q.new_full((B, Hq, padded), NEG_INF)
    for unit in units:
        (k, v), q = p.unit_keys(unit), p.q[unit.b, unit.h]
        out_u, lse_u = out[unit.b, unit.h], lse[unit.b, unit.h]  # views: merged in place
        written = torch.zeros(out.shape[2], dtype=torch.bool)  # positions with a result so far
        tiles_written = written.view(-1, q_block)
        for r0, r1, c0, c1, causal in unit.segments:  # rectangles and causal squares in positions
            rows, cols = slice(r0, r1), slice(c0, c1)
            o, l = fused_forward(q[:, :, rows], k[:, :, cols], v[:, :, cols], is_causal=causal, scale=p.scale)
            merge(out_u[:, :, rows], lse_u[:, :, rows], o, l, first=not bool(written[rows].any()))
            written[rows] = True
        # Exactly causal triangles run in the kernel's own causal mode; then rectangles of FULL tiles.
        for rect, kind in unit.pieces():
            rows, cols = p.rows(rect)
            q_r, k_r, v_r, shift = p.rectangle(unit, rows, cols)
            flip = _flipper(kind)
            o, l = fused_forward(flip(q_r), flip(k_r), flip(v_r), is_causal=kind is not None, scale=p.scale)
            o, l = flip(o), flip(l.unsqueeze(-1)).squeeze(-1)
            o, l = (o, l) if shift is None else (o[..., :D].contiguous(), l + shift)
            merge(out_u[:, :, rows], lse_u[:, :, rows], o, l, first=not bool(written[rows].any()))
            written[rows] = True
        keys = p.gathered_keys(unit) if unit.gathered else None
        for batch in unit.gathered:  # rows of scattered FULL tiles, their keys gathered
            o, l = gathered.forward(batch, _tiles_of(q, q_block, batch.rows), keys, kv_block, p.scale, fused_forward)
            gathered.merge_rows(out_u, lse_u, batch.rows, o, l, q_block, not bool(tiles_written[batch.rows].any()))
            tiles_written[batch.rows] = True
        Bu, Hu = q.shape[:2]
        for g, rows, _, q_s, k_s, v_s in _subtile_calls(q, k, v, p.block, unit):
            o, l = fused_forward(q_s, k_s, v_s, is_causal=g.kind is not None, scale=p.scale)
            o, l = _scatter_layout(o, Bu), _scatter_layout(l, Bu)
            if bool(written[rows].any()):
                picked_o, picked_l = out_u.index_select(2, rows), lse_u.index_select(2, rows)
                merge(picked_o, picked_l, o, l)
                o, l = picked_o, picked_l
            out_u.index_copy_(2, rows, o)
            lse_u.index_copy_(2, rows, l)
            written[rows] = True
        for batch in unit.batches:
            for tiles in chunks(batch, Bu * Hu * q_block * kv_block):
                keep = p.tile_mask(unit, tiles, Bu)
                o, l = fused_forward(_tiles_of(q, q_block, tiles[:, 0]), _tiles_of(k, kv_block, tiles[:, 1]),
                                _tiles_of(v, kv_block, tiles[:, 1]), attn_mask=p.tile_bias(unit, tiles, keep, q.dtype),
                                scale=p.scale)
                # A row that keeps nothing in its tile has lse -inf (the kernel reports 0).
                o, l = _from_tiles(o, Bu), _from_tiles(torch.where(keep.any(-1), l, NEG_INF), Bu)
                out_t, lse_t = out_u.unflatten(2, (-1, q_block)), lse_u.unflatten(2, (-1, q_block))
                picked_o, picked_l = out_t[:, :, tiles[:, 0]], lse_t[:, :, tiles[:, 0]]
                merge(picked_o, picked_l, o, l, first=not bool(tiles_written[tiles[:, 0]].any()))
                tiles_written[tiles[:, 0]] = True
                out_t[:, :, tiles[:, 0]], lse_t[:, :, tiles[:, 0]] = picked_o, picked_l
    return out[:, :, :L], lse[:, :, :L]


def backward(p: FusedInputs, units: list[PlanUnit], out, lse, grad_out):
    """dq (B, Hq, L, D) and dk, dv (B, Hq, S, D) per query head, from the final out and lse."""
    B, Hq, L, D = p.q.shape
    q_block, kv_block = p.block
    # Rows that attend nowhere: lse +inf makes every weight exp(s - lse) zero.
    lse = torch.where(lse == NEG_INF, float("inf"), lse)
    dq = p.q.new_zeros(B, Hq, L + (-L % q_block), D)
    dk = p.q.new_zeros(B, Hq, p.S + (-p.S % kv_block), D)
    dv = torch.zeros_like(dk)
    for unit in units:
        (k, v), (q, o, go) = p.unit_keys(unit), (x[unit.b, unit.h] for x in (p.q, out, grad_out))
        l_u = lse[unit.b, unit.h]
        dq_u, dk_u, dv_u = (x[unit.b, unit.h] for x in (dq, dk, dv))
        for r0, r1, c0, c1, causal in unit.segments:
            rows, cols = slice(r0, r1), slice(c0, c1)
            gq, gk, gv = _backward(go[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols], o[:, :, rows],
                                   l_u[:, :, rows], 0.0, causal, scale=p.scale)
            dq_u[:, :, rows] += gq
            dk_u[:, :, cols] += gk
            dv_u[:, :, cols] += gv
        for rect, kind in unit.pieces():
            rows, cols = p.rows(rect)
            q_r, k_r, v_r, shift = p.rectangle(unit, rows, cols)
            extra = q_r.shape[-1] - D  # the bias features: zero columns in out and grad_out
            pad = (lambda x: torch.nn.functional.pad(x, (0, extra))) if extra else (lambda x: x)
            l_r = l_u[:, :, rows] if shift is None else l_u[:, :, rows] - shift
            flip = _flipper(kind)
            gq, gk, gv = _backward(flip(pad(go[:, :, rows])), flip(q_r), flip(k_r), flip(v_r),
                                   flip(pad(o[:, :, rows])), flip(l_r.unsqueeze(-1)).squeeze(-1), 0.0,
                                   kind is not None, scale=p.scale)
            dq_u[:, :, rows] += flip(gq)[..., :D]
            dk_u[:, :, cols] += flip(gk)[..., :D]
            dv_u[:, :, cols] += flip(gv)[..., :D]
        keys = p.gathered_keys(unit) if unit.gathered else None
        for batch in unit.gathered:
            tiles = (_tiles_of(go, q_block, batch.rows), _tiles_of(q, q_block, batch.rows),
                     _tiles_of(o, q_block, batch.rows), _tiles_of(l_u.unsqueeze(-1), q_block, batch.rows).squeeze(-1))
            gathered.backward(batch, tiles, keys, (dq_u, dk_u, dv_u), p.block, p.scale, _backward)
        Bu, Hu = q.shape[:2]
        for g, rows, cols, q_s, k_s, v_s in _subtile_calls(q, k, v, p.block, unit):
            P = q_s.shape[0] // Bu
            go_s, o_s = _gather(go, rows, P), _gather(o, rows, P)
            l_s = _gather(l_u.unsqueeze(-1), rows, P).squeeze(-1)
            gq, gk, gv = _backward(go_s, q_s, k_s, v_s, o_s, l_s, 0.0, g.kind is not None, scale=p.scale)
            dq_u.index_add_(2, rows, _scatter_layout(gq, Bu))
            dk_u.index_add_(2, cols, _scatter_layout(gk, Bu))
            dv_u.index_add_(2, cols, _scatter_layout(gv, Bu))
        for batch in unit.batches:
            for tiles in chunks(batch, Bu * Hu * q_block * kv_block):
                q_rows, kv_cols = tiles[:, 0], tiles[:, 1]
                lse_t = _tiles_of(l_u.unsqueeze(-1), q_block, q_rows).squeeze(-1)
                gq, gk, gv = _backward(
                    _tiles_of(go, q_block, q_rows), _tiles_of(q, q_block, q_rows), _tiles_of(k, kv_block, kv_cols),
                    _tiles_of(v, kv_block, kv_cols), _tiles_of(o, q_block, q_rows), lse_t, 0.0, False,
                    attn_mask=p.tile_bias(unit, tiles, p.tile_mask(unit, tiles, Bu), q.dtype), scale=p.scale)
                dq_u.unflatten(2, (-1, q_block)).index_add_(2, q_rows, _from_tiles(gq, Bu))
                dk_u.unflatten(2, (-1, kv_block)).index_add_(2, kv_cols, _from_tiles(gk, Bu))
                dv_u.unflatten(2, (-1, kv_block)).index_add_(2, kv_cols, _from_tiles(gv, Bu))
    return dq[:, :, :L], dk[:, :, :p.S], dv[:, :, :p.S]


def with_lse_column(q, k, v, out, grad_out, grad_lse, lse):
    """q, k, v, out, grad_out with one more head-dim column that carries the lse's gradient.

    The fused backward takes dS = P * (dO V^T - rowsum(dO * O)); the lse adds P * dLSE. A zero
    column in q, k and v leaves scores and dO V^T as they are, while out = 1 and dO = -dLSE
    there add -dLSE to rowsum(dO * O). The extra column of each gradient is dropped after.
    """
    zero = lambda x: torch.nn.functional.pad(x, (0, 1))  # noqa: E731
    lse_grad = torch.where(lse == NEG_INF, 0.0, grad_lse).to(out.dtype)
    out = torch.cat([out, torch.ones_like(out[..., :1])], -1)
    grad_out = torch.cat([grad_out, -lse_grad.unsqueeze(-1)], -1)
    return zero(q), zero(k), zero(v), out, grad_out
