"""PARTIAL tiles whose mask is exactly a few rectangles and causal triangles inside the tile.

A window's edge that lies off the tile diagonal (``q - kv < span``, span a multiple of the tile
plus any offset), a sink column narrower than a tile, a causal diagonal tile that no aligned
square covers: each such tile keeps, row by row, one run of keys whose ends stay put or move one
key per row. Such a tile is cut into pieces (``pieces``): rectangles (every row keeps every key)
and squares that are exactly a causal triangle, LOWER (``q >= kv`` inside the square) or UPPER
(``q <= kv``). The fused kernel then runs each piece with no mask (a triangle in its causal mode),
pieces of one shape from many tiles batched in one call (``SubtileGroup``), instead of the tile's
mask evaluated into an additive mask on every call.

Pieces of whole tile rows that line up along q in one kv tile (a sink column) are one rectangle
call in positions. The mask is evaluated once, when the plan is made (plans are kept per
BlockMask), and only for plans the shape rule lets through (``fused_plan.cut_partial``); a tile
is cut only where every (batch row, head) its unit serves keeps the same positions, and only
where every one of its pieces is shared by at least ``MIN_GROUP_TILES`` tiles (each shape is a
kernel call).
"""

from __future__ import annotations

import torch

from flexattn.block_mask import LOWER, UPPER

MAX_PIECES = 4  # pieces per tile; a tile that needs more stays PARTIAL
MIN_GROUP_TILES = 2  # tiles sharing a piece's shape for that shape to get its own call
MAX_PROFILES = 512  # distinct row profiles cut per unit (the rest stay PARTIAL)


class SubtileGroup:
    """One piece shape, (kind, r0, r1, c0, c1) in positions inside a tile (kind LOWER / UPPER
    for a causal square, None for a rectangle), and its tiles (T, 2) as batches without a q-tile twice."""

    def __init__(self, shape: tuple, tiles: torch.Tensor):
        self.kind, self.r0, self.r1, self.c0, self.c1 = shape
        self.batches = distinct_rows(tiles)


def distinct_rows(tiles: torch.Tensor) -> list[torch.Tensor]:
    """``tiles`` (T, 2) split so that no batch holds a q-tile twice."""
    order = torch.argsort(tiles[:, 0], stable=True)
    tiles = tiles[order]
    first = torch.ones(len(tiles), dtype=torch.bool)
    first[1:] = tiles[1:, 0] != tiles[:-1, 0]
    start = torch.arange(len(tiles))[first]
    rank = torch.arange(len(tiles)) - start[first.long().cumsum(0) - 1]
    return [tiles[rank == r] for r in range(int(rank.max()) + 1)] if len(tiles) else []


def pieces(lo: list[int], hi: list[int]) -> list[tuple] | None:
    """The pieces (kind, r0, r1, c0, c1) covering exactly a tile whose row r keeps keys
    [lo[r], hi[r]) (lo[r] = -1: none), or None (more than MAX_PIECES, or a run of rows whose
    ends move otherwise than by one key per row)."""
    found: list[tuple] = []
    r, n_rows = 0, len(lo)
    while r < n_rows:
        if lo[r] < 0:
            r += 1
            continue
        a = b = 0
        if r + 1 < n_rows and lo[r + 1] >= 0:
            a, b = lo[r + 1] - lo[r], hi[r + 1] - hi[r]
        if a not in (0, 1) or b not in (0, 1):
            a = b = 0
        n = 1
        while r + n < n_rows and lo[r + n] == lo[r] + a * n and hi[r + n] == hi[r] + b * n:
            n += 1
        if n == 1:
            a = b = 0
        run = _run(r, n, lo[r], hi[r], a, b)
        if run is None:
            return None
        found += run
        if len(found) > MAX_PIECES:
            return None
        r += n
    return found


def _run(r: int, n: int, lo: int, hi: int, a: int, b: int) -> list[tuple] | None:
    """Pieces of rows r..r+n whose row x keeps [lo + a x, hi + b x)."""
    rows = (r, r + n)
    if (a, b) == (0, 0):
        return [(None, *rows, lo, hi)]
    if (a, b) == (1, 0):  # row x keeps [lo + x, hi): an UPPER square, then the columns every row keeps
        rest = [(None, *rows, lo + n, hi)] if hi > lo + n else []
        return [(UPPER, *rows, lo, lo + n)] + rest
    if (a, b) == (0, 1):  # row x keeps [lo, hi + x): the columns every row keeps, then a LOWER square
        rest = [(None, *rows, lo, hi - 1)] if hi - 1 > lo else []
        return rest + [(LOWER, *rows, hi - 1, hi - 1 + n)]
    width = hi - lo  # a band: row x keeps [lo + x, lo + width + x)
    if n > width:
        return None
    band = [(UPPER, *rows, lo, lo + n)]
    if width > n:
        band.append((None, *rows, lo + n, hi))
    if n > 1:
        band.append((LOWER, r + 1, r + n, hi, hi + n - 1))
    return band


def profiles(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For bool tiles ``keep`` (Bu, Hu, P, Q, K): the row profiles (P, 2, Q) of (lo, hi) per row
    of each tile (-1 where a row keeps nothing), and (P,) whether the tile is cut-able: one run of
    keys per row, alike for every (b, h)."""
    alike = (keep == keep[:1, :1]).flatten(3).all(-1).flatten(0, 1).all(0)
    keep = keep[0, 0]
    K = keep.shape[-1]
    any_key = keep.any(-1)
    as_int = keep.to(torch.int8)
    lo = as_int.argmax(-1)
    hi = K - as_int.flip(-1).argmax(-1)
    one_run = ((keep.sum(-1) == hi - lo) | ~any_key).all(-1)
    minus = torch.tensor(-1)
    return torch.stack([torch.where(any_key, lo, minus), torch.where(any_key, hi, minus)], 1), alike & one_run


def cut(tiles: torch.Tensor, profile: torch.Tensor, ok: torch.Tensor, block) -> tuple[list, list, torch.Tensor]:
    """For the PARTIAL ``tiles`` (P, 2) with their ``profiles``: groups of pieces (``SubtileGroup``),
    rectangles in positions (r0, r1, c0, c1, False) where pieces of whole tile rows line up along q
    (a sink column: one call), and (P,) which tiles they cover."""
    if not bool(ok.any()):
        return [], [], torch.zeros(len(tiles), dtype=torch.bool)
    index = ok.nonzero().flatten()
    unique, inverse, counts = torch.unique(profile[index].flatten(1), dim=0, return_inverse=True, return_counts=True)
    Q = profile.shape[-1]
    cut_of: dict[int, list[tuple]] = {}
    for u in torch.argsort(counts, descending=True)[:MAX_PROFILES].tolist():
        lo, hi = unique[u, :Q].tolist(), unique[u, Q:].tolist()
        found = pieces(lo, hi)
        if found:
            cut_of[u] = found
    inverse = inverse.tolist()
    while True:  # drop tiles with a piece shape too rare to pay for its call, until every shape pays
        users: dict[tuple, list[int]] = {}
        for i, u in enumerate(inverse):
            for shape in cut_of.get(u, ()):
                users.setdefault(shape, []).append(i)
        rare = {u for u, found in cut_of.items() if any(len(users[s]) < MIN_GROUP_TILES for s in found)}
        if not rare:
            break
        for u in rare:
            del cut_of[u]
    covered = torch.zeros(len(tiles), dtype=torch.bool)
    if not users:
        return [], [], covered
    covered[index[torch.tensor([i for i, u in enumerate(inverse) if u in cut_of])]] = True
    groups, runs = [], []
    for shape, members in sorted(users.items(), key=lambda item: (item[0][1:], item[0][0] or 0)):
        kind, r0, r1, c0, c1 = shape
        members = tiles[index[torch.tensor(members)]]
        if kind is None and (r0, r1) == (0, Q):  # whole tile rows: runs of q tiles are one rectangle
            runs += _column_runs(members, shape, block)
        else:
            groups.append(SubtileGroup(shape, members))
    return groups, runs, covered


def _column_runs(tiles: torch.Tensor, shape: tuple, block) -> list[tuple]:
    """Rectangles (r0, r1, c0, c1, False) in positions: each run of consecutive q tiles of one kv tile."""
    _, _, _, c0, c1 = shape
    q_block, kv_block = block
    runs: list[tuple] = []
    for row, col in sorted(tiles.tolist(), key=lambda t: (t[1], t[0])):
        last = runs[-1] if runs else None
        if last and last[2] == col * kv_block + c0 and last[1] == row * q_block:
            runs[-1] = (last[0], (row + 1) * q_block, *last[2:])
        else:
            runs.append((row * q_block, (row + 1) * q_block, col * kv_block + c0, col * kv_block + c1, False))
    return runs
