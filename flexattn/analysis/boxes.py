"""Boxes of index space, decided from their ranges or, when small, position by position.

A box is one (b, h) pair and inclusive ranges of q_idx and kv_idx. Both
stages of ``create_block_mask`` work on batches of boxes: tile-aligned
boxes of many tiles first, then boxes inside the tiles that stay undecided.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        return Boxes(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))

    def area(self) -> torch.Tensor:
        return (self.q_hi - self.q_lo + 1) * (self.kv_hi - self.kv_lo + 1)

    def split(self) -> tuple["Boxes", torch.Tensor]:
        """SPLIT x SPLIT children of every box (empty ones dropped), and each child's parent."""
        q_step = (self.q_hi - self.q_lo + SPLIT) // SPLIT
        kv_step = (self.kv_hi - self.kv_lo + SPLIT) // SPLIT
        part = torch.arange(SPLIT)
        q_lo = (self.q_lo.view(-1, 1, 1) + q_step.view(-1, 1, 1) * part.view(1, -1, 1))
        kv_lo = (self.kv_lo.view(-1, 1, 1) + kv_step.view(-1, 1, 1) * part.view(1, 1, -1))
        q_hi = torch.minimum(q_lo + q_step.view(-1, 1, 1) - 1, self.q_hi.view(-1, 1, 1))
        kv_hi = torch.minimum(kv_lo + kv_step.view(-1, 1, 1) - 1, self.kv_hi.view(-1, 1, 1))
        shape = (len(self), SPLIT, SPLIT)
        keep = ((q_lo <= q_hi) & (kv_lo <= kv_hi)).flatten()
        parent = torch.arange(len(self)).view(-1, 1, 1).expand(shape).flatten()[keep]
        fields = (self.b.view(-1, 1, 1), self.h.view(-1, 1, 1), q_lo, q_hi, kv_lo, kv_hi)
        children = Boxes(*(f.expand(shape).flatten()[keep] for f in fields))
        return children, parent


def decide(graph, load_range, boxes: Boxes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(always_true, always_false, both) per box, from the range evaluation; ``both``:
    provably true at some position and false at another."""
    grid = TileGrid(Range(boxes.b, boxes.b), Range(boxes.h, boxes.h),
                    Range(boxes.q_lo, boxes.q_hi), Range(boxes.kv_lo, boxes.kv_hi))
    ranges = evaluate_ranges(graph, grid, load_range)
    lo, hi = (x.expand(len(boxes)) for x in (ranges.lo, ranges.hi))
    both = (lo == 0) & (hi == 1) & torch.as_tensor(ranges.attained).expand(len(boxes))
    return lo >= 1, hi <= 0, both


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


def refine_tiles(graph, buffers, load_range, tiles: Boxes, ragged: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Exact classes (EMPTY/PARTIAL/FULL) of undecided tiles, and how many needed positions.

    Each tile is cut into boxes, recursively, and only undecided boxes of
    undecided tiles go on: a tile is PARTIAL as soon as one box is always
    true and another always false (the diagonal of a causal mask), so the
    work follows the boundary of the mask, not the area of the tile.
    ``ragged`` marks tiles cut by the end of the sequence (never FULL).
    """
    some_true = torch.zeros(len(tiles), dtype=torch.bool)
    some_false = torch.zeros(len(tiles), dtype=torch.bool)
    used_positions = torch.zeros(len(tiles), dtype=torch.bool)
    boxes, owner = tiles, torch.arange(len(tiles))
    while len(boxes):
        boxes, parent = boxes.split()
        owner = owner[parent]
        small = boxes.area() <= DENSE_AREA
        true, false, both = (torch.zeros(len(boxes), dtype=torch.bool) for _ in range(3))
        true[~small], false[~small], both[~small] = decide(graph, load_range, boxes.select(~small))
        # Small boxes: "true"/"false" here mean true/false at some position.
        true[small], false[small] = evaluate_positions(graph, buffers, boxes.select(small))
        used_positions[owner[small]] = True
        some_true[owner[true | both]] = True
        some_false[owner[false | both]] = True
        settled = some_true & (some_false | ragged)
        go_on = ~small & ~true & ~false & ~both & ~settled[owner]
        boxes, owner = boxes.select(go_on), owner[go_on]
    classes = torch.full((len(tiles),), EMPTY, dtype=torch.int8)
    classes[some_true] = PARTIAL
    classes[some_true & ~some_false & ~ragged] = FULL
    return classes, int(used_positions.sum())
