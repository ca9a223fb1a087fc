"""Diagonal tile kinds: which square PARTIAL tiles hold exactly a causal triangle of the mask_mod.

A tile that keeps exactly its q >= kv positions (LOWER) or exactly its q <= kv ones (UPPER), for
every batch row and head, is a causal triangle that a fused causal kernel computes without a mask
(the torch back end's fused path). Deciding it means evaluating the mask_mod on the tile, so the
fact is a function the back end asks for the few tiles its plan considers (the diagonals of
aligned squares), not a table over every tile: at 1M tokens there are thousands of diagonal
tiles, and the plan asks for none when a BlockMask has no such squares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexattn.block_mask import LOWER, NEITHER, UPPER
from flexattn.ir import Graph
from flexattn.semantics import evaluate

MASK_CHUNK = 1 << 24  # mask elements evaluated (and materialised) at once


@dataclass(frozen=True, eq=False)
class DiagonalKinds:
    """The kinds (``LOWER``, ``UPPER`` or ``NEITHER``) of square tiles of side ``block`` for the
    mask ``graph`` over ``buffers``, batch size ``B``, ``H`` query heads, lengths ``L`` and ``S``.
    A tile cut by the end of a sequence is ``NEITHER``.

    Example::

        >>> kinds = DiagonalKinds(trace_mask_mod(causal).graph, (), 1, 1, 512, 512, 128)
        >>> kinds(torch.tensor([[0, 0], [1, 0]])).tolist()
        [1, 0]
    """

    graph: Graph
    buffers: tuple
    B: int
    H: int
    L: int
    S: int
    block: int

    def __call__(self, tiles: torch.Tensor, b: slice | None = None, h: slice | None = None) -> torch.Tensor:
        """The kinds of ``tiles`` ((T, 2) int: q tile, kv tile), as a (T,) int64 tensor: a kind holds
        for every batch row in ``b`` and query head in ``h`` (default: all of them)."""
        b = b if b is not None else slice(0, self.B)
        h = h if h is not None else slice(0, self.H)
        kinds = torch.full((len(tiles),), NEITHER, dtype=torch.int64)
        n = self.block
        whole = ((tiles[:, 0] + 1) * n <= self.L) & ((tiles[:, 1] + 1) * n <= self.S)
        lower = torch.ones(n, n, dtype=torch.bool).tril()
        indices = whole.nonzero().flatten()
        step = max(1, MASK_CHUNK // ((b.stop - b.start) * (h.stop - h.start) * n * n))
        for start in range(0, len(indices), step):
            chunk = indices[start:start + step]
            keep = self._keep(tiles[chunk], b, h)  # (B or 1, H or 1, P, n, n)
            for kind, pattern in ((LOWER, lower), (UPPER, lower.T)):
                exact = (keep == pattern).flatten(-2).all(-1).flatten(0, 1).all(0)
                kinds[chunk[exact.expand(len(chunk))]] = kind
        return kinds

    def _keep(self, tiles: torch.Tensor, b: slice, h: slice) -> torch.Tensor:
        positions = torch.arange(self.block)
        q_idx = (tiles[:, 0, None] * self.block + positions).view(1, 1, -1, self.block, 1)
        kv_idx = (tiles[:, 1, None] * self.block + positions).view(1, 1, -1, 1, self.block)
        env = {"b": torch.arange(b.start, b.stop).view(-1, 1, 1, 1, 1),
               "h": torch.arange(h.start, h.stop).view(1, -1, 1, 1, 1),
               "q_idx": q_idx, "kv_idx": kv_idx}
        keep = evaluate(self.graph, env, self.buffers).to(torch.bool)
        return keep.view((1,) * (5 - keep.dim()) + tuple(keep.shape))


def diagonal_kinds(mask_graph: Graph | None, mask_buffers, B: int, H: int, block_mask) -> DiagonalKinds | None:
    """The ``DiagonalKinds`` of a call's mask, or None where no tile can be a causal triangle
    (no mask_mod, no BlockMask, or tiles that are not square)."""
    if mask_graph is None or block_mask is None or block_mask.BLOCK_SIZE[0] != block_mask.BLOCK_SIZE[1]:
        return None
    L, S = block_mask.seq_lengths
    return DiagonalKinds(mask_graph, tuple(t.detach() for t in mask_buffers), B, H, L, S, block_mask.BLOCK_SIZE[0])
