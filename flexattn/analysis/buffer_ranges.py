"""Range summaries of captured buffers: min/max of a buffer over any index range."""

from __future__ import annotations

import torch

from flexattn.analysis.intervals import Range


class BufferRanges:
    """Range summaries of the mask's buffers: min/max of a 1-D buffer over any index range in O(1)."""

    def __init__(self, buffers):
        self.tables = []
        self.next_change = []  # per 1-D buffer: for each i, the first j > i with buf[j] != buf[j - 1]
        for buf in buffers:
            values = buf.detach().to("cpu").long().reshape(-1) if buf.dim() == 1 else None
            if values is None or values.numel() == 0:
                flat = buf.detach().to("cpu").long().reshape(-1)
                self.tables.append((int(flat.min()), int(flat.max())) if flat.numel() else (0, 0))
                self.next_change.append(None)
                continue
            n = values.numel()
            at = torch.where(values[1:] != values[:-1], torch.arange(1, n), n)
            suffix_min = at.flip(0).cummin(0).values.flip(0)
            self.next_change.append(torch.cat([suffix_min, torch.tensor([n])]))
            if bool((values[1:] >= values[:-1]).all()):  # sorted (document ids): the ends are the extremes
                self.tables.append(("sorted", values))
                continue
            mins, maxs = [values], [values]
            width = 1
            while 2 * width <= values.numel():  # sparse table: level k covers 2**k entries
                mins.append(torch.minimum(mins[-1][:-width], mins[-1][width:]))
                maxs.append(torch.maximum(maxs[-1][:-width], maxs[-1][width:]))
                width *= 2
            self.tables.append((mins, maxs))

    def __call__(self, index: int, ranges: list[Range]) -> Range:
        table = self.tables[index]
        if isinstance(table[0], int):
            return Range(torch.tensor(table[0]), torch.tensor(table[1]))
        if table[0] == "sorted":
            values = table[1]
            lo, hi = (r.clamp(0, values.numel() - 1) for r in (ranges[0].lo, ranges[0].hi))
            return Range(values[lo], values[hi])
        mins, maxs = table
        n = mins[0].numel()
        lo, hi = (r.clamp(0, n - 1) for r in (ranges[0].lo, ranges[0].hi))
        lo, hi = torch.broadcast_tensors(lo, hi)
        level = torch.floor(torch.log2((hi - lo + 1).double())).long()
        out_lo, out_hi = torch.empty_like(lo), torch.empty_like(lo)
        for k in torch.unique(level).tolist():
            sel = level == k
            a, b = lo[sel], hi[sel] - (1 << k) + 1
            out_lo[sel] = torch.minimum(mins[k][a], mins[k][b])
            out_hi[sel] = torch.maximum(maxs[k][a], maxs[k][b])
        return Range(out_lo, out_hi)

    def first_change(self, index: int, lo: torch.Tensor, hi: torch.Tensor):
        """Per range [lo, hi] of a 1-D buffer's index, the first index in (lo, hi] where the
        value changes (-1 where it does not); None for buffers without that summary."""
        table = self.next_change[index]
        if table is None:
            return None
        n = table.numel()
        lo, hi = torch.broadcast_tensors(lo, hi)
        # Loads clamp indices, so below 0 the value is buf[0] and past the end buf[n - 1].
        change = table[lo.clamp(0, n - 1)]
        return torch.where((change > lo) & (change <= hi) & (change < n), change, -1)
