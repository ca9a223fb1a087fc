"""Which physical pages of a paged KV cache are free, and where a sequence's next page goes.

Any free page serves any sequence, so the pool never refuses a page while one is
free. Where the page goes still matters on the CPU: attention reads a sequence's
pages in physical order, and scattered 64 KB pages are read 10-20% slower than
one run (docs/performance.md). So pages are placed the way a file system places
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

import re

_FREE, _USED = b"\x01", b"\x00"
_FREE_RUN = re.compile(rb"\x01+")


class PagePool:
    """The free pages of a pool of ``n_pages`` (all free at first)."""

    def __init__(self, n_pages: int):
        self._free = bytearray(_FREE * n_pages)  # one byte per page: the runs are found by a C-speed scan
        self.free_count = n_pages

    def take(self, count: int, last_page: int | None, tails: set[int]) -> list[int]:
        """``count`` (<= ``free_count``) free pages for a sequence whose last page is ``last_page``
        (None: it has none), in the order the sequence will use them; ``tails``: the last pages of
        the other live sequences."""
        pages: list[int] = []
        while len(pages) < count:
            after = None if last_page is None else last_page + 1
            if after is not None and after < len(self._free) and self._free[after:after + 1] == _FREE:
                page = after
            else:
                page = self._run_start(count - len(pages), tails)
            self._free[page] = _USED[0]
            pages.append(page)
            last_page = page
        self.free_count -= count
        return pages

    def give_back(self, pages: list[int]) -> None:
        """Pages a sequence no longer owns."""
        for page in pages:
            self._free[page] = _FREE[0]
        self.free_count += len(pages)

    def _run_start(self, wanted: int, tails: set[int]) -> int:
        """Where a new run of up to ``wanted`` pages starts: in the largest free run (the first such)."""
        start, end = max((run.span() for run in _FREE_RUN.finditer(self._free)), key=lambda s: s[1] - s[0])
        spare = end - start - wanted
        if spare > 0 and start - 1 in tails:
            return start + spare // 2
        return start
