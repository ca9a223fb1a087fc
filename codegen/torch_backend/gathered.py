"""FULL tiles scattered along their query row, gathered into one key sequence per row.

A row of tiles whose FULL tiles form several runs (a top-k block selection, as native sparse
attention makes) would be one fused call per run, each of one q tile against a few key tiles: the calls'
fixed cost, not their arithmetic, is then the time. Here the FULL tiles of such rows are
gathered: the rows with n of them form one batch, each row's q tile against its n key tiles
copied into one sequence of n * kv_block keys, one call of torch's fused kernel with no mask,
merged into the row's output by its lse (a row appears once in a batch).

With grouped-query attention, where a unit serves whole groups of query heads (they share one
tile matrix), the G query heads of a KV head enter as one head's G * q_block rows against that KV
head's keys, not the keys expanded to every query head: a G times smaller gather, and matmuls of
G times more rows. Without a mask the rows of a softmax are independent, so stacking them is exact.

Only whole KV tiles are gathered (a ragged last tile stays a rectangle: its keys past KV_LEN do not
exist), and only without a score_mod (its bias would need features per gathered key).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexattn.lse import merge

MIN_RUNS = 2  # a row's short FULL rectangles, this many or more, are gathered (one is a view already)
SHORT = 4  # rectangles fewer q tiles tall than this are short (taller ones are large calls as views)


@dataclass(frozen=True)
class GatheredRows:
    """A batch of q-tile ``rows`` (P,), each with the same number n of FULL kv tiles ``columns`` (P, n)."""

    rows: torch.Tensor
    columns: torch.Tensor


def gather_scattered(rectangles: list, whole_kv_tiles: int) -> tuple[list, list[GatheredRows]]:
    """(the rectangles left, the batches gathered) from a unit's FULL rectangles (q0, q1, k0, k1)
    in tiles. A row crossed by ``MIN_RUNS`` or more short rectangles (fewer than ``SHORT`` tiles
    tall) is gathered; every rectangle of whole KV tiles whose rows are all gathered leaves the plan
    and its tiles go to those rows' lists (each gathered row is then one call, whatever else it
    has), the others stay."""
    crossing: dict[int, int] = {}
    for q0, q1, _, _ in rectangles:
        if q1 - q0 < SHORT:
            for row in range(q0, q1):
                crossing[row] = crossing.get(row, 0) + 1
    rows = {row for row, count in crossing.items() if count >= MIN_RUNS}
    moved = [r for r in rectangles if r[3] <= whole_kv_tiles and all(row in rows for row in range(r[0], r[1]))]
    if not moved:
        return rectangles, []
    columns: dict[int, list] = {}
    for q0, q1, k0, k1 in sorted(moved, key=lambda r: r[2]):
        for row in range(q0, q1):
            columns.setdefault(row, []).extend(range(k0, k1))
    by_count: dict[int, list] = {}
    for row in sorted(columns):
        by_count.setdefault(len(columns[row]), []).append(row)
    batches = [GatheredRows(torch.tensor(found), torch.tensor([columns[row] for row in found]))
               for _, found in sorted(by_count.items())]
    moved_set = set(moved)
    return [r for r in rectangles if r not in moved_set], batches


def products(batch: GatheredRows, q_block: int, kv_block: int) -> int:
    """Query-key products of one batch, per (batch row, head)."""
    return batch.columns.numel() * q_block * kv_block


def _key_positions(batch: GatheredRows, kv_block: int) -> torch.Tensor:
    """(P * n * kv_block,) the positions of each row's keys, row after row."""
    return (batch.columns.unsqueeze(-1) * kv_block + torch.arange(kv_block)).flatten()


def _keys(x: torch.Tensor, positions: torch.Tensor, P: int) -> torch.Tensor:
    """(B, H, S, D) at ``positions`` (P rows of keys) -> (B * P, H, n * kv_block, D)."""
    B, H, _, D = x.shape
    return x.index_select(2, positions).view(B, H, P, -1, D).transpose(1, 2).reshape(-1, H, positions.numel() // P, D)


def _stack(x: torch.Tensor, group: int) -> torch.Tensor:
    """(N, Hu, rows, ...) -> (N, Hu / group, group * rows, ...): a KV head's query heads as one head's rows."""
    return x.reshape(x.shape[0], x.shape[1] // group, group * x.shape[2], *x.shape[3:])


def _unstack(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(x.shape[0], heads, -1, *x.shape[3:])


class UnitKeys:
    """One unit's K/V as the gathered calls read them: per KV head where ``group`` > 1 and the unit
    serves whole groups of query heads (``k_heads``/``v_heads`` (B, Hkv, S, E)), else the unit's
    own (``k_unit``/``v_unit`` (Bu, Hu, S, E), one per query head)."""

    def __init__(self, k_unit, v_unit, k_heads, v_heads, b: slice, h: slice, group: int):
        if group > 1 and h.start % group == 0 and h.stop % group == 0:
            heads = slice(h.start // group, h.stop // group)
            self.k, self.v, self.group = k_heads[b, heads], v_heads[b, heads], group
        else:
            self.k, self.v, self.group = k_unit, v_unit, 1


def forward(batch: GatheredRows, q_tiles: torch.Tensor, keys: UnitKeys, kv_block: int, scale: float, fused_forward):
    """(out, lse) of a batch's rows: q_tiles (Bu * P, Hu, q_block, D) -> (Bu * P, Hu, q_block, Dv), (Bu * P, Hu, q_block)."""
    P, heads = len(batch.rows), q_tiles.shape[1]
    positions = _key_positions(batch, kv_block)
    o, l = fused_forward(_stack(q_tiles, keys.group), _keys(keys.k, positions, P), _keys(keys.v, positions, P),
                         scale=scale)
    return _unstack(o, heads), _unstack(l, heads)


def backward(batch: GatheredRows, tiles: tuple, keys: UnitKeys, grads: tuple, block, scale: float, fused_backward):
    """Adds a batch's gradients into the unit's dq (Bu, Hu, L_pad, D), dk and dv (Bu, Hu, S_pad, D),
    ``grads``; with stacked heads a KV head's dk/dv go to the first query head of its group (the
    caller sums each group). ``tiles``: (grad_out, q, out, lse) of the batch's rows as
    (Bu * P, Hu, q_block, ...)."""
    (q_block, kv_block), (dq_u, dk_u, dv_u) = block, grads
    P, heads = len(batch.rows), tiles[1].shape[1]
    positions = _key_positions(batch, kv_block)
    grad_out, q, out, lse = (_stack(t, keys.group) for t in tiles)
    k, v = _keys(keys.k, positions, P), _keys(keys.v, positions, P)
    dq, dk, dv = fused_backward(grad_out, q, k, v, out, lse, 0.0, False, scale=scale)
    Bu = dq_u.shape[0]
    dq = _unstack(dq, heads).view(Bu, P, heads, q_block, -1).transpose(1, 2)  # (Bu, Hu, P, q_block, D)
    dq_u.unflatten(2, (-1, q_block)).index_add_(2, batch.rows, dq)
    for grad, into in ((dk, dk_u), (dv, dv_u)):
        grad = grad.view(Bu, P, *grad.shape[1:]).transpose(1, 2).reshape(Bu, grad.shape[1], -1, grad.shape[-1])
        into[:, ::keys.group].index_add_(2, positions, grad)


def merge_rows(out_u: torch.Tensor, lse_u: torch.Tensor, rows: torch.Tensor, o, l, q_block: int, first: bool):
    """Merge a batch's (Bu * P, Hu, q_block, ...) results into the unit's out (Bu, Hu, L_pad, D) and lse."""
    Bu = out_u.shape[0]
    o, l = (x.view(Bu, -1, *x.shape[1:]).transpose(1, 2) for x in (o, l))  # (Bu, Hu, P, q_block, ...)
    out_t, lse_t = out_u.unflatten(2, (-1, q_block)), lse_u.unflatten(2, (-1, q_block))
    picked_o, picked_l = out_t[:, :, rows], lse_t[:, :, rows]
    merge(picked_o, picked_l, o, l, first=first)
    out_t[:, :, rows], lse_t[:, :, rows] = picked_o, picked_l
