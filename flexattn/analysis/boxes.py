"""Boxes of index space, decided from their ranges or, when small, position by position.

A box is one (b, h) pair and inclusive ranges of q_idx and kv_idx. Both
stages of ``create_block_mask`` work on batches of boxes: tile-aligned
boxes of many tiles first, then boxes inside the tiles that stay undecided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from flexattn.analysis.intervals import Range, TileGrid, evaluate_ranges
from flexattn.block_mask import EMPTY, FULL, PARTIAL
from flexattn.semantics import evaluate

SPLIT = 4  # an undecided box becomes SPLIT x SPLIT children
DENSE_AREA = 16  # boxes this small are evaluated position by position (cheaper than ranges)
DENSE_CHUNK = 1 << 22  # positions evaluated at once: bounds memory
# Levels of boxes a tile is refined through before the rest of it is evaluated position by position:
# cuts that peel thin slivers off a box (a mask of div/mod coordinates) would otherwise go on for
# as many levels as the tile has rows, each a range evaluation of every box left.
MAX_LEVELS = 6


@dataclass
class Boxes:
    """A batch of boxes; every field is a 1-D int64 numpy array (ranges inclusive). numpy, not torch:
    its int64 ops, indexing and nonzero on a few thousand boxes are faster on CPU (docs/performance.md)."""

    b: np.ndarray
    h: np.ndarray
    q_lo: np.ndarray
    q_hi: np.ndarray
    kv_lo: np.ndarray
    kv_hi: np.ndarray

    def __len__(self) -> int:
        return len(self.b)

    def select(self, keep) -> "Boxes":
        keep = _indices(keep)
        return Boxes(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))

    def area(self) -> np.ndarray:
        return (self.q_hi - self.q_lo + 1) * (self.kv_hi - self.kv_lo + 1)

    def split(self, q_cut=None, kv_cut=None) -> tuple["Boxes", np.ndarray]:
        """Children of every box (empty ones dropped), and each child's parent.

        Along an axis with a cut (>= 0) a box is cut in two there; a box with a cut on
        one axis only is not cut along the other; a box without cuts is cut into SPLIT
        equal parts along both.
        """
        q_at, kv_at = _cut_inside(self.q_lo, self.q_hi, q_cut), _cut_inside(self.kv_lo, self.kv_hi, kv_cut)
        at_cut = q_at | kv_at
        if not at_cut.any():
            return self._children(q_cut, kv_cut, q_at, kv_at, SPLIT)
        if at_cut.all():  # at most 2 x 2 children each: no need to make SPLIT x SPLIT slots
            return self._children(q_cut, kv_cut, q_at, kv_at, 2)
        parts = []
        for group, n in ((at_cut, 2), (~at_cut, SPLIT)):
            index = np.flatnonzero(group)
            pick = (lambda c: None if c is None else c[index])  # noqa: E731
            children, parent = self.select(index)._children(pick(q_cut), pick(kv_cut), q_at[index], kv_at[index], n)
            parts.append((children, index[parent]))
        children = Boxes(*(np.concatenate([getattr(c, f) for c, _ in parts]) for f in self.__dataclass_fields__))
        return children, np.concatenate([parent for _, parent in parts])

    def _children(self, q_cut, kv_cut, q_at, kv_at, n: int) -> tuple["Boxes", np.ndarray]:
        """``split`` for boxes that each have at most ``n`` parts per axis."""
        q_lo, q_hi = _parts(self.q_lo, self.q_hi, q_cut, q_at, kv_at, n)  # (M, n)
        kv_lo, kv_hi = _parts(self.kv_lo, self.kv_hi, kv_cut, kv_at, q_at, n)
        # Child (i, j) of box m is q part i x kv part j: flat index (m * n + i) * n + j.
        keep = np.flatnonzero(((q_lo <= q_hi)[:, :, None] & (kv_lo <= kv_hi)[:, None, :]).ravel())
        parent, i, j = keep // (n * n), keep // n % n, keep % n
        children = Boxes(self.b[parent], self.h[parent], q_lo[parent, i], q_hi[parent, i],
                         kv_lo[parent, j], kv_hi[parent, j])
        return children, parent


def _indices(keep):
    """A bool mask as the indices it keeps (one nonzero for every field it selects), else as it is."""
    return np.flatnonzero(keep) if isinstance(keep, np.ndarray) and keep.dtype == np.bool_ else keep


def _cut_inside(lo: np.ndarray, hi: np.ndarray, cut) -> np.ndarray:
    """Where ``cut`` falls strictly inside a range (so both pieces are non-empty)."""
    if cut is None:
        return np.zeros(lo.shape, dtype=bool)
    return (cut > lo) & (cut <= hi)


def _parts(lo, hi, cut, here: np.ndarray, elsewhere: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of up to ``n`` parts of each range, (M, n); a part with lo > hi is empty.

    Two parts at ``cut`` where ``here``; one (the whole range) where only the other
    axis is cut (``elsewhere``); else ``n`` equal parts.
    """
    lo, hi = lo[:, None], hi[:, None]
    part = np.arange(n)
    step = np.where(elsewhere[:, None], hi - lo + 1, (hi - lo + n) // n)
    part_lo = lo + step * part
    part_hi = np.minimum(part_lo + step - 1, hi)
    if cut is None:
        return part_lo, part_hi
    cut = cut[:, None]
    two_lo = np.where(part == 0, lo, np.where(part == 1, cut, hi + 1))
    two_hi = np.where(part == 0, cut - 1, hi)
    here = here[:, None]
    return np.where(here, two_lo, part_lo), np.where(here, two_hi, part_hi)


class Decision(NamedTuple):
    """Per box: always true, always false, or provably both (true at some position, false
    at another); and where to cut it next (-1: cut evenly), as the range evaluation suggests."""

    true: np.ndarray
    false: np.ndarray
    both: np.ndarray
    q_cut: np.ndarray | None
    kv_cut: np.ndarray | None


def decide(graph, load_range, boxes: Boxes, want_cuts: bool = True, want_both: bool = True) -> Decision:
    """``want_cuts``/``want_both`` False skip work whose answer the caller does not use."""
    grid = TileGrid(Range(boxes.b, boxes.b), Range(boxes.h, boxes.h), Range(boxes.q_lo, boxes.q_hi),
                    Range(boxes.kv_lo, boxes.kv_hi), want_cuts, want_both)
    ranges = evaluate_ranges(graph, grid, load_range)
    lo, hi = ranges.lo, ranges.hi
    both = (lo == 0) & (hi == 1) & ranges.attained
    cuts = (None if c is None else _per_box(c, len(boxes)) for c in (grid.cuts["q_idx"], grid.cuts["kv_idx"]))
    return Decision(*(_per_box(x, len(boxes)) for x in (lo >= 1, hi <= 0, both)), *cuts)


def _per_box(x, n: int) -> np.ndarray:
    """A result of the range evaluation (maybe one value for all boxes) as an array of ``n``."""
    x = np.asarray(x)
    return x if x.shape == (n,) and x.flags.writeable else np.broadcast_to(x, n).copy()


def evaluate_positions(graph, buffers, boxes: Boxes) -> tuple[np.ndarray, np.ndarray]:
    """(some_true, some_false) per box, by evaluating the mask at each of its positions."""
    some_true = np.zeros(len(boxes), dtype=bool)
    some_false = np.zeros(len(boxes), dtype=bool)
    if not len(boxes):
        return some_true, some_false
    q_side = int((boxes.q_hi - boxes.q_lo).max()) + 1
    kv_side = int((boxes.kv_hi - boxes.kv_lo).max()) + 1
    dq, dkv = torch.arange(q_side).view(1, -1, 1), torch.arange(kv_side).view(1, 1, -1)
    per_chunk = max(1, DENSE_CHUNK // (q_side * kv_side))
    for start in range(0, len(boxes), per_chunk):
        chunk = boxes.select(slice(start, start + per_chunk))
        b, h, q_lo, q_hi, kv_lo, kv_hi = (torch.from_numpy(getattr(chunk, f)).view(-1, 1, 1)
                                          for f in Boxes.__dataclass_fields__)
        q, kv = q_lo + dq, kv_lo + dkv
        # Boxes of one size (whole tiles) need no bounds: every position evaluated is inside.
        uniform = bool(((chunk.q_hi - chunk.q_lo + 1 == q_side) & (chunk.kv_hi - chunk.kv_lo + 1 == kv_side)).all())
        if not uniform:
            q, kv = torch.minimum(q, q_hi), torch.minimum(kv, kv_hi)  # repeats a position inside: no effect
        value = evaluate(graph, {"b": b, "h": h, "q_idx": q, "kv_idx": kv}, buffers).to(torch.bool)
        value = value.expand(len(chunk), q_side, kv_side)
        some_true[start:start + per_chunk] = value.any(-1).any(-1).numpy()
        some_false[start:start + per_chunk] = ~value.all(-1).all(-1).numpy()
    return some_true, some_false


def refine_tiles(graph, buffers, load_range, tiles: Boxes, ragged: np.ndarray, cuts=(None, None)):
    """Exact classes (EMPTY/PARTIAL/FULL) of undecided tiles, and how many needed positions.

    Each tile is cut into boxes, recursively, and only undecided boxes of
    undecided tiles go on: a tile is PARTIAL as soon as one box is always
    true and another always false (the diagonal of a causal mask), so the
    work follows the boundary of the mask, not the area of the tile.
    ``ragged`` marks tiles cut by the end of the sequence (never FULL); ``cuts`` are
    the (q, kv) cuts suggested for the tiles (see ``Decision``).
    """
    some_true, some_false, used_positions = (np.zeros(len(tiles), dtype=bool) for _ in range(3))
    boxes, owner = tiles, np.arange(len(tiles))
    q_cut, kv_cut = cuts
    level = 0
    while len(boxes):
        level += 1
        boxes, parent = boxes.split(q_cut, kv_cut)
        owner = owner[parent]
        small_mask = boxes.area() <= DENSE_AREA
        small, big = np.flatnonzero(small_mask), np.flatnonzero(~small_mask)
        true, false, both = (np.zeros(len(boxes), dtype=bool) for _ in range(3))
        q_cut, kv_cut = (np.full(len(boxes), -1, dtype=np.int64) for _ in range(2))
        decision = decide(graph, load_range, boxes.select(big))
        true[big], false[big], both[big] = decision.true, decision.false, decision.both
        for cut, suggested in ((q_cut, decision.q_cut), (kv_cut, decision.kv_cut)):
            if suggested is not None:
                cut[big] = suggested
        # Small boxes: "true"/"false" here mean true/false at some position.
        true[small], false[small] = evaluate_positions(graph, buffers, boxes.select(small))
        used_positions[owner[small]] = True
        some_true[owner[true | both]] = True
        some_false[owner[false | both]] = True
        settled = some_true & (some_false | ragged)
        go_on = ~small_mask & ~true & ~false & ~both & ~settled[owner]
        # Ranges pay only while they decide boxes: a tile none of whose boxes this level decided
        # (a table lookup with no structure at this scale) has its boxes evaluated at every position.
        # Such a tile is evaluated whole (one box of one size per tile: no bounds to check), and so
        # is every tile still undecided after MAX_LEVELS levels.
        informative = np.zeros(len(tiles), dtype=bool)
        if level < MAX_LEVELS:
            informative[owner[big[true[big] | false[big] | both[big]]]] = True
        exhaustive = np.unique(owner[go_on & ~informative[owner]])
        if len(exhaustive):
            found_true, found_false = evaluate_positions(graph, buffers, tiles.select(exhaustive))
            some_true[exhaustive[found_true]] = True
            some_false[exhaustive[found_false]] = True
            used_positions[exhaustive] = True
        go_on = _indices(go_on & informative[owner])
        boxes, owner, q_cut, kv_cut = boxes.select(go_on), owner[go_on], q_cut[go_on], kv_cut[go_on]
    classes = np.full(len(tiles), EMPTY, dtype=np.int8)
    classes[some_true] = PARTIAL
    classes[some_true & ~some_false & ~ragged] = FULL
    return classes, int(used_positions.sum())
