"""Range summaries of captured buffers: min/max of a buffer over any index range.

A buffer of shape (..., n) is summarised row by row along its last dimension: a load
whose leading indices are single values in a box (``doc[b, q_idx]``, ``bias[h, kv_idx]``:
b and h are single values in every box) reads one row, and its range over an index range
of that row is exact in O(1). Where a leading index spans several values the summary is
the whole buffer's min/max (sound, only less precise).
"""

from __future__ import annotations

import numpy as np

from flexattn.analysis.intervals import Range

SUMMARY_LIMIT = 1 << 24  # entries: larger buffers keep only their min/max (the summary's memory is bounded)
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

    def row_base(self, leading: list[Range]):
        """Flat index of the row the leading indices select (they clamp, as loads do), or None
        where one of them spans several values."""
        if self.values is None or len(leading) != len(self.shape) - 1:
            return None
        if any(not np.array_equal(r.lo, r.hi) for r in leading):
            return None
        base = np.int64(0)
        for r, size in zip(leading, self.shape[:-1]):
            base = base * size + np.clip(r.lo, 0, size - 1)
        return base * self.n

    def range(self, ranges: list[Range]) -> Range:
        base = self.row_base(ranges[:-1]) if ranges else None
        if base is None:
            return Range(np.int64(self.extremes[0]), np.int64(self.extremes[1]))
        lo, hi = (base + np.clip(r, 0, self.n - 1) for r in (ranges[-1].lo, ranges[-1].hi))
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
        base = self.row_base(leading)
        if base is None:
            return None
        lo, hi, base = np.broadcast_arrays(lo, hi, base)
        # Loads clamp indices, so below 0 the value is row[0] and past the end row[n - 1].
        change = self.next_change[base + np.clip(lo, 0, self.n - 1)] - base
        return np.where((change > lo) & (change <= hi) & (change < self.n), change, -1)


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
