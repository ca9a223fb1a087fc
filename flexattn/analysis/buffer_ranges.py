"""Range summaries of captured buffers: min/max of a buffer over any index range."""

from __future__ import annotations

import numpy as np

from flexattn.analysis.intervals import Range


class BufferRanges:
    """Range summaries of the mask's buffers: min/max of a 1-D buffer over any index range in O(1)."""

    def __init__(self, buffers):
        self.tables = []
        self.next_change = []  # per 1-D buffer: for each i, the first j > i with buf[j] != buf[j - 1]
        for buf in buffers:
            flat = buf.detach().to("cpu").long().reshape(-1).numpy()
            values = flat if buf.dim() == 1 else None
            if values is None or values.size == 0:
                self.tables.append((int(flat.min()), int(flat.max())) if flat.size else (0, 0))
                self.next_change.append(None)
                continue
            n = values.size
            at = np.where(values[1:] != values[:-1], np.arange(1, n, dtype=np.int64), n)
            suffix_min = np.minimum.accumulate(at[::-1])[::-1]
            self.next_change.append(np.concatenate([suffix_min, [n]]))
            if bool((values[1:] >= values[:-1]).all()):  # sorted (document ids): the ends are the extremes
                self.tables.append(("sorted", values))
                continue
            mins, maxs = [values], [values]
            width = 1
            while 2 * width <= values.size:  # sparse table: level k covers 2**k entries
                mins.append(np.minimum(mins[-1][:-width], mins[-1][width:]))
                maxs.append(np.maximum(maxs[-1][:-width], maxs[-1][width:]))
                width *= 2
            self.tables.append((mins, maxs))

    def __call__(self, index: int, ranges: list[Range]) -> Range:
        table = self.tables[index]
        if isinstance(table[0], int):
            return Range(np.int64(table[0]), np.int64(table[1]))
        if table[0] == "sorted":
            values = table[1]
            lo, hi = (np.clip(r, 0, values.size - 1) for r in (ranges[0].lo, ranges[0].hi))
            return Range(values[lo], values[hi])
        mins, maxs = table
        n = mins[0].size
        lo, hi = (np.clip(r, 0, n - 1) for r in (ranges[0].lo, ranges[0].hi))
        lo, hi = np.broadcast_arrays(lo, hi)
        level = np.floor(np.log2(hi - lo + 1.0)).astype(np.int64)
        out_lo, out_hi = np.empty_like(lo), np.empty_like(lo)
        for k in np.unique(level).tolist():
            sel = level == k
            a, b = lo[sel], hi[sel] - (1 << k) + 1
            out_lo[sel] = np.minimum(mins[k][a], mins[k][b])
            out_hi[sel] = np.maximum(maxs[k][a], maxs[k][b])
        return Range(out_lo, out_hi)

    def first_change(self, index: int, lo: np.ndarray, hi: np.ndarray):
        """Per range [lo, hi] of a 1-D buffer's index, the first index in (lo, hi] where the
        value changes (-1 where it does not); None for buffers without that summary."""
        table = self.next_change[index]
        if table is None:
            return None
        n = table.size
        lo, hi = np.broadcast_arrays(lo, hi)
        # Loads clamp indices, so below 0 the value is buf[0] and past the end buf[n - 1].
        change = table[np.clip(lo, 0, n - 1)]
        return np.where((change > lo) & (change <= hi) & (change < n), change, -1)
