"""torch's block index lists, built from a tile matrix in a few passes over memory.

Per row of tiles, torch lists the selected columns in ascending order, then
the others in ascending order (the order a stable descending argsort of the
0/1 row gives). Rows of real masks are a few runs of equal tiles (a causal
row: full, partial, empty), so the lists are built from the runs: each run
of columns ``[c, c + n)`` lands at some output position ``p`` as the values
``c .. c + n - 1``, i.e. ``value = position + (c - p)``. Writing the change
of ``c - p`` at each run's start and taking a cumulative sum along the row
gives every list at once: O(tiles) memory traffic, no sort, no int64 scatter.
"""

from __future__ import annotations

import numpy as np
import torch

from flexattn.errors import BlockMaskError


def _runs(codes: torch.Tensor, down_columns: bool):
    """Runs of equal values along each row (or, with ``down_columns``, each column) of
    a contiguous (lead, rows, cols) tensor, found without transposing it in memory.

    Returns (line, start, length, code) of every run, where a line is a row (or a
    column: ``lead * cols + col``), lines in order and runs in order within a line.
    """
    lead, rows, cols = codes.shape
    starts = torch.empty(lead, rows, cols, dtype=torch.bool, device=codes.device)
    if down_columns:
        starts[:, 0, :] = True
        torch.ne(codes[:, 1:, :], codes[:, :-1, :], out=starts[:, 1:, :])
        where = starts.nonzero()
        # Position of each run start in the transposed layout (lead, cols, rows), sorted.
        flat, _ = torch.sort((where[:, 0] * cols + where[:, 2]) * rows + where[:, 1])
        line_length = rows
    else:
        starts[:, :, 0] = True
        torch.ne(codes[:, :, 1:], codes[:, :, :-1], out=starts[:, :, 1:])
        flat = starts.view(-1).nonzero().squeeze(1)
        line_length = cols
    length = torch.diff(flat, append=flat.new_tensor([codes.numel()]))
    line, start = flat // line_length, flat % line_length
    value_at = ((line // cols) * rows + start) * cols + line % cols if down_columns else flat
    return line, start, length, codes.view(-1)[value_at]


def _lists_from_runs(row, col, length, listed, rows: int, cols: int):
    """(num (rows,), indices (rows, cols)) int32 for the runs whose ``listed`` flag is set.

    ``row``/``col``/``length`` describe every run of a (rows, cols) matrix, in order.
    """
    device = row.device
    if not bool(listed.any()):  # nothing listed (a mask without FULL tiles): every row is 0 .. cols - 1
        indices = torch.arange(cols, dtype=torch.int32, device=device).expand(rows, cols).contiguous()
        return torch.zeros(rows, dtype=torch.int32, device=device), indices
    listed_len = length * listed
    num = torch.zeros(rows, dtype=torch.int64, device=device).index_add_(0, row, listed_len)
    # Output position of each run: listed runs first, then the others, each in column order.
    before_listed = torch.cumsum(listed_len, 0) - listed_len
    before_other = torch.cumsum(length - listed_len, 0) - (length - listed_len)
    first = (col == 0).nonzero().squeeze(1)  # each row's first run starts at column 0
    position = torch.where(listed, before_listed - before_listed[first][row],
                           num[row] + before_other - before_other[first][row])
    # Runs in output order along each row, and the jump of (value - position) at each run's start.
    order = torch.argsort(row * cols + position)
    row, position, offset = row[order], position[order], (col - position)[order]
    previous = torch.cat([offset.new_zeros(1), offset[:-1]])
    jump = torch.where(torch.cat([row.new_ones(1, dtype=torch.bool), row[1:] != row[:-1]]), offset,
                       offset - previous)
    steps = torch.ones(rows, cols, dtype=torch.int32, device=device)
    steps[:, 0] = 0
    steps.view(-1).index_add_(0, row * cols + position, jump.to(torch.int32))
    return num.to(torch.int32), steps.cumsum_(-1)


def ordered_lists(codes: torch.Tensor, selected: tuple[int, ...], transposed: bool = False):
    """For each code in ``selected``: torch's (num_blocks, indices) of the tiles with that code.

    ``codes`` is (..., rows, cols) of small ints (tile classes, or 0/1); with
    ``transposed`` the lists are those of ``codes.transpose(-2, -1)`` (the
    q-major lists), read without a transposed copy. Results are int32, contiguous:
    (..., rows) and (..., rows, cols), or (..., cols) and (..., cols, rows) transposed.
    """
    *lead, rows, cols = codes.shape
    lines, width = (cols, rows) if transposed else (rows, cols)
    if codes.numel() == 0:
        num = torch.zeros(*lead, lines, dtype=torch.int32, device=codes.device)
        return [(num, torch.zeros(*lead, lines, width, dtype=torch.int32, device=codes.device)) for _ in selected]
    flat = codes.reshape(-1, rows, cols).contiguous()
    line, start, length, code = _runs(flat, transposed)
    out = []
    for value in selected:
        num, indices = _lists_from_runs(line, start, length, code == value, flat.shape[0] * lines, width)
        out.append((num.view(*lead, lines), indices.view(*lead, lines, width)))
    return out


def box_lists(boxes: np.ndarray, shape: tuple[int, int, int], selected: tuple[int, ...], device="cpu"):
    """``ordered_lists`` of a stack of tile matrices given as disjoint boxes, without the matrices.

    ``boxes`` is a (6, N) int64 array of (matrix, first row, row end, first column,
    column end, code), ends exclusive; tiles in no box have code 0. ``shape`` is
    (matrices, rows, cols). Returns, for each code in ``selected``, (num (matrices * rows,),
    indices (matrices * rows, cols)) int32 on ``device``. Work and memory beyond the
    output follow the runs of equal tiles in the rows the boxes span, not rows x cols.

    Example (one box of code 1 over rows 0-1, columns 1-2 of a 2 x 4 matrix)::

        >>> num, indices = box_lists(np.array([[0], [0], [2], [1], [3], [1]]), (1, 2, 4), (1,))[0]
        >>> num.tolist(), indices.tolist()
        ([2, 2], [[1, 2, 0, 3], [1, 2, 0, 3]])
    """
    matrices, rows, cols = shape
    matrix, row_lo, row_end, col_lo, col_end, code = boxes
    height = row_end - row_lo
    box = np.repeat(np.arange(len(height)), height)  # one run per (box, row it spans)
    row = row_lo[box] + np.arange(len(box)) - np.repeat(np.cumsum(height) - height, height)
    line, start, end, code = matrix[box] * rows + row, col_lo[box], col_end[box], code[box]
    order = np.argsort(line * cols + start, kind="stable")
    line, start, end, code = line[order], start[order], end[order], code[order]
    # The columns no box covers: before each run (after the previous run of its line) and after each line's last.
    gap_lo = np.where(np.diff(line, prepend=-1) != 0, 0, np.roll(end, 1))
    tail_lo = np.zeros(matrices * rows, dtype=np.int64)
    last = np.diff(line, append=matrices * rows) != 0
    tail_lo[line[last]] = end[last]
    lines = np.arange(matrices * rows)
    runs = [np.concatenate(parts) for parts in ((line, line, lines), (start, gap_lo, tail_lo),
                                                (end - start, start - gap_lo, cols - tail_lo),
                                                (code, np.zeros_like(gap_lo), np.zeros_like(tail_lo)))]
    keep = np.flatnonzero(runs[2] > 0)
    keep = keep[np.argsort(runs[0][keep] * cols + runs[1][keep], kind="stable")]
    line, start, length, code = (x[keep] for x in runs)
    # Neighbouring runs of one code merge (boxes of a quadtree cut a row into many).
    first = np.flatnonzero((np.diff(line, prepend=-1) != 0) | (np.diff(code, prepend=-1) != 0))
    line, start, length, code = (torch.from_numpy(x).to(device) for x in (
        line[first], start[first], np.add.reduceat(length, first) if len(first) else length, code[first]))
    return [_lists_from_runs(line, start, length, code == value, matrices * rows, cols) for value in selected]


def ordered_to_dense(num_blocks: torch.Tensor, indices: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Inverse of ``ordered_lists`` for one code: int32 0/1 tiles of shape (..., rows, num_cols)."""
    listed = torch.arange(indices.shape[-1], device=indices.device) < num_blocks.unsqueeze(-1)
    dense = torch.zeros(*indices.shape[:-1], num_cols + 1, dtype=torch.int32, device=indices.device)
    # Unlisted entries write to a spare column that is dropped afterwards.
    target = torch.where(listed, indices.long(), num_cols)
    dense.scatter_(-1, target, 1)
    return dense[..., :num_cols]


def transpose_ordered(num_blocks: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lists of the transposed tile matrix (kv-major <-> q-major)."""
    dense = ordered_to_dense(num_blocks, indices, indices.shape[-1])
    return ordered_lists(dense.to(torch.int8), (1,), transposed=True)[0]


def crop_lists(num_blocks: torch.Tensor, indices: torch.Tensor, rows: int, cols: int):
    """torch's crop of (B, H, R, C) lists to their first ``rows`` rows and ``cols`` entries (``BlockMask._adjust``).

    Each count becomes the number of kept entries whose value is below ``min(count, cols)``:
    exact for rows that list blocks 0, 1, 2, ... (causal-like), as torch assumes.
    Returns (num_blocks (B, H, rows) int32, indices (B, H, rows, cols)).

    Raises ``BlockMaskError`` when a kept row would list a block past ``cols`` (where
    torch's ``_adjust`` fails with an IndexError).
    """
    indices = indices[:, :, :rows, :cols]
    kept = torch.clamp(num_blocks[:, :, :rows], max=cols)
    num = (indices < kept[:, :, :, None]).sum(dim=-1).to(torch.int32)
    listed = torch.arange(indices.shape[-1], device=indices.device) < num[..., None]
    if bool((listed & (indices >= cols)).any()):
        raise BlockMaskError(f"cropping to {rows} x {cols} blocks keeps a row that lists a kv block past the "
                             f"last one (torch's _adjust fails here too); build the mask for these lengths "
                             f"with create_block_mask instead")
    return num, indices
