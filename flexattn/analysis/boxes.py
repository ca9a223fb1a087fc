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


@dataclass
class Boxes:
    """A batch of boxes; every field is a 1-D int64 tensor (ranges inclusive)."""

    b: torch.Tensor
    h: torch.Tensor
    q_lo: torch.Tensor
    q_hi: torch.Tensor
    kv_lo: torch.Tensor
    kv_hi: torch.Tensor

    def __len__(self) -> int:
        return len(self.b)

    def select(self, keep: torch.Tensor) -> "Boxes":
        keep = _indices(keep)
        return Boxes(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))

    def area(self) -> torch.Tensor:
        return (self.q_hi - self.q_lo + 1) * (self.kv_hi - self.kv_lo + 1)

    def split(self, q_cut=None, kv_cut=None) -> tuple["Boxes", torch.Tensor]:
        """Children of every box (empty ones dropped), and each child's parent.

        Along an axis with a cut (>= 0) a box is cut in two there; a box with a cut on
        one axis only is not cut along the other; a box without cuts is cut into SPLIT
        equal parts along both.
        """
        q_at, kv_at = _cut_inside(self.q_lo, self.q_hi, q_cut), _cut_inside(self.kv_lo, self.kv_hi, kv_cut)
        at_cut = q_at | kv_at
        if not bool(at_cut.any()):
            return self._children(q_cut, kv_cut, q_at, kv_at, SPLIT)
        if bool(at_cut.all()):  # at most 2 x 2 children each: no need to make SPLIT x SPLIT slots
            return self._children(q_cut, kv_cut, q_at, kv_at, 2)
        parts = []
        for group, n in ((at_cut, 2), (~at_cut, SPLIT)):
            index = group.nonzero().flatten()
            pick = (lambda c: None if c is None else c[index])  # noqa: E731
            children, parent = self.select(index)._children(pick(q_cut), pick(kv_cut), q_at[index], kv_at[index], n)
            parts.append((children, index[parent]))
        children = Boxes(*(torch.cat([getattr(c, f) for c, _ in parts]) for f in self.__dataclass_fields__))
        return children, torch.cat([parent for _, parent in parts])

    def _children(self, q_cut, kv_cut, q_at, kv_at, n: int) -> tuple["Boxes", torch.Tensor]:
        """``split`` for boxes that each have at most ``n`` parts per axis."""
        q_lo, q_hi = _parts(self.q_lo, self.q_hi, q_cut, q_at, kv_at, n)
        kv_lo, kv_hi = _parts(self.kv_lo, self.kv_hi, kv_cut, kv_at, q_at, n)
        q_lo, q_hi = q_lo.unsqueeze(2), q_hi.unsqueeze(2)
        kv_lo, kv_hi = kv_lo.unsqueeze(1), kv_hi.unsqueeze(1)
        shape = (len(self), n, n)
        keep = _indices(((q_lo <= q_hi) & (kv_lo <= kv_hi)).flatten())
        parent = torch.arange(len(self)).view(-1, 1, 1).expand(shape).flatten()[keep]
        fields = (self.b.view(-1, 1, 1), self.h.view(-1, 1, 1), q_lo, q_hi, kv_lo, kv_hi)
        children = Boxes(*(f.expand(shape).flatten()[keep] for f in fields))
        return children, parent


def _indices(keep):
    """A bool mask as the indices it keeps (one nonzero for every field it selects), else as it is."""
    return keep.nonzero().squeeze(1) if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool else keep


def _cut_inside(lo: torch.Tensor, hi: torch.Tensor, cut) -> torch.Tensor:
    """Where ``cut`` falls strictly inside a range (so both pieces are non-empty)."""
    if cut is None:
        return torch.zeros_like(lo, dtype=torch.bool)
    return (cut > lo) & (cut <= hi)


def _parts(lo, hi, cut, here: torch.Tensor, elsewhere: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) of up to ``n`` parts of each range, (M, n); a part with lo > hi is empty.

    Two parts at ``cut`` where ``here``; one (the whole range) where only the other
    axis is cut (``elsewhere``); else ``n`` equal parts.
    """
    lo, hi = lo.view(-1, 1), hi.view(-1, 1)
    part = torch.arange(n)
    step = torch.where(elsewhere.view(-1, 1), hi - lo + 1, (hi - lo + n) // n)
    part_lo = lo + step * part
    part_hi = torch.minimum(part_lo + step - 1, hi)
    if cut is None:
        return part_lo, part_hi
    cut = cut.view(-1, 1)
    two_lo = torch.where(part == 0, lo, torch.where(part == 1, cut, hi + 1))
    two_hi = torch.where(part == 0, cut - 1, hi)
    here = here.view(-1, 1)
    return torch.where(here, two_lo, part_lo), torch.where(here, two_hi, part_hi)


class Decision(NamedTuple):
    """Per box: always true, always false, or provably both (true at some position, false
    at another); and where to cut it next (-1: cut evenly), as the range evaluation suggests."""

    true: torch.Tensor
    false: torch.Tensor
    both: torch.Tensor
    q_cut: torch.Tensor | None
    kv_cut: torch.Tensor | None


def decide(graph, load_range, boxes: Boxes, want_cuts: bool = True, want_both: bool = True) -> Decision:
    """``want_cuts``/``want_both`` False skip work whose answer the caller does not use."""
    b, h, q_lo, q_hi, kv_lo, kv_hi = (getattr(boxes, f).numpy() for f in Boxes.__dataclass_fields__)
    grid = TileGrid(Range(b, b), Range(h, h), Range(q_lo, q_hi), Range(kv_lo, kv_hi), want_cuts, want_both)
    ranges = evaluate_ranges(graph, grid, load_range)
    lo, hi = ranges.lo, ranges.hi
    both = (lo == 0) & (hi == 1) & ranges.attained
    cuts = (None if c is None else _per_box(c, len(boxes)) for c in (grid.cuts["q_idx"], grid.cuts["kv_idx"]))
    return Decision(*(_per_box(x, len(boxes)) for x in (lo >= 1, hi <= 0, both)), *cuts)


def _per_box(x, n: int) -> torch.Tensor:
    """A numpy result of the range evaluation (maybe one value for all boxes) as a tensor of ``n``."""
    x = np.asarray(x)
    return torch.from_numpy(x if x.shape == (n,) and x.flags.writeable else np.broadcast_to(x, n).copy())


def evaluate_positions(graph, buffers, boxes: Boxes) -> tuple[torch.Tensor, torch.Tensor]:
    """(some_true, some_false) per box, by evaluating the mask at each of its positions."""
    some_true = torch.zeros(len(boxes), dtype=torch.bool)
    some_false = torch.zeros(len(boxes), dtype=torch.bool)
    if not len(boxes):
        return some_true, some_false
    q_side = int((boxes.q_hi - boxes.q_lo).max()) + 1
    kv_side = int((boxes.kv_hi - boxes.kv_lo).max()) + 1
    dq, dkv = torch.arange(q_side).view(1, -1, 1), torch.arange(kv_side).view(1, 1, -1)
    per_chunk = max(1, DENSE_CHUNK // (q_side * kv_side))
    for start in range(0, len(boxes), per_chunk):
        chunk = boxes.select(slice(start, start + per_chunk))
        q = chunk.q_lo.view(-1, 1, 1) + dq
        kv = chunk.kv_lo.view(-1, 1, 1) + dkv
        inside = (q <= chunk.q_hi.view(-1, 1, 1)) & (kv <= chunk.kv_hi.view(-1, 1, 1))
        env = {"b": chunk.b.view(-1, 1, 1), "h": chunk.h.view(-1, 1, 1),
               "q_idx": torch.minimum(q, chunk.q_hi.view(-1, 1, 1)),
               "kv_idx": torch.minimum(kv, chunk.kv_hi.view(-1, 1, 1))}
        value = evaluate(graph, env, buffers).to(torch.bool)
        some_true[start:start + per_chunk] = (value & inside).flatten(1).any(1)
        some_false[start:start + per_chunk] = (~value & inside).flatten(1).any(1)
    return some_true, some_false


def refine_tiles(graph, buffers, load_range, tiles: Boxes, ragged: torch.Tensor, cuts=(None, None)):
    """Exact classes (EMPTY/PARTIAL/FULL) of undecided tiles, and how many needed positions.

    Each tile is cut into boxes, recursively, and only undecided boxes of
    undecided tiles go on: a tile is PARTIAL as soon as one box is always
    true and another always false (the diagonal of a causal mask), so the
    work follows the boundary of the mask, not the area of the tile.
    ``ragged`` marks tiles cut by the end of the sequence (never FULL); ``cuts`` are
    the (q, kv) cuts suggested for the tiles (see ``Decision``).
    """
    some_true = torch.zeros(len(tiles), dtype=torch.bool)
    some_false = torch.zeros(len(tiles), dtype=torch.bool)
    used_positions = torch.zeros(len(tiles), dtype=torch.bool)
    boxes, owner = tiles, torch.arange(len(tiles))
    q_cut, kv_cut = cuts
    while len(boxes):
        boxes, parent = boxes.split(q_cut, kv_cut)
        owner = owner[parent]
        small_mask = boxes.area() <= DENSE_AREA
        small, big = small_mask.nonzero().squeeze(1), (~small_mask).nonzero().squeeze(1)
        true, false, both = (torch.zeros(len(boxes), dtype=torch.bool) for _ in range(3))
        q_cut, kv_cut = (torch.full((len(boxes),), -1, dtype=torch.int64) for _ in range(2))
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
        go_on = _indices(go_on)
        boxes, owner, q_cut, kv_cut = boxes.select(go_on), owner[go_on], q_cut[go_on], kv_cut[go_on]
    classes = torch.full((len(tiles),), EMPTY, dtype=torch.int8)
    classes[some_true] = PARTIAL
    classes[some_true & ~some_false & ~ragged] = FULL
    return classes, int(used_positions.sum())
