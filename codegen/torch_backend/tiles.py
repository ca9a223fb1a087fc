"""The work list of a block-sparse kernel: which KV tiles each query block row visits.

``plan_rows`` reads a BlockMask once per call and returns, for every query
block row with at least one non-empty tile, a list of ``Piece``s: runs of KV
tiles that the kernel gathers into one contiguous (…, cols, D) chunk and
handles with one batched matmul over (batch, heads). FULL tiles come first in
a piece (no mask), PARTIAL tiles after them (mask applied); EMPTY tiles are
never listed, so work is proportional to the non-empty tiles.

When the BlockMask has batch/head dimensions of 1 every (b, h) visits the same
tiles (``Piece.tiles`` is 1-D). Otherwise each (b, h) lists its own tiles,
padded to the longest list of that row; padded slots point at tile 0 and are
switched off by ``Piece.valid``. Under GQA, lists that are the same for every
query head of a KV head (a selection shared by the group) are kept per KV head,
so the kernel gathers each KV head's tiles once for its whole group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flexattn.block_mask import EMPTY, FULL


@dataclass
class Piece:
    """A run of KV tiles of one query block row.

    ``tiles``: int64 (n,) shared by all (b, h), or (Bm, Hm, n) per (b, h): Hm is 1 or the
    number of KV heads (a list per KV head, for all its query heads) or of query heads.
    ``span``: ``(first, stop)`` when the shared tiles are consecutive (the
    kernel then slices K/V instead of gathering them), else None.
    ``partial_runs``: ``(start, stop)`` column ranges that come from PARTIAL
    tiles (the mask is applied there only); every other column is FULL.
    ``kv_idx``: int64 (1, 1, 1, cols) or (Bm, 1 or Hq, 1, cols): the key position of each column.
    ``valid``: bool (Bm, 1 or Hq, 1, cols) or None: False at padded slots and at
    key positions past KV_LEN (the last tile of an odd length).
    ``full_cols``: bool (Bm, Hm, 1, cols) or None: True where a column of a PARTIAL run is FULL
    for that (b, h) (shared pieces of rows whose (b, h) class their tiles differently): kept
    there without the mask, since a FULL tile is attended whole whatever the mask_mod says.
    """

    tiles: torch.Tensor
    span: tuple[int, int] | None
    partial_runs: list[tuple[int, int]]
    kv_idx: torch.Tensor
    valid: torch.Tensor | None
    full_cols: torch.Tensor | None = None


@dataclass
class Row:
    """One query block row: query positions ``[q_start, q_stop)`` and its pieces."""

    q_start: int
    q_stop: int
    pieces: list[Piece]


def _runs(flags: list[bool], kv_block: int) -> list[tuple[int, int]]:
    """Column ranges of the consecutive True flags (one flag per tile)."""
    runs: list[tuple[int, int]] = []
    for i, flag in enumerate(flags):
        if not flag:
            continue
        if runs and runs[-1][1] == i * kv_block:
            runs[-1] = (runs[-1][0], (i + 1) * kv_block)
        else:
            runs.append((i * kv_block, (i + 1) * kv_block))
    return runs


def _piece(full: torch.Tensor, partial: torch.Tensor, full_count, partial_count,
           kv_block: int, kv_len: int, group: int = 1, full_for: torch.Tensor | None = None) -> Piece:
    """``full_for`` (shared tiles only): bool (Bm, Hm, KV tiles), which tiles are FULL per (b, h)."""
    tiles = torch.cat([full, partial], dim=-1).long()
    n_full = full.shape[-1]
    span, full_cols = None, None
    if tiles.dim() == 1:
        # Shared tiles in ascending order: FULL and PARTIAL tiles usually form one
        # consecutive span (causal, sliding window), so K/V are sliced, not copied.
        order = tiles.argsort()
        tiles = tiles[order]
        listed = tiles.tolist()
        if listed == list(range(listed[0], listed[0] + len(listed))):
            span = (listed[0], listed[0] + len(listed))
        in_partial = order >= n_full
        partial_runs = _runs(in_partial.tolist(), kv_block)
        if full_for is not None and bool(full_for[..., tiles[in_partial]].any()):
            full_cols = full_for[..., tiles].repeat_interleave(kv_block, dim=-1).unsqueeze(-2)
    else:
        partial_runs = [(n_full * kv_block, tiles.shape[-1] * kv_block)] if partial.shape[-1] else []
    kv_idx = (tiles.unsqueeze(-1) * kv_block + torch.arange(kv_block)).flatten(-2)
    valid = kv_idx < kv_len if kv_len % kv_block else None
    if full_count is not None:  # per-(b, h) lists: switch off the padded slots
        slot = torch.arange(tiles.shape[-1])
        listed = torch.where(slot < n_full, slot < full_count.unsqueeze(-1),
                             (slot - n_full) < partial_count.unsqueeze(-1))
        if not bool(listed.all()):  # every (b, h) lists as many tiles: no slot to switch off
            listed = listed.repeat_interleave(kv_block, dim=-1)
            valid = listed if valid is None else valid & listed
    if tiles.dim() == 1:
        kv_idx = kv_idx.view(1, 1, 1, -1)
        valid = valid.view(1, 1, 1, -1) if valid is not None else None
    else:
        # Lists per KV head: their columns repeat for each query head of the group (the mods see h).
        per_query_head = (lambda x: x.repeat_interleave(group, dim=1)) if group > 1 and tiles.shape[1] > 1 \
            else (lambda x: x)
        kv_idx = per_query_head(kv_idx.unsqueeze(-2))
        valid = per_query_head(valid.unsqueeze(-2)) if valid is not None else None
    return Piece(tiles, span, partial_runs, kv_idx, valid, full_cols)


def plan_rows(block_mask, q_len: int, kv_len: int, block_size: tuple[int, int],
              max_tiles: int, group: int = 1) -> list[Row]:
    """The rows (and their pieces of at most ``max_tiles`` tiles) a kernel visits; ``group``: query
    heads per KV head (GQA).

    ``block_mask`` None means every tile is FULL. Tile indices past the last KV
    tile are clamped into range, so a malformed mask cannot make the kernel
    read out of bounds.

    Example::

        >>> rows = plan_rows(None, 300, 300, (128, 128), max_tiles=16)
        >>> [(r.q_start, r.q_stop, len(r.pieces)) for r in rows]
        [(0, 128, 1), (128, 256, 1), (256, 300, 1)]
    """
    q_block, kv_block = block_size
    q_blocks, kv_blocks = math.ceil(q_len / q_block), math.ceil(kv_len / kv_block)
    if block_mask is None:
        every = torch.arange(kv_blocks)
        none = every[:0]
        pieces = [_piece(every[s:s + max_tiles], none, None, None, kv_block, kv_len)
                  for s in range(0, kv_blocks, max_tiles)]
        return [Row(i * q_block, min((i + 1) * q_block, q_len), pieces) for i in range(q_blocks)]

    partial_num = block_mask.kv_num_blocks[..., :q_blocks].long()
    partial_idx = block_mask.kv_indices[..., :q_blocks, :].long().clamp(0, kv_blocks - 1)
    if block_mask.full_kv_num_blocks is not None:
        full_num = block_mask.full_kv_num_blocks[..., :q_blocks].long()
        full_idx = block_mask.full_kv_indices[..., :q_blocks, :].long().clamp(0, kv_blocks - 1)
    else:
        full_num = torch.zeros_like(partial_num)
        full_idx = partial_idx[..., :0]
    shared = partial_num.shape[0] == 1 and partial_num.shape[1] == 1
    kv_group = 1  # query heads of one list
    if not shared and group > 1 and partial_num.shape[1] > 1 and _same_within_groups(
            group, partial_num, partial_idx, full_num, full_idx):
        partial_num, partial_idx, full_num, full_idx = (x[:, ::group] for x in (partial_num, partial_idx,
                                                                                 full_num, full_idx))
        kv_group = group
    full_max = full_num.amax(dim=(0, 1)).tolist()
    partial_max = partial_num.amax(dim=(0, 1)).tolist()
    uniform = [False] * q_blocks if shared else _uniform_rows(block_mask, q_blocks, kv_blocks)
    rows = []
    for i in range(q_blocks):
        if uniform[i]:  # every (b, h) visits the same tiles: shared pieces (none for a row visiting none)
            if len(uniform[i][0]) + len(uniform[i][1]):
                rows.append(Row(i * q_block, min((i + 1) * q_block, q_len),
                                _shared_pieces(*uniform[i], max_tiles, kv_block, kv_len)))
            continue
        nf, np_ = full_max[i], partial_max[i]
        if nf + np_ == 0:
            continue
        pieces = []
        # Split the row into pieces of at most max_tiles tiles (merged by online softmax).
        for start in range(0, nf + np_, max_tiles):
            stop = min(start + max_tiles, nf + np_)
            f0, f1 = min(start, nf), min(stop, nf)
            p0, p1 = max(start - nf, 0), max(stop - nf, 0)
            if shared:
                pieces.append(_piece(full_idx[0, 0, i, f0:f1], partial_idx[0, 0, i, p0:p1],
                                     None, None, kv_block, kv_len))
            else:
                pieces.append(_piece(full_idx[:, :, i, f0:f1], partial_idx[:, :, i, p0:p1],
                                     full_num[:, :, i] - f0, partial_num[:, :, i] - p0,
                                     kv_block, kv_len, kv_group))
        rows.append(Row(i * q_block, min((i + 1) * q_block, q_len), pieces))
    return rows


def _same_within_groups(group: int, partial_num, partial_idx, full_num, full_idx) -> bool:
    """Whether every query head lists the same tiles as the first head of its GQA group (slots
    past a list's count are not compared)."""
    for num, idx in ((partial_num, partial_idx), (full_num, full_idx)):
        listed = torch.where(torch.arange(idx.shape[-1]) < num.unsqueeze(-1), idx, -1)
        for x in (num, listed):
            grouped = x.unflatten(1, (-1, group))
            if not bool((grouped == grouped[:, :, :1]).all()):
                return False
    return True


def loop_work(block_mask, batch: int, heads: int, q_len: int, kv_len: int, block_size: tuple[int, int],
              max_tiles: int) -> tuple[int, int]:
    """(query-key products, pieces) the generated loop computes for a call, from the tile counts
    alone (what ``plan_rows`` would list): every (b, h) of a query block row visits as many tiles as
    the longest FULL list plus the longest PARTIAL list of that row (shorter lists are padded), in pieces of at most ``max_tiles``.

    Example::

        >>> loop_work(None, 1, 8, 300, 300, (128, 128), max_tiles=16)
        (921600, 3)
    """
    q_block, kv_block = block_size
    q_blocks, kv_blocks = math.ceil(q_len / q_block), math.ceil(kv_len / kv_block)
    if block_mask is None:
        tiles = torch.full((q_blocks,), kv_blocks)
    else:
        tiles = block_mask.kv_num_blocks[..., :q_blocks].long().amax(dim=(0, 1))
        if block_mask.full_kv_num_blocks is not None:
            tiles = tiles + block_mask.full_kv_num_blocks[..., :q_blocks].long().amax(dim=(0, 1))
    rows = (torch.arange(1, q_blocks + 1) * q_block).clamp(max=q_len) - torch.arange(q_blocks) * q_block
    products = int((rows * tiles).sum()) * kv_block * batch * heads
    return products, int((-(-tiles // max_tiles)).sum())


def _uniform_rows(block_mask, q_blocks: int, kv_blocks: int) -> list:
    """Per q-block row of a per-(b, h) BlockMask: (FULL tiles, PARTIAL tiles, which tiles are FULL
    per (b, h)) when every (b, h) visits the same tiles, else False.

    Such a row runs as shared pieces: a tile FULL for some (b, h) and PARTIAL for others is listed
    PARTIAL, and its piece's ``full_cols`` keeps it whole for the (b, h) it is FULL for (the
    mask_mod need not hold in a FULL tile: a BlockMask from ``from_kv_blocks``, or a captured
    tensor changed after the build); K/V are sliced or gathered once for the batch instead of per
    (b, h). Padding masks are like this: the padded sequence's tiles are PARTIAL, the others' FULL.
    """
    classes = block_mask.tile_classes()
    if classes.shape[-2] < q_blocks or classes.shape[-1] != kv_blocks:
        return [False] * q_blocks
    full_for = classes[..., :q_blocks, :] == FULL  # (Bm, Hm, rows, tiles)
    visited = (classes[..., :q_blocks, :] != EMPTY).flatten(0, 1)  # (Bm * Hm, rows, tiles)
    same = (visited == visited[:1]).all(dim=0).all(dim=-1).tolist()
    full = full_for.flatten(0, 1).all(dim=0)
    partial = visited[0] & ~full
    return [(full[i].nonzero().flatten(), partial[i].nonzero().flatten(), full_for[:, :, i]) if same[i] else False
            for i in range(q_blocks)]


def _shared_pieces(full: torch.Tensor, partial: torch.Tensor, full_for: torch.Tensor, max_tiles: int,
                   kv_block: int, kv_len: int) -> list[Piece]:
    """Pieces of at most ``max_tiles`` tiles of one row's shared FULL and PARTIAL tiles;
    ``full_for``: bool (Bm, Hm, KV tiles), the row's FULL tiles per (b, h)."""
    tiles = torch.cat([full, partial])
    n_full = len(full)
    return [_piece(tiles[s:min(s + max_tiles, n_full)], tiles[max(s, n_full):s + max_tiles], None, None,
                   kv_block, kv_len, full_for=full_for) for s in range(0, len(tiles), max_tiles)]
