"""The work-balanced layout of one sequence across ranks, from a BlockMask's tile classes.

Pure: no processes, no communication. The unit of layout is a *unit* of ``max(q_block,
kv_block)`` positions (one q tile when both block sizes are equal); each rank owns whole units,
and the same positions of q, k and v (self-attention). The planner counts each unit's work (its
non-empty tiles, summed over batch and heads; a PARTIAL tile weighs ``partial_weight``, a FULL
one 1) and tries three layouts, every one giving each rank ``U // R`` or ``U // R + 1`` of the
``U`` units (equal memory):

* ``contiguous``: rank r owns the r-th run of units (no balance; least communication for banded masks);
* ``zigzag``: the units in 2R runs, rank r owning runs r and 2R-1-r (balances causal masks);
* ``lpt``: longest processing time first: units by decreasing work, each to the least loaded rank
  with room left (balances any mask, documents included).

Rule: among the layouts whose max/mean work is within ``BALANCE_SLACK`` of the best one, the one
that moves the fewest K/V units between ranks wins (ties: the order above). A rank receives, from
each other rank, exactly the units its own rows have non-empty tiles with, so pairs of ranks that
share no non-empty tile exchange nothing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from flexattn.block_mask import FULL, PARTIAL, BlockMask
from flexattn.errors import BlockMaskError, InputError

STRATEGIES = ("contiguous", "zigzag", "lpt")
# max/mean within this of the best layout's counts as balanced: a band (sliding window, NATTEN) laid
# out contiguously leaves the two edge ranks a little less work (max/mean 1.03-1.04), and contiguous
# moves a few neighbours' units where LPT moves nearly every rank's.
BALANCE_SLACK = 0.05

_plans: "weakref.WeakKeyDictionary[BlockMask, dict]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ContextParallelPlan:
    """Which units of the sequence each rank owns, and which K/V units each rank receives.

    ``units[r]``: the global unit indices rank r owns, ascending (the short last unit, if any,
    comes last, so a shard's tiles line up with the BlockMask's). ``recv[r][j]``: the units rank r
    receives from rank j (empty for j == r). ``work[r]``: rank r's weighted non-empty tiles.
    """

    world_size: int
    seq_len: int
    unit: int
    block_size: tuple[int, int]
    strategy: str
    units: tuple[tuple[int, ...], ...]
    recv: tuple[tuple[tuple[int, ...], ...], ...]
    work: tuple[float, ...]

    @property
    def balance(self) -> float:
        """max / mean of the per-rank work (1.0 is perfect; 1.0 when there is no work at all)."""
        mean = sum(self.work) / self.world_size
        return max(self.work) / mean if mean > 0 else 1.0

    def unit_length(self, u: int) -> int:
        """Positions in unit ``u`` (``unit``, except for a short last one)."""
        return min(self.unit, self.seq_len - u * self.unit)

    def shard_length(self, rank: int) -> int:
        """Positions rank ``rank`` owns (its q, k and v shard length)."""
        return sum(self.unit_length(u) for u in self.units[rank])

    def unit_positions(self, units) -> torch.Tensor:
        """int64 global positions of ``units`` concatenated in the given order."""
        if not units:
            return torch.zeros(0, dtype=torch.int64)
        return torch.cat([torch.arange(u * self.unit, u * self.unit + self.unit_length(u)) for u in units])

    def positions(self, rank: int) -> torch.Tensor:
        """int64 (shard_length(rank),): the global position of each of rank ``rank``'s local positions."""
        return self.unit_positions(self.units[rank])

    def pairs(self) -> frozenset[tuple[int, int]]:
        """(rank, source) pairs with a non-empty tile between rank's rows and source's keys (source != rank)."""
        return frozenset((r, j) for r in range(self.world_size) for j in range(self.world_size) if self.recv[r][j])

    def received_positions(self, rank: int) -> int:
        """K/V positions rank ``rank`` receives from other ranks in one forward call."""
        last = -(-self.seq_len // self.unit) - 1
        short = self.unit - self.unit_length(last)
        return sum(len(units) * self.unit - (short if last in units else 0) for units in self.recv[rank])

    def fingerprint(self) -> int:
        """A 62-bit hash of the layout, equal on every rank that planned the same mask (checked before exchanging)."""
        return hash((self.world_size, self.seq_len, self.unit, self.block_size, self.units, self.recv)) & ((1 << 62) - 1)


def unit_work(block_mask: BlockMask, partial_weight: float = 1.0) -> tuple[torch.Tensor, int]:
    """(U, U) float32 work between q units and kv units, and the unit size in positions.

    Raises ``BlockMaskError`` when neither block size divides the other, or Q_LEN != KV_LEN
    (context parallelism shards self-attention: q, k and v share one layout).
    """
    q_len, kv_len = block_mask.seq_lengths
    if q_len != kv_len:
        raise BlockMaskError(f"context parallel attention needs Q_LEN == KV_LEN (q, k and v share one layout), "
                             f"got a BlockMask for Q_LEN={q_len}, KV_LEN={kv_len}")
    qb, kb = block_mask.BLOCK_SIZE
    unit = max(qb, kb)
    if unit % qb or unit % kb:
        raise BlockMaskError(f"BLOCK_SIZE {block_mask.BLOCK_SIZE}: one block size must divide the other for a "
                             f"sequence layout; build the mask with BLOCK_SIZE=({unit}, {unit})")
    classes = block_mask.visited_tiles().tile_classes()
    # float32 counts tiles exactly up to 2**24 per unit pair; (U, U) float64 would not fit at 1M tokens.
    tiles = ((classes == FULL).to(torch.float32) + partial_weight * (classes == PARTIAL).to(torch.float32))
    tiles = tiles.sum(dim=tuple(range(tiles.dim() - 2)))
    n_units = -(-q_len // unit)
    a, c = unit // qb, unit // kb
    padded = torch.zeros(n_units * a, n_units * c, dtype=torch.float32)
    padded[:tiles.shape[0], :tiles.shape[1]] = tiles
    return padded.view(n_units, a, n_units, c).sum(dim=(1, 3)), unit


def _capacities(n_units: int, world: int) -> list[int]:
    return [n_units // world + (1 if r < n_units % world else 0) for r in range(world)]


def _contiguous(rows: torch.Tensor, world: int) -> list[list[int]]:
    owners, start = [], 0
    for count in _capacities(rows.shape[0], world):
        owners.append(list(range(start, start + count)))
        start += count
    return owners


def _zigzag(rows: torch.Tensor, world: int) -> list[list[int]]:
    runs = _contiguous(rows, 2 * world)
    return [runs[r] + runs[2 * world - 1 - r] for r in range(world)]


def _lpt(rows: torch.Tensor, world: int) -> list[list[int]]:
    row_work = rows.tolist()
    order = sorted(range(len(row_work)), key=lambda u: (-row_work[u], u))
    room, load, owners = _capacities(len(row_work), world), [0.0] * world, [[] for _ in range(world)]
    for u in order:
        r = min((r for r in range(world) if room[r] > 0), key=lambda r: (load[r], r))
        owners[r].append(u)
        load[r] += row_work[u]
        room[r] -= 1
    return owners


_LAYOUTS = {"contiguous": _contiguous, "zigzag": _zigzag, "lpt": _lpt}


@dataclass(frozen=True)
class UnitWork:
    """What every candidate layout is scored on: per-unit row work and the non-empty unit pairs.

    Not kept between plans: at 1M positions in units of 128 the pairs take 256 MB.
    """

    rows: torch.Tensor  # (U,) float64
    nonempty: torch.Tensor  # (U, U) int32, 1 where a unit pair has a non-empty tile
    unit: int

    @classmethod
    def of(cls, block_mask: BlockMask, partial_weight: float = 1.0) -> "UnitWork":
        work, unit = unit_work(block_mask, partial_weight)
        return cls(work.sum(1).to(torch.float64), (work > 0).to(torch.int32), unit)


def _build(work: UnitWork, block_mask: BlockMask, world: int, strategy: str, owners=None) -> ContextParallelPlan:
    owners = [tuple(sorted(units)) for units in (owners or _LAYOUTS[strategy](work.rows, world))]
    owner_of = torch.empty(work.rows.shape[0], dtype=torch.int64)
    for r, units in enumerate(owners):
        owner_of[torch.tensor(units, dtype=torch.int64)] = r
    # needed[r, u]: a row of rank r has a non-empty tile with kv unit u.
    needed = torch.zeros(world, work.rows.shape[0], dtype=torch.int32).index_add_(0, owner_of, work.nonempty)
    recv = []
    for r in range(world):
        units = needed[r].nonzero().flatten()
        units = units[owner_of[units] != r]
        by_owner = owner_of[units].argsort(stable=True)  # ascending units within each source
        counts = torch.bincount(owner_of[units], minlength=world).tolist()
        recv.append(tuple(tuple(part.tolist()) for part in units[by_owner].split(counts)))
    rank_work = torch.zeros(world, dtype=torch.float64).index_add_(0, owner_of, work.rows)
    return ContextParallelPlan(world, block_mask.seq_lengths[0], work.unit, tuple(block_mask.BLOCK_SIZE), strategy,
                               tuple(owners), tuple(recv), tuple(rank_work.tolist()))


def plan_context_parallel(block_mask: BlockMask, world_size: int, *, strategy: str = "auto",
                          partial_weight: float = 1.0) -> ContextParallelPlan:
    """The layout of ``block_mask``'s sequence over ``world_size`` ranks (computed once per mask, then reused).

    Args:
        block_mask: a BlockMask with Q_LEN == KV_LEN (any B and H: work is summed over them).
        world_size: number of ranks.
        strategy: ``"auto"`` (the module's rule), ``"contiguous"``, ``"zigzag"`` or ``"lpt"``.
        partial_weight: the work of a PARTIAL tile relative to a FULL one (1.0 counts non-empty tiles).

    Returns a frozen ``ContextParallelPlan``; the same object for the same mask and arguments
    until the mask's tiles change.

    Raises ``InputError`` for a bad world_size, strategy or partial_weight, or a sequence with
    fewer units than ranks; ``BlockMaskError`` for Q_LEN != KV_LEN or incompatible block sizes.

    Example::

        >>> bm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 4096, 4096)
        >>> plan = plan_context_parallel(bm, 4)
        >>> plan.strategy, round(plan.balance, 3), plan.shard_length(0)
        ('zigzag', 1.0, 1024)
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
        raise InputError(f"world_size must be a positive int, got {world_size!r}")
    if strategy != "auto" and strategy not in STRATEGIES:
        raise InputError(f"strategy must be 'auto' or one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    if not isinstance(partial_weight, (int, float)) or isinstance(partial_weight, bool) or not partial_weight > 0:
        raise InputError(f"partial_weight must be a positive number, got {partial_weight!r}")
    if not isinstance(block_mask, BlockMask):
        block_mask = BlockMask.from_torch(block_mask)
    classes = block_mask.visited_tiles().tile_classes()
    return _cached(block_mask, (world_size, strategy, float(partial_weight)), classes,
                   lambda: choose(UnitWork.of(block_mask, partial_weight), block_mask, world_size, strategy))


def choose(work: "UnitWork", block_mask: BlockMask, world_size: int, strategy: str = "auto") -> ContextParallelPlan:
    """The plan by the module's rule among ``strategy``'s candidates (all three for ``"auto"``)."""
    if work.rows.shape[0] < world_size:
        raise InputError(f"the sequence of {block_mask.seq_lengths[0]} positions has {work.rows.shape[0]} units of "
                         f"{work.unit}, fewer than world_size={world_size}; build the BlockMask with a smaller "
                         f"BLOCK_SIZE (at most {block_mask.seq_lengths[0] // world_size}) or use fewer ranks")
    candidates = [_build(work, block_mask, world_size, s) for s in (STRATEGIES if strategy == "auto" else
                                                                           (strategy,))]
    best = min(p.balance for p in candidates)
    return min((p for p in candidates if p.balance <= best + BALANCE_SLACK),
               key=lambda p: sum(p.received_positions(r) for r in range(world_size)))


def plan_for_units(block_mask: BlockMask, plan: ContextParallelPlan) -> ContextParallelPlan:
    """``plan`` itself when it was made for ``block_mask``; else its layout with ``block_mask``'s K/V needs.

    A plan made for one mask lays out any mask of the same length and block sizes, but which units
    travel depends on the mask; this recomputes them (once per mask and layout).

    Raises ``BlockMaskError`` when the mask has another length or block size than the plan.
    """
    if block_mask.seq_lengths[0] != plan.seq_len or tuple(block_mask.BLOCK_SIZE) != plan.block_size:
        raise BlockMaskError(f"the BlockMask is for Q_LEN={block_mask.seq_lengths[0]}, BLOCK_SIZE="
                             f"{tuple(block_mask.BLOCK_SIZE)} but the plan lays out {plan.seq_len} positions in "
                             f"blocks of {plan.block_size}; plan with plan_context_parallel(this_block_mask, "
                             f"world_size) and shard the inputs with that plan")
    classes = block_mask.visited_tiles().tile_classes()
    if any(cached is plan and seen is classes for seen, cached in _plans.get(block_mask, {}).values()):
        return plan
    return _cached(block_mask, ("units", plan.units, plan.strategy), classes,
                   lambda: _build(UnitWork.of(block_mask), block_mask, plan.world_size, plan.strategy, owners=plan.units))


def _cached(block_mask: BlockMask, key, classes, make):
    """``make()``, kept with ``block_mask`` under ``key`` until its tile classes change."""
    entries = _plans.setdefault(block_mask, {})
    cached = entries.get(key)
    if cached is None or cached[0] is not classes:
        cached = entries[key] = (classes, make())
    return cached[1]
