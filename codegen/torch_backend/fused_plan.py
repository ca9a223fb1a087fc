"""The plan of the fused path: which rectangles of FULL tiles and which batches of PARTIAL tiles.

See ``fused`` for how the plan runs. ``why_not_pays`` says where the fused
kernel would be slower than the generated loop.
"""

from __future__ import annotations

import torch

from codegen.torch_backend import gathered, subtiles
from codegen.torch_backend.evaluate import index_inputs
from flexattn.block_mask import EMPTY, FULL, LOWER, PARTIAL, UPPER
from flexattn.semantics import evaluate

MIN_ROWS_OF_TILES = 4  # FULL rectangles must average this many q tiles tall for the fused kernel to pay,
MIN_TILES_OF_STRIPS = 6  # or this many tiles in all (a wide band: one kernel call still covers many keys)
# Estimated costs, in query-key products of the generated loop (measured, docs/performance.md):
PARTIAL_PRODUCT = 2.0  # one product of a batched PARTIAL tile on the fused kernel (tiles copied, additive mask)
CUT_PRODUCT = 7.0  # one product of a batch of cut tiles' pieces (``subtiles``; a triangle counted whole: gathers, merges)
FUSED_CALL = 25_000  # one fused call and the merge of its result by lse
LOOP_PIECE = 250_000  # one piece of the generated loop (its elementwise passes and row updates)
MIN_DOCUMENT = 64  # mean document length for one kernel call per document to pay
MASK_CHUNK = 1 << 24  # mask elements evaluated (and materialised) at once for a batch of tiles


def why_not_pays(units: list["PlanUnit"], block, L: int, S: int, loop: tuple[int, int]) -> str | None:
    """Why the fused kernel would not beat the generated loop on this plan (None: it would;
    measured, docs/performance.md). ``loop``: the loop's (products, pieces) for the same call
    (``tiles.loop_work``).

    Two rules. The shape of the FULL area: the fused kernel is fast on tall rectangles
    (a causal triangle's squares, no mask at all) and on wide strips (the band of a
    window of 1024 or more), and slower than batched matmuls on narrow strips (a window
    of 512 or less). Then the estimated cost of both paths (``fused_cost`` against
    ``loop`` products plus LOOP_PIECE per piece): PARTIAL tiles cost the fused path
    more per product than the loop, and each fused call a fixed amount; the loop pays
    for padding (per-head tile lists are padded to the longest of their row) and per piece.
    """
    reason = why_not_shaped(units)
    if reason is not None:
        return reason
    full, cut, partial, calls = fused_cost(units, block, L, S)
    fused_total = full + CUT_PRODUCT * cut + PARTIAL_PRODUCT * partial + FUSED_CALL * calls
    loop_total = loop[0] + LOOP_PIECE * loop[1]
    if fused_total >= loop_total:
        return (f"estimated cost {fused_total:.3g} fused ({full:.3g} FULL + CUT_PRODUCT x {cut:.3g} cut + "
                f"PARTIAL_PRODUCT x {partial:.3g} PARTIAL "
                f"products + FUSED_CALL x {calls} calls) >= {loop_total:.3g} in the loop ({loop[0]:.3g} products + "
                f"LOOP_PIECE x {loop[1]} pieces)")
    return None


def why_not_shaped(units: list["PlanUnit"]) -> str | None:
    """The shape rule of ``why_not_pays``: the FULL area (rectangles and causal squares) in tall
    rectangles or wide strips."""
    rects = [r for u in units for r in u.rectangles] + [(a, a + n, c, c + (n + 1) // 2)
                                                         for u in units for a, c, n, _ in u.squares]
    # A gathered batch is one call of all its rows against their keys: P rows tall, n tiles wide.
    rects += [(0, len(g.rows), 0, g.columns.shape[1]) for u in units for g in u.gathered]
    full_tiles = sum((r[1] - r[0]) * (r[3] - r[2]) for r in rects)
    if full_tiles == 0:
        return "the plan has no FULL tiles"
    # Averages weighted by area: the rectangles where most of the work is decide.
    mean_rows = sum((r[1] - r[0]) ** 2 * (r[3] - r[2]) for r in rects) / full_tiles
    mean_tiles = sum(((r[1] - r[0]) * (r[3] - r[2])) ** 2 for r in rects) / full_tiles
    if mean_rows < MIN_ROWS_OF_TILES and mean_tiles < MIN_TILES_OF_STRIPS:
        return (f"FULL rectangles average {mean_rows:.1f} q tiles tall < MIN_ROWS_OF_TILES ({MIN_ROWS_OF_TILES}) "
                f"and {mean_tiles:.1f} tiles < MIN_TILES_OF_STRIPS ({MIN_TILES_OF_STRIPS})")
    return None


def fused_cost(units: list["PlanUnit"], block, L: int, S: int) -> tuple[int, int, int, int]:
    """(FULL products, cut products, PARTIAL products, kernel calls) of the plan, over all its (batch, head) pairs;
    a causal square counts the products it keeps (half). A unit serving several heads of a per-head
    tile matrix counts its calls once per head: measured, a call over several heads of small
    rectangles costs about what the calls per head did (NSA, docs/performance.md); a gathered batch
    is one call. Cut PARTIAL
    tiles (``subtiles``): their rectangles along q count as FULL, their batched pieces as cut
    products (a triangle whole: the kernel's causal mode saves little on squares of one tile)."""
    q_block, kv_block = block
    full = cut = partial = calls = 0
    for u in units:
        pairs = (u.b.stop - u.b.start) * (u.h.stop - u.h.start)
        for (q0, q1, k0, k1), kind in u.pieces():
            area = (min(q1 * q_block, L) - q0 * q_block) * (min(k1 * kv_block, S) - k0 * kv_block)
            full += pairs * (area // 2 if kind is not None else area)
            calls += u.merged_heads
        for r0, r1, c0, c1, causal in u.segments:
            full += pairs * (r1 - r0) * (c1 - c0) // (2 if causal else 1)
            calls += u.merged_heads
        for batch in u.gathered:  # one call for every row and head of the batch
            full += pairs * gathered.products(batch, q_block, kv_block)
            calls += 1
        for g in u.subtiles:
            cut += pairs * (g.r1 - g.r0) * (g.c1 - g.c0) * sum(len(batch) for batch in g.batches)
            calls += u.merged_heads * len(g.batches)
        for batch in u.batches:
            partial += pairs * len(batch) * q_block * kv_block
            calls += u.merged_heads * len(chunks(batch, pairs // u.merged_heads * q_block * kv_block))
    return full, cut, partial, calls


def full_rectangles(full: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Rectangles (q0, q1, k0, k1), in tiles, covering exactly the True tiles of ``full`` (nq, nkv).

    The fewer of two covers: quadtree boxes (a causal triangle: log-many large
    squares per row) or runs along each row (a band, as a sliding window makes,
    which a quadtree would cut into many small boxes).
    """
    boxes, runs = _merge_neighbours(_quadtree(full)), _merge_neighbours(_row_runs(full))
    return boxes if len(boxes) <= len(runs) else runs


def _row_runs(full: torch.Tensor) -> list:
    """One rectangle per run of True tiles along each row."""
    edges = torch.diff(torch.nn.functional.pad(full.to(torch.int8), (1, 1)), dim=1)
    starts, stops = (edges == 1).nonzero(), (edges == -1).nonzero()
    return [(row, row + 1, k0, k1) for (row, k0), (_, k1) in zip(starts.tolist(), stops.tolist())]


def _quadtree(full: torch.Tensor) -> list:
    """Boxes of a quadtree over ``full`` that are entirely True."""
    nq, nkv = full.shape
    area = torch.zeros(nq + 1, nkv + 1, dtype=torch.int64)
    area[1:, 1:] = full.long().cumsum(0).cumsum(1)  # summed-area table: tiles in a box in O(1)
    side = 1
    while side < max(nq, nkv):
        side *= 2
    q0, k0 = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    found = []
    while len(q0):
        q1, k1 = (q0 + side).clamp(max=nq), (k0 + side).clamp(max=nkv)
        count = area[q1, k1] - area[q0, k1] - area[q1, k0] + area[q0, k0]
        whole = count == (q1 - q0) * (k1 - k0)
        found += torch.stack([q0, q1, k0, k1], 1)[whole].tolist()
        mixed = (count > 0) & ~whole
        if side == 1:
            break
        side //= 2
        q0 = (q0[mixed].view(-1, 1) + torch.tensor([0, 0, side, side])).flatten()
        k0 = (k0[mixed].view(-1, 1) + torch.tensor([0, side, 0, side])).flatten()
        inside = (q0 < nq) & (k0 < nkv)
        q0, k0 = q0[inside], k0[inside]
    return found


def _merge_neighbours(rects: list) -> list[tuple[int, int, int, int]]:
    """Join rectangles that share rows and touch along kv, then those that share columns and touch along q."""
    for rows_first in (True, False):
        key = (lambda r: (r[0], r[1], r[2])) if rows_first else (lambda r: (r[2], r[3], r[0]))
        merged: list = []
        for r in sorted(rects, key=key):
            last = merged[-1] if merged else None
            if last and rows_first and last[:2] == r[:2] and last[3] == r[2]:
                merged[-1] = (last[0], last[1], last[2], r[3])
            elif last and not rows_first and last[2:] == r[2:] and last[1] == r[0]:
                merged[-1] = (last[0], r[1], last[2], last[3])
            else:
                merged.append(tuple(r))
        rects = merged
    return rects


def partial_batches(partial: torch.Tensor) -> list[torch.Tensor]:
    """The PARTIAL tiles (P, 2) of (q-tile, kv-tile), grouped so that no batch holds a q-tile twice."""
    return subtiles.distinct_rows(partial.nonzero())


class PlanUnit:
    """A slice of batch rows and query heads that share one tile matrix, and its plan:
    ``squares`` that are exactly causal triangles (``triangle_squares``), ``rectangles`` of
    FULL tiles, ``gathered`` rows of scattered FULL tiles, ``subtiles`` (``subtiles.SubtileGroup``)
    and ``batches`` of PARTIAL tiles."""

    def __init__(self, b: slice, h: slice, classes: torch.Tensor, squares=(), segments=(), subtiles=()):
        self.b, self.h = b, h
        self.subtiles = list(subtiles)  # PARTIAL tiles cut into rectangles and triangles (``subtiles``)
        # (row start, row stop, column start, column stop, causal) in positions: the documents'
        # pieces (``flexattn.analysis.segments``), or cut PARTIAL tiles' rectangles (``subtiles``)
        self.segments = list(segments)
        self.merged_heads = 1  # per-head tile matrices: the heads of equal classes this unit serves
        self.squares = list(squares)
        self.rectangles = full_rectangles(classes == FULL)
        self.gathered: list[gathered.GatheredRows] = []  # rows of scattered FULL tiles (``gather_rows``)
        self.batches = partial_batches(classes == PARTIAL)

    def pieces(self) -> list[tuple[tuple[int, int, int, int], int | None]]:
        """Each fused call without a mask: ((q0, q1, k0, k1) in tiles, LOWER / UPPER for a causal
        square, None for a rectangle), squares first."""
        return ([((a, a + side, c, c + side), kind) for a, c, side, kind in self.squares]
                + [(rect, None) for rect in self.rectangles])



def triangle_squares(classes: torch.Tensor, shapes, max_side: int | None = None) -> list[tuple[int, int, int, int]]:
    """Aligned squares (a, c, side, kind) of tiles (rows a.., columns c..) that are exactly a causal
    triangle: diagonal tiles of one ``kind`` (LOWER: FULL below the diagonal, EMPTY above; UPPER:
    the reverse, which the kernel runs causally on flipped sequences). Largest first, disjoint.

    ``shapes(tiles (T, 2)) -> (T,) int`` says which diagonal tiles are LOWER / UPPER (else NEITHER:
    the call's ``facts.diagonals``).
    A causal mask is one square; a sliding window a chain of LOWER and UPPER squares.
    """
    nq, nkv = classes.shape
    covered = torch.zeros(nq, nkv, dtype=torch.bool)
    known: dict = {}
    found = []
    side = 1
    while side * 2 <= min(nq, nkv, max_side or nq):
        side *= 2
    while side >= 2:
        n_q, n_kv = nq // side, nkv // side
        view = classes[:n_q * side, :n_kv * side].reshape(n_q, side, n_kv, side)
        diagonals = view.diagonal(dim1=1, dim2=3)  # (n_q, n_kv, side)
        blocks = ((diagonals == PARTIAL).all(-1)).nonzero().tolist()
        diagonal_tiles = [(bi * side + t, bj * side + t) for bi, bj in blocks for t in range(side)]
        ask = [tile for tile in diagonal_tiles if tile not in known]
        if ask:
            known.update(zip(ask, shapes(torch.tensor(ask)).tolist()))
        below = torch.ones(side, side, dtype=torch.bool).tril(-1)
        for bi, bj in blocks:
            a, c = bi * side, bj * side
            kinds = {known[(a + t, c + t)] for t in range(side)}
            block = classes[a:a + side, c:c + side]
            if len(kinds) != 1 or kinds == {0} or bool(covered[a:a + side, c:c + side].any()):
                continue
            kind = kinds.pop()
            full_part, empty_part = (below, below.T) if kind == LOWER else (below.T, below)
            if bool((block[full_part] == FULL).all()) and bool((block[empty_part] == EMPTY).all()):
                found.append((a, c, side, kind))
                covered[a:a + side, c:c + side] = True
        side //= 2
    return found


def plan_units(classes: torch.Tensor, B: int, Hq: int, tile_shapes=None, max_square: int | None = None) -> list[PlanUnit]:
    """Units for a (nb, nh, nq, nkv) tile-class tensor (nb in {1, B}, nh in {1, Hq}): one per batch
    row and run of consecutive heads with equal tile classes (one fused call then serves the run's
    heads together). With ``tile_shapes`` (see ``plan``), aligned squares of exactly causal
    triangles, for every (b, h) of the unit, run as causal calls."""
    nb, nh = classes.shape[:2]
    units = []
    for b in range(nb):
        bs = slice(0, B) if nb == 1 else slice(b, b + 1)
        start = 0
        for h in range(1, nh + 1):
            if h < nh and torch.equal(classes[b, h], classes[b, start]):
                continue
            hs = slice(0, Hq) if nh == 1 else slice(start, h)
            unit = _unit(classes[b, start], bs, hs, tile_shapes, max_square)
            unit.merged_heads = h - start if nh > 1 else 1
            units.append(unit)
            start = h
    return units


def _unit(classes: torch.Tensor, b: slice, h: slice, tile_shapes, max_square: int | None) -> PlanUnit:
    if tile_shapes is not None:
        squares = triangle_squares(classes, lambda tiles: tile_shapes(tiles, b, h), max_square)
        if squares:
            rest = classes.clone()
            for a, c, side, _ in squares:
                rest[a:a + side, c:c + side] = EMPTY
            return PlanUnit(b, h, rest, squares)
    return PlanUnit(b, h, classes)


def gather_rows(units: list[PlanUnit], whole_kv_tiles: int) -> None:
    """Each unit's rows of scattered FULL tiles become gathered batches (``gathered``; in place):
    one fused call per batch instead of one per rectangle. ``whole_kv_tiles``: the KV tiles that are
    whole (the ragged last one stays in its rectangle)."""
    for u in units:
        u.rectangles, u.gathered = gathered.gather_scattered(u.rectangles, whole_kv_tiles)


def cut_partial(units: list[PlanUnit], tile_profiles: "TileProfiles") -> None:
    """Each unit's PARTIAL tiles that ``subtiles.cut`` can cut become its pieces (in place)."""
    for u in units:
        if not u.batches:
            continue
        partial = torch.cat(u.batches)
        groups, runs, covered = subtiles.cut(partial, *tile_profiles(partial, u.b, u.h), tile_profiles.block)
        if bool(covered.any()):
            u.subtiles, u.segments = groups, u.segments + runs
            u.batches = subtiles.distinct_rows(partial[~covered])


def plan(block_mask, B: int, Hq: int, L: int, S: int, block_size, tile_shapes=None,
         max_square: int | None = None) -> list[PlanUnit]:
    """The units of this call (``why_not_pays`` says whether they pay).

    ``tile_shapes(tiles, b, h) -> kinds`` (optional: the call's ``facts.diagonals``) says which
    tiles hold exactly a causal triangle for the batch rows ``b`` and heads ``h`` (slices; see
    ``triangle_squares``); aligned squares of them run as one causal call each, the fused
    kernel's fastest case.
    """
    q_block, kv_block = block_size
    if block_mask is not None:
        classes = block_mask.tile_classes()
    else:
        classes = torch.full((1, 1, -(-L // q_block), -(-S // kv_block)), FULL, dtype=torch.int8)
    return plan_units(classes, B, Hq, tile_shapes, max_square)


def chunks(tiles: torch.Tensor, per_tile: int) -> list[torch.Tensor]:
    """``tiles`` in pieces of at most MASK_CHUNK / ``per_tile`` tiles (bounds the memory of a mask)."""
    step = max(1, MASK_CHUNK // max(per_tile, 1))
    return [tiles[i:i + step] for i in range(0, len(tiles), step)]


def tile_env(b: slice, h: slice, tiles: torch.Tensor, block, L: int, S: int) -> tuple[dict, torch.Tensor]:
    """The mods' inputs over a batch of tiles (P, 2), shaped (B, H, P, q_block, kv_block) when
    broadcast, indices clamped into the sequences, and where positions are in range."""
    q_block, kv_block = block
    q_idx = tiles[:, 0].view(-1, 1) * q_block + torch.arange(q_block)  # (P, q_block)
    kv_idx = tiles[:, 1].view(-1, 1) * kv_block + torch.arange(kv_block)  # (P, kv_block)
    env = index_inputs(5, b=(torch.arange(b.start, b.stop), (0,)), h=(torch.arange(h.start, h.stop), (1,)),
                       q_idx=(q_idx.clamp(max=L - 1), (2, 3)), kv_idx=(kv_idx.clamp(max=S - 1), (2, 4)))
    in_range = index_inputs(5, q=(q_idx < L, (2, 3)), kv=(kv_idx < S, (2, 4)))
    return env, in_range["q"] & in_range["kv"]


def evaluate_on_tiles(graph, env: dict, buffers) -> torch.Tensor:
    """``evaluate`` on a ``tile_env``, always 5-D (an input the graph does not read stays size 1)."""
    value = evaluate(graph, env, buffers)
    return value.view((1,) * (5 - value.dim()) + tuple(value.shape))


class TileProfiles:
    """``(tiles, b, h) -> subtiles.profiles`` of the mask_mod on those tiles for batch rows ``b`` and
    heads ``h`` (slices), evaluated MASK_CHUNK elements at a time; ``block`` the tile size."""

    def __init__(self, mask_graph, buffers, block, L: int, S: int):
        self.mask_graph, self.buffers, self.block, self.L, self.S = mask_graph, buffers, block, L, S

    def __call__(self, tiles: torch.Tensor, b: slice, h: slice):
        found = []
        for part in chunks(tiles, (b.stop - b.start) * (h.stop - h.start) * self.block[0] * self.block[1]):
            env, in_range = tile_env(b, h, part, self.block, self.L, self.S)
            keep = evaluate_on_tiles(self.mask_graph, env, self.buffers).to(torch.bool) & in_range
            found.append(subtiles.profiles(keep))
        return torch.cat([p for p, _ in found]), torch.cat([ok for _, ok in found])
