"""BlockMask: which (q-tile, kv-tile) pairs attention must visit.

Same layout as ``torch.nn.attention.flex_attention.BlockMask``: for each
(batch, head, q-block) row, ``kv_num_blocks``/``kv_indices`` list the
*partial* kv blocks (the mask must be applied inside them) and
``full_kv_num_blocks``/``full_kv_indices`` the *full* ones (no mask needed);
blocks in neither list are empty and skipped. ``q_*`` are the transposes
(per kv-block, the q blocks), used by the backward pass.
"""

from __future__ import annotations

import torch

from flexattn.errors import BlockMaskError
from flexattn.index_lists import ordered_lists, ordered_to_dense, transpose_ordered

DEFAULT_BLOCK_SIZE = 128

EMPTY, PARTIAL, FULL = 0, 1, 2  # tile classes, as stored in a tile-class tensor


_TORCH_FIELDS = ("seq_lengths", "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices", "BLOCK_SIZE", "mask_mod")


def _sliced_mask_mod(b, h, q_idx, kv_idx):
    raise BlockMaskError("a sliced BlockMask has no usable mask_mod; build the mask for the slice "
                         "with create_block_mask instead")


def _pair(block_size) -> tuple[int, int]:
    pair = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(pair) != 2 or not all(isinstance(x, int) and x > 0 for x in pair):
        raise BlockMaskError(f"BLOCK_SIZE must be a positive int or a (q, kv) pair of them, got {block_size!r}")
    return pair  # type: ignore[return-value]


class BlockMask:
    """Block-sparse structure of a mask plus the mask_mod to apply in partial tiles.

    Shapes (``B``/``H`` may be 1 when the mask does not depend on them):
    ``kv_num_blocks`` (B, H, Q_BLOCKS), ``kv_indices`` (B, H, Q_BLOCKS, KV_BLOCKS),
    likewise ``full_kv_*``; ``q_num_blocks`` (B, H, KV_BLOCKS), ``q_indices``
    (B, H, KV_BLOCKS, Q_BLOCKS), likewise ``full_q_*``. All int32.
    """

    def __init__(self, seq_lengths, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                 q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
                 BLOCK_SIZE=(DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE), mask_mod=None):
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
        self.BLOCK_SIZE = _pair(BLOCK_SIZE)
        self.mask_mod = mask_mod if mask_mod is not None else noop_mask
        # Set by create_block_mask: the traced mask (so attention need not trace again)
        # and how the tiles were decided (see explain()).
        self.traced_mask = None
        self.stats: dict = {}

    @classmethod
    def from_kv_blocks(cls, kv_num_blocks, kv_indices, full_kv_num_blocks=None, full_kv_indices=None,
                       BLOCK_SIZE=DEFAULT_BLOCK_SIZE, mask_mod=None, seq_lengths=None,
                       compute_q_blocks=True) -> "BlockMask":
        """Build a BlockMask from kv-major block lists (as ``torch``'s ``from_kv_blocks``).

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
        block = _pair(BLOCK_SIZE)
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * block[0], kv_indices.shape[-1] * block[1])
        return cls(seq_lengths, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                   q_num, q_idx, full_q_num, full_q_idx, block, mask_mod)

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
        """The fields as a tuple, in torch's order."""
        tensors = (self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
                   self.q_num_blocks, self.q_indices, self.full_q_num_blocks, self.full_q_indices)
        if flatten:
            return (*self.seq_lengths, *tensors, *self.BLOCK_SIZE, self.mask_mod)
        return (self.seq_lengths, *tensors, self.BLOCK_SIZE, self.mask_mod)

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
        """Percentage of tiles skipped (empty), as torch computes it."""
        q_block, kv_block = self.BLOCK_SIZE
        visited = self.to_dense().sum().item() * q_block * kv_block
        return 100.0 * (1.0 - visited / max(self.numel(), 1))

    def to_string(self, grid_size: int = 20) -> str:
        """An ASCII picture of batch 0, head 0: ``██`` full, ``░░`` partial, blank empty tiles.

        Shows at most ``grid_size`` x ``grid_size`` tiles (the top-left corner of larger masks).
        """
        classes = self.tile_classes()[0, 0, :grid_size, :grid_size]
        glyph = {EMPTY: "  ", PARTIAL: "░░", FULL: "██"}
        rows = ["".join(glyph[int(c)] for c in row) for row in classes]
        n_q, n_kv = self.kv_indices.shape[-2:]
        note = "" if n_q <= grid_size and n_kv <= grid_size else f" (first {grid_size}x{grid_size} of {n_q}x{n_kv} tiles)"
        return f"b=0, h=0{note}\n" + "\n".join(rows)

    def __getitem__(self, index) -> "BlockMask":
        """Slice batch, head and q-block dims like torch: ``bm[b]``, ``bm[b, h]``, ``bm[:, :, 2:4]``.

        The slice keeps every kv block; its mask_mod cannot be used (it would see
        shifted indices), so attention with it raises ``BlockMaskError``.
        """
        index = index if isinstance(index, tuple) else (index,)
        index = tuple(slice(i, i + 1) if isinstance(i, int) else i for i in index)
        full = None if self.full_kv_num_blocks is None else (self.full_kv_num_blocks[index], self.full_kv_indices[index])
        return BlockMask.from_kv_blocks(self.kv_num_blocks[index], self.kv_indices[index], *(full or (None, None)),
                                        BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=_sliced_mask_mod,
                                        seq_lengths=self.seq_lengths)

    @classmethod
    def from_torch(cls, torch_block_mask) -> "BlockMask":
        """A flexattn BlockMask with the fields of ``torch.nn.attention.flex_attention.BlockMask``.

        Raises ``BlockMaskError`` for an object without those fields.
        """
        try:
            fields = [getattr(torch_block_mask, name) for name in _TORCH_FIELDS]
        except AttributeError as error:
            raise BlockMaskError(f"expected a BlockMask (flexattn's or torch's), got "
                                 f"{type(torch_block_mask).__name__}") from error
        return cls(*fields)

    def to_torch(self):
        """The same mask as a ``torch.nn.attention.flex_attention.BlockMask`` (for torch's flex_attention)."""
        from torch.nn.attention.flex_attention import BlockMask as TorchBlockMask

        return TorchBlockMask.from_kv_blocks(
            self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
            BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod, seq_lengths=self.seq_lengths)

    def explain(self) -> str:
        """How the tiles were decided: symbolically from the IR, or by dense refinement."""
        counts = torch.bincount(self.tile_classes().flatten().long(), minlength=3).tolist()
        lines = [f"{counts[FULL]} full, {counts[PARTIAL]} partial, {counts[EMPTY]} empty tiles "
                 f"of {self.BLOCK_SIZE[0]}x{self.BLOCK_SIZE[1]} (sparsity {self.sparsity():.1f}%)"]
        if self.stats:
            lines.append(f"{self.stats['decided_symbolically']} of {self.stats['tiles']} distinct tiles decided "
                         f"symbolically ({self.stats.get('subdivided', 0)} of them from pieces of the tile), "
                         f"{self.stats['refined']} refined densely, "
                         f"{self.stats['left_partial']} left partial (exact=False); "
                         f"the mask depends on {', '.join(self.stats['depends_on']) or 'nothing'}")
        return "\n".join(lines)

    def plot(self, path, batch: int = 0, head: int = 0) -> None:
        """Write a PNG of one (batch, head): full, partial and empty tiles in three colours, with a legend."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch

        colours = ["#f2f2f2", "#f4a261", "#264653"]
        classes = self.tile_classes()[batch, head].numpy()
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(classes, cmap=ListedColormap(colours), vmin=0, vmax=2, interpolation="nearest")
        ax.set_xlabel(f"kv block ({self.BLOCK_SIZE[1]} keys)")
        ax.set_ylabel(f"q block ({self.BLOCK_SIZE[0]} queries)")
        ax.set_title(f"{getattr(self.mask_mod, '__name__', 'mask')}: sparsity {self.sparsity():.1f}%")
        ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colours, ("empty", "partial", "full"))],
                  loc="upper right", bbox_to_anchor=(1.0, -0.08), ncol=3)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise ``BlockMaskError`` unless this mask was built for these lengths."""
        if (q_len, kv_len) != tuple(self.seq_lengths):
            raise BlockMaskError(
                f"this BlockMask was built for Q_LEN={self.seq_lengths[0]}, KV_LEN={self.seq_lengths[1]}, "
                f"but the inputs have Q_LEN={q_len}, KV_LEN={kv_len}. Build it with "
                f"create_block_mask(mask_mod, B, H, {q_len}, {kv_len}).")

    def __repr__(self) -> str:
        return (f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, "
                f"sparsity={self.sparsity():.2f}%, mask_mod={getattr(self.mask_mod, '__name__', self.mask_mod)})")
