"""create_block_mask: the BlockMask of a mask_mod, from the IR, in O(tiles).

1. Coarse to fine over tiles: the whole (q, kv) plane is cut into boxes of
   many tiles, each decided at once by ``intervals.evaluate_ranges`` (always
   true, always false, or unknown); only unknown boxes are cut again, down
   to single tiles. A causal mask at 1M tokens decides 67M tiles from a few
   thousand boxes along its diagonal.
2. Tiles still unknown are cut into boxes of positions the same way
   (``boxes.refine_tiles``), down to a few positions evaluated exactly
   (``exact=False`` skips this and keeps them PARTIAL, which is safe).
3. Classes follow torch exactly: a tile is FULL when every position of the
   padded tile is true (so a ragged edge tile is never FULL), EMPTY when no
   in-range position is true, PARTIAL otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flexattn import passes
from flexattn.analysis.boxes import SPLIT, Boxes, decide, refine_tiles
from flexattn.analysis.buffer_ranges import BufferRanges
from flexattn.block_mask import DEFAULT_BLOCK_SIZE, EMPTY, FULL, PARTIAL, BlockMask, _pair
from flexattn.errors import BlockMaskError
from flexattn.trace import trace_mask_mod

TOP_BOXES = 64  # boxes per side at the coarsest level (each a power of SPLIT tiles wide)


class _TilePlane:
    """The tile classes (numpy int8), padded so that boxes of ``side`` tiles tile them exactly."""

    def __init__(self, nb, nh, nq, nkv, q_block, kv_block, Q_LEN, KV_LEN):
        self.side = 1
        while max(nq, nkv) > self.side * TOP_BOXES:
            self.side *= SPLIT
        self.n = (nb, nh, nq, nkv)
        self.block, self.length = (q_block, kv_block), (Q_LEN, KV_LEN)
        # EMPTY until painted: boxes decided always false need no painting.
        self.padded = np.full((nb, nh, math.ceil(nq / self.side) * self.side,
                               math.ceil(nkv / self.side) * self.side), EMPTY, dtype=np.int8)

    def boxes(self, b, h, qi, ki, side) -> Boxes:
        """Index boxes of the tile boxes (qi, ki) of ``side`` tiles, clipped to the sequences."""
        (q_block, kv_block), (Q_LEN, KV_LEN) = self.block, self.length
        return Boxes(b, h, qi * side * q_block, np.minimum((qi + 1) * side * q_block, Q_LEN) - 1,
                     ki * side * kv_block, np.minimum((ki + 1) * side * kv_block, KV_LEN) - 1)

    def paint(self, b, h, qi, ki, side, value) -> None:
        nb, nh, nq_pad, nkv_pad = self.padded.shape
        view = self.padded.reshape(nb, nh, nq_pad // side, side, nkv_pad // side, side)  # a view
        view[b, h, qi, :, ki, :] = value


def _classify_tiles(graph, load_range, plane: _TilePlane):
    """Paint every decided tile onto ``plane``; return the undecided ones as (b, h, qi, ki),
    with the cuts the range evaluation suggests for them."""
    nb, nh, nq, nkv = plane.n
    side = plane.side
    b, h, qi, ki = (x.ravel() for x in np.meshgrid(
        *(np.arange(n, dtype=np.int64) for n in (nb, nh, math.ceil(nq / side), math.ceil(nkv / side))),
        indexing="ij"))
    while True:
        true, false, both, q_cut, kv_cut = decide(graph, load_range, plane.boxes(b, h, qi, ki, side),
                                                  want_cuts=side == 1, want_both=side == 1)
        unknown = ~(true | false | (both if side == 1 else false))
        # Indices, not bool masks: one nonzero serves all four fields.
        painted = [(true, FULL)] + ([(both, PARTIAL)] if side == 1 else [])  # a tile true and false is PARTIAL
        for decided, value in painted:
            at = np.flatnonzero(decided)
            plane.paint(b[at], h[at], qi[at], ki[at], side, value)
        unknown = np.flatnonzero(unknown)
        b, h, qi, ki = b[unknown], h[unknown], qi[unknown], ki[unknown]
        if side == 1:
            return (b, h, qi, ki), tuple(None if cut is None else cut[unknown] for cut in (q_cut, kv_cut))
        side //= SPLIT
        part = np.arange(SPLIT)
        qi = np.repeat(qi[:, None] * SPLIT + part, SPLIT)  # child (i, j) of a box: q part i, kv part j
        ki = np.tile(ki[:, None] * SPLIT + part, SPLIT).ravel()
        b, h = (np.repeat(x, SPLIT * SPLIT) for x in (b, h))
        inside = np.flatnonzero((qi * side < nq) & (ki * side < nkv))
        b, h, qi, ki = b[inside], h[inside], qi[inside], ki[inside]


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=DEFAULT_BLOCK_SIZE,
                      *, exact: bool = True) -> BlockMask:
    """The BlockMask of ``mask_mod`` (same content as torch's ``create_block_mask``).

    Tiles are decided symbolically from the traced IR (affine index forms,
    interval rules, buffer range summaries), coarse to fine; only tiles it
    cannot decide are cut further, down to positions evaluated exactly.
    Cost is O(tiles) at worst, and far less for masks with large uniform regions.

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
    load_range = BufferRanges(buffers)
    plane = _TilePlane(nb, nh, nq, nkv, q_block, kv_block, Q_LEN, KV_LEN)
    (b, h, qi, ki), cuts = _classify_tiles(traced.graph, load_range, plane)
    ragged = ((qi == nq - 1) & (Q_LEN % q_block != 0)) | ((ki == nkv - 1) & (KV_LEN % kv_block != 0))
    refined = 0
    if exact and len(b):
        tiles = plane.boxes(b, h, qi, ki, 1)
        plane.padded[b, h, qi, ki], refined = refine_tiles(traced.graph, buffers, load_range, tiles, ragged, cuts)
    else:
        plane.padded[b, h, qi, ki] = PARTIAL
    classes = plane.padded[:, :, :nq, :nkv]
    # A ragged edge tile is never FULL (torch counts its padding as masked out).
    for edge, cut in ((classes[:, :, -1, :], Q_LEN % q_block), (classes[:, :, :, -1], KV_LEN % kv_block)):
        if cut:
            edge[edge == FULL] = PARTIAL
    classes = torch.from_numpy(classes)
    total = nb * nh * nq * nkv
    block_mask = BlockMask.from_tile_classes(classes.expand(B, H, nq, nkv).to(device), (q_block, kv_block),
                                             (Q_LEN, KV_LEN), mask_mod)
    block_mask.traced_mask = traced
    block_mask.stats = {"tiles": total, "decided_symbolically": total - refined if exact else total - len(b),
                        "subdivided": len(b) if exact else 0, "refined": refined,
                        "left_partial": 0 if exact else len(b), "depends_on": sorted(deps)}
    return block_mask
