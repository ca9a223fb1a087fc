"""Range summaries of captured buffers: min/max of a buffer over any index range.

A buffer of shape (..., n) is summarised row by row along its last dimension: a load
whose leading indices are single values in a box (``doc[b, q_idx]``, ``bias[h, kv_idx]``:
b and h are single values in every box) reads one row, and its range over an index range
of that row is exact in O(1); one whose leading indices span a few rows (a block table
``table[q_idx // 64, kv_idx // 64]`` over a tile) combines those rows. Where they span more,
the summary is the whole buffer's min/max (sound, only less precise).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from flexattn.analysis.intervals import Range

SUMMARY_LIMIT = 1 << 24  # entries: larger buffers keep only their min/max (the summary's memory is bounded)
MAX_ROWS = 8  # a read whose leading indices span more rows is summarised by the buffer's min/max
TABLE_ENTRIES = 1 << 24  # per side of a sparse table: levels beyond it are not built, and reads wider
# than the widest level built get the buffer's min/max


class _Rows:
    """One buffer as (rows, n) values, flattened: a sparse table of min/max (or the values,
    where every row is sorted), and per position the next position whose value changes."""

    def __init__(self, buf):
        values = buf.detach().to("cpu").long().reshape(-1).numpy()
        self.shape = tuple(buf.shape) or (1,)
        self.n = self.shape[-1]
        self.extremes = (int(values.min()), int(values.max())) if values.size else (0, 0)
        self.values = values if 0 < values.size <= SUMMARY_LIMIT else None
        if self.values is None:
            return
        flat = np.arange(values.size, dtype=np.int64)
        row_start = flat % self.n == 0
        changes = np.concatenate([[True], values[1:] != values[:-1]]) | row_start
        at = np.where(changes, flat, values.size)
        # Per position i, the first j > i that starts a new value or a new row.
        self.next_change = np.concatenate([np.minimum.accumulate(at[::-1])[::-1][1:], [values.size]])
        self.sorted = bool(((values[1:] >= values[:-1]) | row_start[1:]).all())
        self.mins, self.maxs = [values], [values]
        width = 1
        while not self.sorted and 2 * width <= self.n and (len(self.mins) + 1) * values.size <= TABLE_ENTRIES:
            # sparse table: level k covers 2**k entries
            self.mins.append(np.minimum(self.mins[-1][:-width], self.mins[-1][width:]))
            self.maxs.append(np.maximum(self.maxs[-1][:-width], self.maxs[-1][width:]))
            width *= 2

    def row_bases(self, leading: list[Range]):
        """Flat indices of the rows the leading index ranges read (they clamp, as loads do): one
        array per combination, a box reading fewer rows repeating its last one; None where they
        read more than ``MAX_ROWS`` rows."""
        if self.values is None or len(leading) != len(self.shape) - 1:
            return None
        clipped = [(np.clip(r.lo, 0, size - 1), np.clip(r.hi, 0, size - 1)) for r, size in zip(leading, self.shape)]
        spans = [int(np.max(hi - lo, initial=0)) + 1 for lo, hi in clipped]
        if math.prod(spans) > MAX_ROWS:
            return None
        bases = [np.int64(0)]
        for (lo, hi), size, span in zip(clipped, self.shape, spans):
            bases = [base * size + np.minimum(lo + j, hi) for base in bases for j in range(span)]
        return [base * self.n for base in bases]

    def range(self, ranges: list[Range]) -> Range:
        bases = self.row_bases(ranges[:-1]) if ranges else None
        if bases is None:
            return Range(np.int64(self.extremes[0]), np.int64(self.extremes[1]))
        per_row = [self._row_range(base, ranges[-1]) for base in bases]
        return Range(functools.reduce(np.minimum, [r.lo for r in per_row]),
                     functools.reduce(np.maximum, [r.hi for r in per_row]))

    def _row_range(self, base, index: Range) -> Range:
        lo, hi = (base + np.clip(r, 0, self.n - 1) for r in (index.lo, index.hi))
        if self.sorted:
            return Range(self.values[lo], self.values[hi])
        lo, hi = np.broadcast_arrays(lo, hi)
        level = np.floor(np.log2(hi - lo + 1.0)).astype(np.int64)
        out_lo, out_hi = (np.full_like(lo, extreme) for extreme in self.extremes)
        for k in np.unique(level).tolist():
            if k >= len(self.mins):
                continue
            sel = level == k
            a, b = lo[sel], hi[sel] - (1 << k) + 1
            out_lo[sel] = np.minimum(self.mins[k][a], self.mins[k][b])
            out_hi[sel] = np.maximum(self.maxs[k][a], self.maxs[k][b])
        return Range(out_lo, out_hi)

    def first_change(self, leading: list[Range], lo: np.ndarray, hi: np.ndarray):
        """The first index in (lo, hi] where one of the rows read changes value (-1: none does)."""
        bases = self.row_bases(leading)
        if bases is None:
            return None
        first = None
        for base in bases:
            row_lo, row_hi, base = np.broadcast_arrays(lo, hi, base)
            # Loads clamp indices, so below 0 the value is row[0] and past the end row[n - 1].
            change = self.next_change[base + np.clip(row_lo, 0, self.n - 1)] - base
            change = np.where((change > row_lo) & (change <= row_hi) & (change < self.n), change, -1)
            first = change if first is None else np.where(
                (first < 0) | ((change >= 0) & (change < first)), change, first)
        return first


class BufferRanges:
    """Range summaries of the mask's buffers (see the module docstring).

    ``ranges(i, index_ranges)`` is the Range of buffer ``i`` read at those index ranges (one
    per dimension); ``first_change(i, lo, hi, leading)`` the first last-dimension index in
    (lo, hi] where the value read changes (-1 where it does not), or None without a summary.
    """

    def __init__(self, buffers):
        self.buffers = [_Rows(buf) for buf in buffers]

    def __call__(self, index: int, ranges: list[Range]) -> Range:
        return self.buffers[index].range(ranges)

    def first_change(self, index: int, lo: np.ndarray, hi: np.ndarray, leading: list[Range] = ()):
        return self.buffers[index].first_change(list(leading), lo, hi)
