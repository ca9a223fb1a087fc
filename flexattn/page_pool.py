"""Which physical pages of a paged KV cache are free, and where a sequence's next page goes.

Any free page serves any sequence, so the pool never refuses a page while one is
free. Where the page goes still matters on the CPU: attention reads a sequence's
pages in physical order, and scattered pages are read slower than one run
(docs/performance.md). So pages are placed the way a file system places
growing files:

* a sequence grows in place: it takes the page right after its last one while
  that page is free;
* otherwise it starts a new run in the largest free run of pages, at its start,
  or, where a live sequence's last page borders that run (a neighbour that will
  grow into it), in its middle, leaving both room to grow.

Sequences that grow side by side, token by token, then each own a few long runs
instead of every n-th page (torch's stack of free pages hands them out
round-robin).
"""

from __future__ import annotations

import torch

_FREE, _USED = 1, 0  # one byte per page


class PagePool:
    """The free pages of a pool of ``n_pages`` (all free at first)."""

    def __init__(self, n_pages: int):
        self._free = bytearray([_FREE]) * n_pages
        self.free_count = n_pages

    def take(self, count: int, last_page: int | None, tails: set[int]) -> list[int]:
        """``count`` (<= ``free_count``) free pages for a sequence whose last page is ``last_page``
        (None: it has none), in the order the sequence will use them; ``tails``: the last pages of
        the live sequences (its own may be among them: the page after it is taken, else the
        sequence would grow in place, so no free run starts there).

        One scan of the pool per call at most, whatever ``count``: a long prompt in a pool
        fragmented into single pages must not scan it once per page."""
        pages: list[int] = []
        runs: list[tuple[int, int]] = []  # free runs, longest first, from the first jump on
        while len(pages) < count:
            after = None if last_page is None else last_page + 1
            if after is not None and after < len(self._free) and self._free[after] == _FREE:
                page = after
            else:
                runs = runs or self._free_runs()  # a run started in its middle leaves its first half out
                start, end = runs.pop(0)
                spare = end - start - (count - len(pages))
                page = start + spare // 2 if spare > 0 and start - 1 in tails else start
            self._free[page] = _USED
            pages.append(page)
            last_page = page
        self.free_count -= count
        return pages

    def give_back(self, pages: list[int]) -> None:
        """Pages a sequence no longer owns."""
        for page in pages:
            self._free[page] = _FREE
        self.free_count += len(pages)

    def _free_runs(self) -> list[tuple[int, int]]:
        """The runs [start, end) of free pages, longest first (the lowest first among equals)."""
        free = torch.frombuffer(self._free, dtype=torch.uint8).to(torch.int8)
        edges = torch.diff(free, prepend=free.new_zeros(1), append=free.new_zeros(1))
        starts, ends = (edges == 1).nonzero().view(-1), (edges == -1).nonzero().view(-1)
        order = torch.sort(ends - starts, descending=True, stable=True).indices
        return list(zip(starts[order].tolist(), ends[order].tolist()))
