"""create_block_mask: the BlockMask of a mask_mod, from the IR, in O(tiles).

1. ``intervals.evaluate_ranges`` decides every tile at once: always true,
   always false, or unknown.
2. Unknown tiles are split into sub-tiles and decided again from those
   ranges; what is still unknown is evaluated densely, only inside those
   tiles, in bounded chunks (``exact=False`` skips both and keeps them
   PARTIAL, which is safe).
3. Classes follow torch exactly: a tile is FULL when every position of the
   padded tile is true (so a ragged edge tile is never FULL), EMPTY when no
   in-range position is true, PARTIAL otherwise.
"""

from __future__ import annotations

import math

import torch

from flexattn import passes
from flexattn.analysis.intervals import Range, TileGrid, evaluate_ranges
from flexattn.block_mask import DEFAULT_BLOCK_SIZE, EMPTY, FULL, PARTIAL, BlockMask, _pair
from flexattn.errors import BlockMaskError
from flexattn.semantics import evaluate
from flexattn.trace import trace_mask_mod

REFINE_CHUNK_ELEMENTS = 1 << 22  # positions evaluated at once while refining: bounds memory


class _BufferRanges:
    """Range summaries of the mask's buffers: min/max of a 1-D buffer over any index range in O(1)."""

    def __init__(self, buffers):
        self.tables = []
        for buf in buffers:
            values = buf.detach().to("cpu").long().reshape(-1) if buf.dim() == 1 else None
            if values is None or values.numel() == 0:
                flat = buf.detach().to("cpu").long().reshape(-1)
                self.tables.append((int(flat.min()), int(flat.max())) if flat.numel() else (0, 0))
                continue
            mins, maxs = [values], [values]
            width = 1
            while 2 * width <= values.numel():  # sparse table: level k covers 2**k entries
                mins.append(torch.minimum(mins[-1][:-width], mins[-1][width:]))
                maxs.append(torch.maximum(maxs[-1][:-width], maxs[-1][width:]))
                width *= 2
            self.tables.append((mins, maxs))

    def __call__(self, index: int, ranges: list[Range]) -> Range:
        table = self.tables[index]
        if isinstance(table[0], int):
            return Range(torch.tensor(table[0]), torch.tensor(table[1]))
        mins, maxs = table
        n = mins[0].numel()
        lo, hi = (r.clamp(0, n - 1) for r in (ranges[0].lo, ranges[0].hi))
        lo, hi = torch.broadcast_tensors(lo, hi)
        level = torch.floor(torch.log2((hi - lo + 1).double())).long()
        out_lo, out_hi = torch.empty_like(lo), torch.empty_like(lo)
        for k in torch.unique(level).tolist():
            sel = level == k
            a, b = lo[sel], hi[sel] - (1 << k) + 1
            out_lo[sel] = torch.minimum(mins[k][a], mins[k][b])
            out_hi[sel] = torch.maximum(maxs[k][a], maxs[k][b])
        return Range(out_lo, out_hi)


def _axis(n: int, block: int, length: int, dim: int, ndim: int = 4) -> Range:
    start = torch.arange(n, dtype=torch.int64) * block
    shape = [1] * ndim
    shape[dim] = n
    return Range(start.view(shape), (start + block).clamp(max=length).sub(1).view(shape))


def _subdivide(graph, load_ranges, tiles: torch.Tensor, q_block, kv_block, Q_LEN, KV_LEN, parts=8) -> torch.Tensor:
    """Classes of undecided tiles from their sub-tiles' ranges; -1 where still undecided.

    A tile with one sub-tile always true and another always false is PARTIAL
    without looking at single positions (the diagonal of a causal mask).
    """
    q_sub, kv_sub = math.ceil(q_block / parts), math.ceil(kv_block / parts)
    n_q, n_kv = math.ceil(q_block / q_sub), math.ceil(kv_block / kv_sub)
    q_lo = tiles[:, 2].view(-1, 1, 1) * q_block + torch.arange(n_q).view(1, -1, 1) * q_sub
    kv_lo = tiles[:, 3].view(-1, 1, 1) * kv_block + torch.arange(n_kv).view(1, 1, -1) * kv_sub
    q_in, kv_in = q_lo < Q_LEN, kv_lo < KV_LEN
    q_lo, kv_lo = q_lo.clamp(max=Q_LEN - 1), kv_lo.clamp(max=KV_LEN - 1)
    grid = TileGrid(Range(tiles[:, 0].view(-1, 1, 1), tiles[:, 0].view(-1, 1, 1)),
                    Range(tiles[:, 1].view(-1, 1, 1), tiles[:, 1].view(-1, 1, 1)),
                    Range(q_lo, (q_lo + q_sub).clamp(max=Q_LEN).sub(1)),
                    Range(kv_lo, (kv_lo + kv_sub).clamp(max=KV_LEN).sub(1)))
    ranges = evaluate_ranges(graph, grid, load_ranges)
    in_range = q_in & kv_in
    lo, hi = (x.expand(in_range.shape) for x in (ranges.lo, ranges.hi))
    some_true = ((lo >= 1) & in_range).flatten(1).any(1)
    some_false = ((hi <= 0) & in_range).flatten(1).any(1)
    all_true = ((lo >= 1) | ~in_range).flatten(1).all(1)
    all_false = ((hi <= 0) | ~in_range).flatten(1).all(1)
    ragged = ((tiles[:, 2] + 1) * q_block > Q_LEN) | ((tiles[:, 3] + 1) * kv_block > KV_LEN)
    classes = torch.full((len(tiles),), -1, dtype=torch.int8)
    classes[some_true & (some_false | ragged)] = PARTIAL
    classes[all_true & ~ragged] = FULL
    classes[all_false] = EMPTY
    return classes


def _refine(graph, buffers, tiles: torch.Tensor, q_block, kv_block, Q_LEN, KV_LEN) -> torch.Tensor:
    """Exact classes of the given (b, h, q-tile, kv-tile) rows by dense evaluation."""
    classes = torch.empty(len(tiles), dtype=torch.int8)
    per_chunk = max(1, REFINE_CHUNK_ELEMENTS // (q_block * kv_block))
    q_off, kv_off = torch.arange(q_block).view(1, -1, 1), torch.arange(kv_block).view(1, 1, -1)
    for start in range(0, len(tiles), per_chunk):
        chunk = tiles[start:start + per_chunk]
        b, h = chunk[:, 0].view(-1, 1, 1), chunk[:, 1].view(-1, 1, 1)
        q = chunk[:, 2].view(-1, 1, 1) * q_block + q_off
        kv = chunk[:, 3].view(-1, 1, 1) * kv_block + kv_off
        in_range = (q < Q_LEN) & (kv < KV_LEN)
        env = {"b": b, "h": h, "q_idx": q.clamp(max=Q_LEN - 1), "kv_idx": kv.clamp(max=KV_LEN - 1)}
        keep = evaluate(graph, env, buffers).to(torch.bool) & in_range
        count = keep.sum(dim=(1, 2))
        cls = torch.full_like(count, PARTIAL, dtype=torch.int8)
        cls[count == 0] = EMPTY
        cls[count == q_block * kv_block] = FULL
        classes[start:start + per_chunk] = cls
    return classes


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=DEFAULT_BLOCK_SIZE,
                      *, exact: bool = True) -> BlockMask:
    """The BlockMask of ``mask_mod`` (same content as torch's ``create_block_mask``).

    Tiles are decided symbolically from the traced IR (affine index forms,
    interval rules, buffer range summaries); only tiles it cannot decide are
    evaluated densely. Cost is O(tiles) plus the undecided tiles' elements.

    Args:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
        B, H: batch and heads (None: 1, broadcast). Q_LEN, KV_LEN: sequence lengths.
        BLOCK_SIZE: an int or a (q, kv) pair. exact: False keeps undecided tiles PARTIAL.

    Returns a ``BlockMask`` with ``kv_num_blocks`` (B, H, ceil(Q_LEN/q_block)) etc.
    and ``stats`` saying how many tiles were decided symbolically and refined.

    Raises ``BlockMaskError`` for non-positive sizes, ``TraceError`` for a mod
    that cannot be traced or does not return bool.

    Example::

        >>> bm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 4096, 4096)
        >>> bm.kv_num_blocks.shape
        torch.Size([1, 1, 32])
    """
    B, H = 1 if B is None else B, 1 if H is None else H
    for name, n in (("B", B), ("H", H), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if not isinstance(n, int) or n <= 0:
            raise BlockMaskError(f"{name} must be a positive int, got {n!r}")
    q_block, kv_block = _pair(BLOCK_SIZE)
    traced = trace_mask_mod(mask_mod)
    deps = passes.depends_on(traced.graph)
    nb, nh = (B if "b" in deps else 1), (H if "h" in deps else 1)
    nq, nkv = math.ceil(Q_LEN / q_block), math.ceil(KV_LEN / kv_block)
    buffers = [t.detach().to("cpu") for t in traced.buffers]
    grid = TileGrid(_axis(nb, 1, nb, 0), _axis(nh, 1, nh, 1), _axis(nq, q_block, Q_LEN, 2), _axis(nkv, kv_block, KV_LEN, 3))
    load_ranges = _BufferRanges(buffers)
    decided = evaluate_ranges(traced.graph, grid, load_ranges)
    lo, hi = (x.expand(nb, nh, nq, nkv) for x in (decided.lo, decided.hi))
    ragged = torch.zeros(nq, nkv, dtype=torch.bool)
    ragged[-1, :] |= Q_LEN % q_block != 0
    ragged[:, -1] |= KV_LEN % kv_block != 0
    classes = torch.full((nb, nh, nq, nkv), PARTIAL, dtype=torch.int8)
    classes[(lo >= 1) & ~ragged] = FULL
    classes[hi <= 0] = EMPTY
    unknown = (lo < 1) & (hi > 0)
    unknown_tiles = unknown.nonzero()
    refined = 0
    if exact and len(unknown_tiles):
        exact_classes = _subdivide(traced.graph, load_ranges, unknown_tiles, q_block, kv_block, Q_LEN, KV_LEN)
        still = exact_classes < 0
        refined = int(still.sum())
        if refined:
            exact_classes[still] = _refine(traced.graph, buffers, unknown_tiles[still], q_block, kv_block, Q_LEN, KV_LEN)
        classes[unknown] = exact_classes
    total = classes.numel()
    classes = classes.expand(B, H, nq, nkv)
    block_mask = BlockMask.from_tile_classes(classes.to(device), (q_block, kv_block), (Q_LEN, KV_LEN), mask_mod)
    block_mask.traced_mask = traced
    block_mask.stats = {"tiles": total, "decided_symbolically": total - refined if exact else total - len(unknown_tiles),
                        "refined": refined,
                        "left_partial": 0 if exact else len(unknown_tiles), "depends_on": sorted(deps)}
    return block_mask

