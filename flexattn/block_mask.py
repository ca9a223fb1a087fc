"""BlockMask: which (q-tile, kv-tile) pairs attention must visit.

Same layout as ``torch.nn.attention.flex_attention.BlockMask``: for each
(batch, head, q-block) row, ``kv_num_blocks``/``kv_indices`` list the
*partial* kv blocks (the mask must be applied inside them) and
``full_kv_num_blocks``/``full_kv_indices`` the *full* ones (no mask needed);
blocks in neither list are empty and skipped. ``q_*`` are the transposes
(per kv-block, the q blocks), used by the backward pass.
"""

from __future__ import annotations

import copy
import itertools
import numbers
from dataclasses import replace
from types import MappingProxyType
from typing import Mapping

import torch
from torch.nn.attention import flex_attention as torch_flex

from flexattn.block_mask_text import (EMPTY, FULL, LOWER, NEITHER, PARTIAL, UPPER, explanation, plot_tiles,
                                      tile_picture, torch_picture)
from flexattn.errors import BlockMaskError, SlicedBlockMaskError
from flexattn.index_lists import crop_lists, ordered_lists, ordered_to_dense, transpose_ordered
from flexattn.tile_analysis import TileAnalysis
from flexattn.memo import Memo, matches, stamp

DEFAULT_BLOCK_SIZE = 128


def _sliced_mask_mod(b, h, q_idx, kv_idx):
    raise SlicedBlockMaskError(
        "Cannot use mask_mod from a sliced BlockMask (as torch: slicing resets it, since the slice's "
        "indices are shifted). Set sliced.mask_mod to a mask_mod for the slice, or build the mask for "
        "the slice with create_block_mask.")


def positive_int(name: str, value) -> int:
    """``value`` as an int; ``BlockMaskError`` naming ``name`` unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise BlockMaskError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def pair(block_size) -> tuple[int, int]:
    """A BLOCK_SIZE (an int, or a (q, kv) pair) as a (q, kv) pair of ints; ``BlockMaskError`` otherwise."""
    sizes = tuple(block_size) if isinstance(block_size, (tuple, list)) else (block_size, block_size)
    if len(sizes) != 2 or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x > 0 for x in sizes):
        raise BlockMaskError(f"BLOCK_SIZE must be a positive int or a (q, kv) pair of them, got {block_size!r}; "
                             f"pass e.g. BLOCK_SIZE=128 or BLOCK_SIZE=(128, 64)")
    return int(sizes[0]), int(sizes[1])


class BlockMask(torch_flex.BlockMask):
    """Block-sparse structure of a mask plus the mask_mod to apply in partial tiles.

    Shapes (``B``/``H`` may be 1 when the mask does not depend on them):
    ``kv_num_blocks`` (B, H, Q_BLOCKS), ``kv_indices`` (B, H, Q_BLOCKS, KV_BLOCKS),
    likewise ``full_kv_*``; ``q_num_blocks`` (B, H, KV_BLOCKS), ``q_indices``
    (B, H, KV_BLOCKS, Q_BLOCKS), likewise ``full_q_*``. All int32.

    A subclass of torch's BlockMask (so ``isinstance`` checks written for torch accept it) with
    its own methods, torch's fields and ``as_tuple()``: torch's ``flex_attention`` takes it as is. ``dq_*`` are torch's metadata for its deterministic FLASH
    backward (``create_block_mask(compute_dq_write_order=True)``); flexattn's kernels ignore them.
    """

    # torch's tensor and context fields, in its order.
    _TENSOR_ATTRS = ["kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices", "full_q_num_blocks", "full_q_indices", "dq_write_order", "dq_write_order_full",
                     "dq_kv_order"]
    _CONTEXT_ATTRS = ["seq_lengths", "BLOCK_SIZE", "mask_mod", "dq_kv_order_spt"]

    def __init__(self, seq_lengths, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                 q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
                 BLOCK_SIZE=(DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE), mask_mod=None, *,
                 dq_write_order=None, dq_write_order_full=None, dq_kv_order=None, dq_kv_order_spt=None,
                 analysis: TileAnalysis | None = None):
        if kv_indices.dim() < 2:
            raise BlockMaskError("BlockMask indices must have at least 2 dimensions")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise BlockMaskError("full_kv_num_blocks and full_kv_indices must be given together")
        from flexattn.masks import noop_mask

        self.seq_lengths = tuple(seq_lengths)
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        if dq_write_order_full is not None and dq_write_order is None:
            raise BlockMaskError("dq_write_order_full was given without dq_write_order; pass both or neither")
        self.dq_write_order, self.dq_write_order_full = dq_write_order, dq_write_order_full
        self.dq_kv_order, self.dq_kv_order_spt = dq_kv_order, dq_kv_order_spt
        self.BLOCK_SIZE = pair(BLOCK_SIZE)
        self.mask_mod = mask_mod if mask_mod is not None else noop_mask
        self._tiles_mask_mod = self.mask_mod  # the mask_mod the tile classes were made for
        self.analysis = analysis
        self._memo = Memo()  # shared by shallow copies (flexattn.mod_cache hands out copies)
        # The lists as built (``lists_unchanged``): stamped for masks that carry their analysis only,
        # the ones whose tiles something relies on (a BlockMask rebuilt while torch.compile traces
        # holds fake tensors, which have no storage to stamp).
        self._built_lists = stamp(self.tile_lists()) if analysis is not None else ()

    def tile_lists(self) -> list[torch.Tensor]:
        """The tile-list tensors this mask has (kv and q side, FULL and PARTIAL), in torch's order."""
        return [t for t in (getattr(self, name) for name in self._TENSOR_ATTRS[:8]) if t is not None]

    def lists_unchanged(self) -> bool:
        """Whether the tile lists are the tensors this mask was built with, none written in place since."""
        return matches(self.__dict__.get("_built_lists", ()), self.tile_lists())

    def decided_for(self, mask_buffers) -> bool:
        """Whether ``create_block_mask`` decided every tile for the mask_mod this mask carries and its
        captured tensors ``mask_buffers``, none of which nor the tile lists changed since: then a
        PARTIAL tile is partial and a FULL tile full (a fast path may read the mask_mod instead)."""
        analysis = self._analysis()
        return (analysis is not None and analysis.stats.get("left_partial") == 0
                and analysis.holds_for(mask_buffers) and self.lists_unchanged())

    def attended_positions(self, mask_buffers) -> torch.Tensor | None:
        """(B or 1, H or 1, Q_LEN, KV_LEN) bool, the positions attention keeps (tile classes and
        mask_mod together), where the build evaluated every position (``TileAnalysis.attended``) and
        neither the mask_mod, its captured tensors ``mask_buffers`` nor the tile lists changed since; else None."""
        analysis = self._analysis()
        if analysis is None or analysis.attended is None or not analysis.holds_for(mask_buffers):
            return None
        return analysis.attended if self.lists_unchanged() else None

    def derived(self, name, key, compute, tensors=()):
        """``compute()``, kept with this mask (and its shallow copies) under ``name`` until ``key``
        changes or the tile lists or ``tensors`` are replaced or changed in place (``flexattn.memo``).

        For what a back end derives from the mask alone (the rows a kernel visits, a fused plan):
        computed once for every layer and step that shares the mask, never served stale.
        Example: ``rows = block_mask.derived("rows", (L, S), lambda: plan_rows(block_mask, L, S))``.
        """
        memo = self.__dict__.get("_memo")
        if memo is None:  # a mask made without __init__ (unpickled, or a subclass)
            memo = self._memo = Memo()
        return memo.get(name, key, [*self.tile_lists(), *tensors], compute)

    def visited_tiles(self) -> "BlockMask":
        """The tiles attention visits, and where it applies ``mask_mod``.

        This mask itself, unless ``mask_mod`` was reassigned after it was built: then its FULL
        tiles were full for the old mask_mod only, so the result lists them as PARTIAL (the new
        mask_mod is applied in every visited tile; EMPTY tiles stay skipped). Kept until
        ``mask_mod`` or the tiles change.
        """
        if self.mask_mod is self._tiles_mask_mod or self.full_kv_num_blocks is None:
            return self
        classes = self.tile_classes()
        cached = getattr(self, "_demoted", None)
        if cached is None or cached[0] is not classes:
            demoted = BlockMask.from_tile_classes(torch.where(classes == FULL, PARTIAL, classes).to(torch.int8),
                                                  self.BLOCK_SIZE, self.seq_lengths, self.mask_mod)
            self._demoted = (classes, demoted)
        demoted = self._demoted[1]
        demoted.mask_mod = demoted._tiles_mask_mod = self.mask_mod
        return demoted

    def _analysis(self) -> TileAnalysis | None:  # a reassigned mask_mod (torch allows it) voids it
        return self.analysis if self.analysis is not None and self.analysis.mask_mod is self.mask_mod else None

    @property
    def traced_mask(self):
        """The traced ``mask_mod`` kept from building this mask, or None (not traced, or
        ``block_mask.mask_mod = other`` since: attention applies whatever mask_mod the attribute
        holds in PARTIAL tiles, as torch does, and traces it)."""
        analysis = self._analysis()
        return None if analysis is None else analysis.traced

    @property
    def stats(self) -> Mapping:
        """How ``create_block_mask`` decided the tiles (see ``TileAnalysis``); empty when this
        mask was built another way or its ``mask_mod`` was reassigned since. Read-only."""
        analysis = self._analysis()
        return MappingProxyType({}) if analysis is None else analysis.stats

    def relabelled(self, mask_mod, traced) -> "BlockMask":
        """A shallow copy for ``mask_mod`` and its trace, known to compute the same mask (same code, equal
        captured values: ``flexattn.mod_cache``), so that its tiles and stats hold."""
        copied = copy.copy(self)
        copied.mask_mod = copied._tiles_mask_mod = mask_mod
        copied.analysis = replace(self.analysis or TileAnalysis(mask_mod), mask_mod=mask_mod, traced=traced)
        return copied

    @classmethod
    def from_kv_blocks(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None,
                       BLOCK_SIZE=DEFAULT_BLOCK_SIZE, mask_mod=None, seq_lengths=None,
                       compute_q_blocks=True, *, dq_write_order=None, dq_write_order_full=None,
                       dq_kv_order=None) -> "BlockMask":
        """Build a BlockMask from kv-major block lists (as ``torch``'s ``from_kv_blocks``).

        ``dq_kv_order`` is a tensor (kept as ``dq_kv_order``) or a bool (kept as
        ``dq_kv_order_spt``), as in torch.

        Raises ``BlockMaskError`` if ``kv_indices`` has fewer than 2 dims or only one
        of ``full_kv_num_blocks`` / ``full_kv_indices`` is given.
        """
        if kv_indices.dim() < 2:
            raise BlockMaskError("BlockMask indices must have at least 2 dimensions")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise BlockMaskError("full_kv_num_blocks and full_kv_indices must be given together")
        q_num = q_idx = full_q_num = full_q_idx = None
        if compute_q_blocks:
            q_num, q_idx = transpose_ordered(kv_num_blocks, kv_indices)
            if full_kv_num_blocks is not None:
                full_q_num, full_q_idx = transpose_ordered(full_kv_num_blocks, full_kv_indices)
        block = pair(BLOCK_SIZE)
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * block[0], kv_indices.shape[-1] * block[1])
        return cls(seq_lengths, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                   q_num, q_idx, full_q_num, full_q_idx, block, mask_mod, dq_write_order=dq_write_order,
                   dq_write_order_full=dq_write_order_full,
                   dq_kv_order=dq_kv_order if isinstance(dq_kv_order, torch.Tensor) else None,
                   dq_kv_order_spt=dq_kv_order if isinstance(dq_kv_order, bool) else None)

    @classmethod
    def from_tile_classes(cls, classes: torch.Tensor, BLOCK_SIZE, seq_lengths, mask_mod=None) -> "BlockMask":
        """Build from a (B, H, Q_BLOCKS, KV_BLOCKS) tensor of EMPTY/PARTIAL/FULL codes."""
        (kv_num, kv_idx), (full_num, full_idx) = ordered_lists(classes, (PARTIAL, FULL))
        # The q-major lists come from the same matrix, read down its columns.
        (q_num, q_idx), (full_q_num, full_q_idx) = ordered_lists(classes, (PARTIAL, FULL), transposed=True)
        return cls(seq_lengths, kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx,
                   BLOCK_SIZE, mask_mod)

    def tile_classes(self) -> torch.Tensor:
        """(B, H, Q_BLOCKS, KV_BLOCKS) int8 tensor of EMPTY (0) / PARTIAL (1) / FULL (2).

        Kept until one of the kv index tensors is replaced or changed in place (a decode
        loop asks for it in every layer of every step, where rebuilding it cost up to a
        twentieth of the attention call); treat the result as read-only.
        """
        sources = (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices)
        versions = tuple(None if t is None else t._version for t in sources)
        cached = getattr(self, "_classes", None)
        if cached is None or any(a is not b for a, b in zip(cached[0], sources)) or cached[1] != versions:
            n_cols = self.kv_indices.shape[-1]
            classes = ordered_to_dense(self.kv_num_blocks, self.kv_indices, n_cols).to(torch.int8)
            if self.full_kv_num_blocks is not None:
                full = ordered_to_dense(self.full_kv_num_blocks, self.full_kv_indices, n_cols)
                classes = torch.where(full.bool(), torch.tensor(FULL, dtype=torch.int8), classes)
            self._classes = (sources, versions, classes)
        return self._classes[2]

    def as_tuple(self, flatten: bool = True) -> tuple:
        """The fields in torch's order (what torch's ``flex_attention`` hands its kernels): ``(Q_LEN, KV_LEN,
        kv_num_blocks, kv_indices, full_kv_*, q_*, full_q_*, dq_write_order, dq_write_order_full,
        dq_kv_order, dq_kv_order_spt, Q_BLOCK, KV_BLOCK, mask_mod)``; ``flatten=False`` keeps pairs.
        """
        tensors = tuple(getattr(self, name) for name in self._TENSOR_ATTRS)
        if flatten:
            return (*self.seq_lengths, *tensors, self.dq_kv_order_spt, *self.BLOCK_SIZE, self.mask_mod)
        return (self.seq_lengths, *tensors, self.dq_kv_order_spt, self.BLOCK_SIZE, self.mask_mod)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Q_LEN, KV_LEN)."""
        *batch, _ = self.kv_num_blocks.shape
        return (*batch, *self.seq_lengths)

    def to_dense(self) -> torch.Tensor:
        """(B, H, Q_BLOCKS, KV_BLOCKS) int32: 1 where a tile is visited (partial or full)."""
        n_cols = self.kv_indices.shape[-1]
        dense = ordered_to_dense(self.kv_num_blocks, self.kv_indices, n_cols)
        if self.full_kv_num_blocks is not None:
            dense = dense | ordered_to_dense(self.full_kv_num_blocks, self.full_kv_indices, n_cols)
        return dense

    def numel(self) -> int:
        """Number of elements of the (B, H, Q_LEN, KV_LEN) mask this describes."""
        b, h, q, kv = self.shape
        return b * h * q * kv

    def sparsity(self) -> float:
        """Percentage of the (B, H, Q_LEN, KV_LEN) mask in skipped (empty) tiles, as torch computes it."""
        visited = self.kv_num_blocks.sum().item()
        if self.full_kv_num_blocks is not None:
            visited += self.full_kv_num_blocks.sum().item()
        return 100.0 * (1.0 - visited * self.BLOCK_SIZE[0] * self.BLOCK_SIZE[1] / self.numel())

    def to_string(self, grid_size: int | tuple[int, int] = (20, 20), limit: int = 4) -> str:
        """torch's text picture, character for character: per (batch, head) ``(b, h)`` then rows in which
        each character pair summarises a section of tiles (``██`` all visited, ``░░`` some, blank none).

        ``grid_size`` (an int, a (rows, cols) pair, or -1 for every tile) caps the characters drawn;
        ``limit`` caps the (batch, head) pairs, then a ``...`` line says how to see more.
        ``tile_string`` tells full tiles from partial ones. Raises ``BlockMaskError`` for a
        ``grid_size`` or ``limit`` that is not an int (or pair), or a grid_size of 0.
        Example: ``print(create_block_mask(causal, 2, 1, 256, 256).to_string(grid_size=-1, limit=1))``.
        """
        return torch_picture(self.to_dense(), grid_size, limit)

    def tile_string(self, grid_size: int | tuple[int, int] = (20, 20), limit: int = 4) -> str:
        """flexattn's picture per (batch, head): one character pair per tile, ``██`` full, ``░░``
        partial (mask_mod applied), blank empty; the top-left ``grid_size`` tiles of larger masks.

        Takes ``to_string``'s arguments and raises as it does.
        Example: ``print(create_block_mask(causal, 1, 1, 256, 256).tile_string())``.
        """
        return tile_picture(self.tile_classes(), grid_size, limit)

    def __str__(self) -> str:
        """torch's ``str``: shape, sparsity and the picture of ``to_string()``."""
        return f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%, \n{self.to_string().strip()}\n)"

    def __getitem__(self, index) -> "BlockMask":
        """Slice batch, head and q-block dims exactly like torch: ``bm[-1]``, ``bm[b, h]``, ``bm[:, -2:]``,
        ``bm[:, :, 2:4]``, ``bm[:, :, torch.tensor([1])]``. An int ``i`` keeps its dim (``i:i + 1``, from
        the end when negative); entries past the third are ignored, as in torch. Every kv block is kept;
        the slice's mask_mod raises ``BlockMaskError`` (it would see shifted indices), and so does
        slicing lists with fewer than 3 dims or a mask with a tensor ``dq_kv_order``.
        """
        sizes = self.kv_num_blocks.shape[:3]
        if len(sizes) < 3 or self.dq_kv_order is not None:
            raise BlockMaskError(f"can only slice (B, H, Q_BLOCKS) lists without a tensor dq_kv_order (as torch), got "
                                 f"kv_num_blocks {tuple(sizes)}; index kv_num_blocks/kv_indices directly instead")
        index = (*(index if isinstance(index, tuple) else (index,)), slice(None), slice(None), slice(None))[:3]
        index = tuple((slice(i + n, i + n + 1) if -n <= i < 0 else slice(i, i + 1)) if isinstance(i, int) else i
                      for i, n in zip(index, sizes))
        full = None if self.full_kv_num_blocks is None else (self.full_kv_num_blocks[index], self.full_kv_indices[index])
        sliced = BlockMask.from_kv_blocks(self.kv_num_blocks[index], self.kv_indices[index], *(full or (None, None)),
                                          BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=_sliced_mask_mod,
                                          seq_lengths=self.seq_lengths, compute_q_blocks=self.q_indices is not None)
        return self._carry_dq_order(sliced)

    def _adjust(self, new_q_len: int, new_kv_len: int) -> "BlockMask":
        """torch's ``_adjust``: the mask cropped to its top-left ``new_q_len`` x ``new_kv_len`` corner.

        As torch does it (decoding with a growing cache reuses one mask built for the full
        length; see ``index_lists.crop_lists``): exact for causal-like masks, not for every mask_mod.

        Raises ``BlockMaskError`` for non-positive lengths or a tensor ``dq_kv_order``.
        Example: ``step_mask = block_mask._adjust(1, cache_len)``.
        """
        new_q_len, new_kv_len = positive_int("new_q_len", new_q_len), positive_int("new_kv_len", new_kv_len)
        if self.dq_kv_order is not None:
            raise BlockMaskError("cannot _adjust a BlockMask with a tensor dq_kv_order (nor can torch); build the "
                                 "new mask with BlockMask.from_kv_blocks(..., dq_write_order=...) instead")
        rows, cols = -(-new_q_len // self.BLOCK_SIZE[0]), -(-new_kv_len // self.BLOCK_SIZE[1])
        full = (None, None) if self.full_kv_num_blocks is None else \
            crop_lists(self.full_kv_num_blocks, self.full_kv_indices, rows, cols)
        adjusted = self.from_kv_blocks(*crop_lists(self.kv_num_blocks, self.kv_indices, rows, cols), *full,
                                       BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod,
                                       seq_lengths=(new_q_len, new_kv_len), compute_q_blocks=self.q_indices is not None)
        return self._carry_dq_order(adjusted)

    def _carry_dq_order(self, derived: "BlockMask") -> "BlockMask":
        """``derived`` (a slice or crop of this mask) with this mask's dQ write order, recomputed as torch does."""
        derived.dq_kv_order_spt = self.dq_kv_order_spt
        if self.dq_write_order is not None:
            derived.dq_write_order, derived.dq_write_order_full = torch_flex._compute_dq_write_order_from_block_mask(
                derived, dq_kv_order=self.dq_kv_order_spt)
        return derived

    def to(self, device) -> "BlockMask":
        """A new BlockMask with every tensor field on ``device`` (a ``torch.device`` or a string), as torch's ``to``."""
        moved = {name: None if getattr(self, name) is None else getattr(self, name).to(device)
                 for name in self._TENSOR_ATTRS}
        result = BlockMask(self.seq_lengths, **moved, BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod,
                           dq_kv_order_spt=self.dq_kv_order_spt, analysis=self.analysis)
        return result

    @classmethod
    def from_torch(cls, torch_block_mask) -> "BlockMask":
        """A flexattn BlockMask with the fields of ``torch.nn.attention.flex_attention.BlockMask``.

        Raises ``BlockMaskError`` for an object without those fields.
        """
        try:
            fields = [getattr(torch_block_mask, name) for name in ("seq_lengths", *cls._TENSOR_ATTRS[:8])]
            block_size, mask_mod = torch_block_mask.BLOCK_SIZE, torch_block_mask.mask_mod
        except AttributeError as error:
            raise BlockMaskError(f"expected a BlockMask (flexattn's or torch's), got "
                                 f"{type(torch_block_mask).__name__}") from error
        dq = {name: getattr(torch_block_mask, name, None) for name in (*cls._TENSOR_ATTRS[8:], "dq_kv_order_spt")}
        return cls(*fields, block_size, mask_mod, **dq)

    def to_torch(self):
        """The same mask as a ``torch.nn.attention.flex_attention.BlockMask`` (for torch's flex_attention)."""
        return torch_flex.BlockMask.from_kv_blocks(
            self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
            BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod, seq_lengths=self.seq_lengths,
            compute_q_blocks=self.q_indices is not None, dq_write_order=self.dq_write_order,
            dq_write_order_full=self.dq_write_order_full, dq_kv_order=self._dq_kv_order())

    def _dq_kv_order(self):
        """torch's: the tensor kv order of the dQ write order if there is one, else the bool one."""
        return self.dq_kv_order if self.dq_kv_order is not None else self.dq_kv_order_spt

    def explain(self) -> str:
        """How the tiles were decided: symbolically from the IR, or by dense refinement."""
        return explanation(self)

    def plot(self, path, batch: int = 0, head: int = 0) -> None:
        """Write a PNG of one (batch, head): full, partial and empty tiles in three colours, with a legend."""
        plot_tiles(self, path, batch, head)

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise ``BlockMaskError`` unless this mask was built for these lengths."""
        built_q, built_kv = self.seq_lengths
        if (q_len, kv_len) != (built_q, built_kv):
            # torch's wording (its tests match "block_mask was created for"), then the fix.
            fix = f"build a new one: create_block_mask(mask_mod, B, H, {q_len}, {kv_len})"
            if q_len <= built_q and kv_len <= built_kv:
                fix += (f", or crop this one with block_mask._adjust({q_len}, {kv_len}) (its top-left corner: "
                        "right for causal-like masks only)")
            raise BlockMaskError(f"block_mask was created for block_mask.shape={self.shape} but got q_len={q_len} "
                                 f"and kv_len={kv_len}; {fix}.")

    def __repr__(self) -> str:
        return (f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, "
                f"sparsity={self.sparsity():.2f}%, mask_mod={getattr(self.mask_mod, '__name__', self.mask_mod)})")
