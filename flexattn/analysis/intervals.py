"""Three-valued evaluation of a mask IR over whole tiles at once.

Every node gets, per tile, a sound range of the values it can take inside the
tile: ``Range(lo, hi)`` of int64 numpy arrays broadcast over the tile grid (bools
are 0/1 ranges: ``lo == 1`` means always true, ``hi == 0`` always false).
Index arithmetic is kept as affine forms ``a*q + c*kv + offset`` (``Affine``)
so correlated terms cancel: ``q_idx - kv_idx <= W`` is decided exactly, from
the tile's corners, not from two independent intervals. Everything else uses
interval rules; anything without a sound rule (floats, unknown divisors)
becomes "any value", which is always safe: the tile is refined densely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flexattn.ir import SPECS, DType, Graph, Op

BIG = 2 ** 61  # stands for "unbounded"; the sum of two such bounds still fits in int64


@dataclass(frozen=True)
class Range:
    """Per box, every value lies in [lo, hi]; where ``attained``, every integer in
    [lo, hi] is taken at some position of the box (for a bool: it is both true
    and false somewhere, so the box is PARTIAL without looking at positions)."""

    lo: np.ndarray
    hi: np.ndarray
    attained: object = False  # a bool or a bool array over the boxes


def _single(r: Range):
    """Where ``r`` is a single value (known without work when lo and hi are one array)."""
    return True if r.lo is r.hi else r.lo == r.hi


def _attained(r: Range):
    """Where every value of ``r`` is taken: a single value always is (boxes are never empty)."""
    if r.attained is True or r.lo is r.hi:
        return True
    return (r.lo == r.hi) | r.attained


@dataclass(frozen=True)
class Affine:
    """``q_coef * q_idx + kv_coef * kv_idx + offset``, offset a Range (b, h, loads, constants).

    A coefficient is an int, or an int64 array over the boxes when the form
    holds per box (``q_idx % W`` is ``q_idx - W*p`` in a box within one period p).
    """

    q_coef: int | np.ndarray
    kv_coef: int | np.ndarray
    offset: Range


def _t(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def _clamp(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -BIG, BIG)


def _any() -> Range:
    return Range(_t(-BIG), _t(BIG))


def _point(value: int) -> Range:
    value = _t(value)
    return Range(value, value, True)


def _add(a: Range, b: Range) -> Range:
    """``a + b`` for values that may depend on each other: attained only where one is a single value."""
    if a.lo is a.hi and b.lo is b.hi:
        value = _clamp(a.lo + b.lo)
        return Range(value, value, True)
    attained = (_attained(a) & _single(b)) | (_attained(b) & _single(a))
    return Range(_clamp(a.lo + b.lo), _clamp(a.hi + b.hi), attained)


def _times(x: np.ndarray, k) -> np.ndarray:
    """``x * k`` saturated to [-BIG, BIG] (an int64 product could wrap around); k an int or an array."""
    if isinstance(k, int):
        if k in (0, 1, -1):
            return x * k
        overflow = np.abs(x) > BIG // abs(k)
        return np.where(overflow, np.sign(x) * (BIG if k > 0 else -BIG), x * k)
    if bool((np.abs(k) <= 1).all()):  # per-box coefficients of x % W are 0 or 1: no overflow possible
        return x * k
    overflow = np.abs(x) > BIG // np.maximum(np.abs(k), 1)
    return np.where(overflow, np.sign(x) * np.sign(k) * BIG, x * k)


def _unit(k):
    return abs(k) <= 1 if isinstance(k, int) else np.abs(k) <= 1


def _scale(r: Range, k) -> Range:
    if isinstance(k, int) and k == 1:
        return r
    if r.lo is r.hi:
        value = _times(r.lo, k)
        return Range(value, value, True)
    lo, hi = _times(r.lo, k), _times(r.hi, k)
    return Range(np.minimum(lo, hi), np.maximum(lo, hi), _attained(r) & _unit(k))


class TileGrid:
    """The tiles being classified: per-tile index ranges of b, h, q_idx, kv_idx."""

    def __init__(self, b: Range, h: Range, q: Range, kv: Range, want_cuts: bool = False,
                 want_attained: bool = True):
        self.inputs = {"b": b, "h": h, "q_idx": q, "kv_idx": kv}
        self.want_attained = want_attained  # False: skip proving "both true and false somewhere"
        # Where to cut each box so the pieces are simpler: the first q_idx (kv_idx) in the
        # box at which ``x // k``, ``x % k`` or ``buf[x]`` changes piece; -1 for none.
        self.want_cuts = want_cuts
        self.cuts = {"q_idx": None, "kv_idx": None}
        self._ranges: dict = {}  # id(form) -> (form, its Range): forms are read by several nodes

    def suggest_cut(self, form, next_piece) -> None:
        """Record a cut where ``form`` (``axis + offset``) reaches a new piece.

        ``next_piece(lo, hi)`` gives, per box, the first value in (lo, hi] that starts
        a new piece, or -1.
        """
        if (not self.want_cuts or not isinstance(form, Affine) or not isinstance(form.q_coef, int)
                or not isinstance(form.kv_coef, int)):
            return
        axis = {(1, 0): "q_idx", (0, 1): "kv_idx"}.get((form.q_coef, form.kv_coef))
        if axis is None:
            return
        values = self.range_of(form)
        start = next_piece(values.lo, values.hi)
        if start is None:
            return
        usable = (start >= 0) & _single(form.offset)
        cut = np.where(usable, start - form.offset.lo, -1)
        previous = self.cuts[axis]
        self.cuts[axis] = cut if previous is None else np.where(previous >= 0, previous, cut)

    def range_of(self, form: Affine) -> Range:
        cached = self._ranges.get(id(form))
        if cached is None:
            cached = self._ranges[id(form)] = (form, self._range_of(form))
        return cached[1]

    def _range_of(self, form: Affine) -> Range:
        if _is_zero(form.q_coef) and _is_zero(form.kv_coef):
            return form.offset
        lo_hi = form.offset
        for axis, coef in (("q_idx", form.q_coef), ("kv_idx", form.kv_coef)):
            if not _is_zero(coef):
                lo_hi = _add(lo_hi, _scale(self.inputs[axis], coef))
        # q and kv vary independently over a box, so with unit coefficients and a
        # single-valued offset the form takes every integer between its bounds.
        if not self.want_attained:
            return Range(lo_hi.lo, lo_hi.hi)
        no_index = (form.q_coef == 0) & (form.kv_coef == 0)
        attained = np.where(no_index, _attained(form.offset), _unit(form.q_coef) & _unit(form.kv_coef)
                            & _single(form.offset))
        return Range(lo_hi.lo, lo_hi.hi, attained)


def _as_range(value, grid: TileGrid) -> Range:
    return grid.range_of(value) if isinstance(value, Affine) else value


def _as_affine(value) -> Affine:
    return value if isinstance(value, Affine) else Affine(0, 0, value)


def _affine_add(a, b, sign: int) -> Affine:
    a, b = _as_affine(a), _as_affine(b)
    off = _add(a.offset, _scale(b.offset, sign))
    return Affine(a.q_coef + sign * b.q_coef, a.kv_coef + sign * b.kv_coef, off)


# Per comparison, (where it is always true, where always false) from the range d of a - b.
_TRUTH = {
    Op.LT: lambda d: (d.hi < 0, d.lo >= 0), Op.LE: lambda d: (d.hi <= 0, d.lo > 0),
    Op.GT: lambda d: (d.lo > 0, d.hi <= 0), Op.GE: lambda d: (d.lo >= 0, d.hi < 0),
    Op.EQ: lambda d: ((d.lo == 0) & (d.hi == 0), (d.lo > 0) | (d.hi < 0)),
    Op.NE: lambda d: ((d.lo > 0) | (d.hi < 0), (d.lo == 0) & (d.hi == 0)),
}


def _compare(node, ins, grid: TileGrid) -> Range:
    """Bool range of ``a op b``, from the range of the affine difference ``a - b``."""
    d = grid.range_of(_affine_add(ins[0], ins[1], -1))
    true, false = _TRUTH[node.op](d)
    # Where d takes every value in its range, each truth value its bounds allow occurs.
    return Range(_t(true), _t(~false), _attained(d) if grid.want_attained else False)


def _mod(value, k: int, grid: "TileGrid"):
    """``value % k`` (k > 0). In a box where ``value`` stays within one period p it
    is ``value - k*p``: still affine, so ``q % W - kv % W`` keeps its correlation."""
    a = _as_range(value, grid)
    period = a.lo // k
    same_period = period == a.hi // k
    # Across periods the result is [0, k-1], every value taken if a whole period is.
    wraps_fully = _attained(a) & (a.hi - a.lo + 1 >= k)
    if not isinstance(value, Affine) or (_is_zero(value.q_coef) and _is_zero(value.kv_coef)):
        lo = np.where(same_period, a.lo % k, 0)
        hi = np.where(same_period, a.hi % k, k - 1)
        return Range(lo, hi, np.where(same_period, _attained(a), wraps_fully))
    shifted = _add(value.offset, _scale(Range(period, period), -k))
    offset = Range(np.where(same_period, shifted.lo, 0), np.where(same_period, shifted.hi, k - 1),
                   np.where(same_period, _attained(shifted), wraps_fully))
    q_coef, kv_coef = (0 if _is_zero(c) else same_period * c for c in (value.q_coef, value.kv_coef))
    return Affine(q_coef, kv_coef, offset)


def _mul(a: Range, b: Range) -> Range:
    corners = np.stack(np.broadcast_arrays(a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi))
    # Products past BIG (detected in float64, where they cannot wrap) saturate.
    magnitude = np.maximum(np.abs(a.lo), np.abs(a.hi)).astype(np.float64) * np.maximum(np.abs(b.lo), np.abs(b.hi))
    unbounded = magnitude >= BIG
    return Range(np.where(unbounded, -BIG, corners.min(0)), np.where(unbounded, BIG, corners.max(0)))


def _is_zero(coef) -> bool:
    return isinstance(coef, int) and coef == 0


def _const_of(value) -> int | None:
    r = value.offset if isinstance(value, Affine) and _is_zero(value.q_coef) and _is_zero(value.kv_coef) else value
    if isinstance(r, Range) and np.ndim(r.lo) == 0 and np.ndim(r.hi) == 0 and int(r.lo) == int(r.hi):
        return int(r.lo)
    return None


def _can_be(x: Range, value: int):
    """Where the bool ``x`` is known to be ``value`` at some position of the box."""
    if value:
        return (x.lo == 1) | ((x.hi == 1) & _attained(x))
    return (x.hi == 0) | ((x.lo == 0) & _attained(x))


def _bool_op(op: Op, a: Range, b: Range) -> Range:
    if op in (Op.AND, Op.OR) and a.attained is False and b.attained is False:
        return Range(a.lo & b.lo, a.hi & b.hi) if op is Op.AND else Range(a.lo | b.lo, a.hi | b.hi)
    if op in (Op.AND, Op.OR):
        # a & b is false wherever one is; it is true somewhere if one is always true
        # and the other true somewhere (dually for |).
        sure, other = (1, 0) if op is Op.AND else (0, 1)
        reaches_other = _can_be(a, other) | _can_be(b, other)
        reaches_sure = (_single(a) & (a.lo == sure) & _can_be(b, sure)) | (
            _single(b) & (b.lo == sure) & _can_be(a, sure))
        lo, hi = (a.lo & b.lo, a.hi & b.hi) if op is Op.AND else (a.lo | b.lo, a.hi | b.hi)
        return Range(lo, hi, reaches_other & reaches_sure)
    # XOR: decided only when both are decided.
    decided = (a.lo == a.hi) & (b.lo == b.hi)
    value = a.lo ^ b.lo
    return Range(np.where(decided, value, 0), np.where(decided, value, 1))


def _bitwise(op: Op, a: Range, b: Range) -> Range:
    nonneg = (a.lo >= 0) & (b.lo >= 0) & (a.hi < BIG) & (b.hi < BIG)
    top = np.maximum(np.maximum(a.hi, b.hi), 0)
    ones = np.where(top > 0, (2 ** np.ceil(np.log2(top + 1.0))).astype(np.int64) - 1, 0)
    hi = np.minimum(a.hi, b.hi) if op is Op.AND else ones
    return Range(np.where(nonneg, 0, -BIG), np.where(nonneg, hi, BIG))


def evaluate_ranges(graph: Graph, grid: TileGrid, load_range) -> Range:
    """The bool Range of a mask graph's output over every tile of ``grid``.

    ``load_range(buffer_index, index_ranges) -> Range`` gives the range of a
    buffer over index ranges (the caller knows the buffer contents).
    """
    # Bounds past BIG are computed and then replaced (``_times``, ``_mul``): numpy
    # would warn on the discarded int64 products that wrap around.
    with np.errstate(over="ignore"):
        return _evaluate(graph, grid, load_range)


def _evaluate(graph: Graph, grid: TileGrid, load_range) -> Range:
    values: dict = {}
    for node in graph.nodes:
        op, ins = node.op, [values.get(i) for i in node.inputs]
        if op is Op.INPUT:
            value = Affine(1, 0, _point(0)) if node.arg == "q_idx" else (
                Affine(0, 1, _point(0)) if node.arg == "kv_idx" else grid.inputs[node.arg])
        elif op is Op.CONST:
            value = _point(int(node.arg)) if node.dtype is not DType.FLOAT32 else _any()
        elif op is Op.BUFFER:
            value = None
        elif node.dtype is DType.FLOAT32 or any(i.dtype is DType.FLOAT32 for i in node.inputs):
            value = _unknown(node)
        elif op is Op.LOAD:
            index_ranges = [_as_range(v, grid) for v in ins[1:]]
            value = load_range(node.inputs[0].arg, index_ranges)
            if index_ranges:  # cut where the last index reaches a new value of the row read
                grid.suggest_cut(ins[-1], lambda lo, hi, i=node.inputs[0].arg, leading=index_ranges[:-1]:
                                 load_range.first_change(i, lo, hi, leading))
        elif op is Op.CAST:  # to bool: x != 0; to another int type: the same values
            r = _as_range(ins[0], grid)
            value = r if node.dtype is not DType.BOOL else Range(
                _t((r.lo > 0) | (r.hi < 0)), _t(~((r.lo == 0) & (r.hi == 0))), _attained(r))
        else:
            rule = RULES.get(SPECS[op].interval)
            value = rule(node, ins, grid) if rule is not None else _unknown(node)
        values[node] = value
    return _as_range(values[graph.output], grid)


def _unknown(node) -> Range:
    """Every value of the node's dtype: sound for an op without a rule."""
    return Range(_t(0), _t(1)) if node.dtype is DType.BOOL else _any()


def _mul_rule(node, ins, grid: TileGrid):
    k0, k1 = _const_of(ins[0]), _const_of(ins[1])
    if k1 is None and k0 is None:
        return _mul(_as_range(ins[0], grid), _as_range(ins[1], grid))
    form, k = (_as_affine(ins[0]), k1) if k1 is not None else (_as_affine(ins[1]), k0)
    return Affine(form.q_coef * k, form.kv_coef * k, _scale(form.offset, k))


def _on_ranges(rule):
    """A rule of the inputs' Ranges (their affine forms resolved over the grid)."""
    return lambda node, ins, grid: rule(node, *(_as_range(v, grid) for v in ins))


def _logic(node, *ranges: Range) -> Range:
    """and / or / xor / not: three-valued on bools, bit bounds on ints."""
    if node.dtype is not DType.BOOL:
        return _any() if node.op is Op.NOT else _bitwise(node.op, *ranges)
    if node.op is Op.NOT:
        return Range(1 - ranges[0].hi, 1 - ranges[0].lo, ranges[0].attained)
    return _bool_op(node.op, *ranges)


def _where(node, cond: Range, a: Range, b: Range) -> Range:
    lo = np.where(cond.lo == 1, a.lo, np.where(cond.hi == 0, b.lo, np.minimum(a.lo, b.lo)))
    hi = np.where(cond.lo == 1, a.hi, np.where(cond.hi == 0, b.hi, np.maximum(a.hi, b.hi)))
    return Range(lo, hi, np.where(cond.lo == 1, _attained(a), (cond.hi == 0) & _attained(b)))


def _abs(node, r: Range) -> Range:
    lo = np.where(r.lo >= 0, r.lo, np.where(r.hi <= 0, -r.hi, 0))
    return Range(lo, np.minimum(np.maximum(np.abs(r.lo), np.abs(r.hi)), BIG), _attained(r))


def _divisor(ins, grid: TileGrid) -> int | None:
    """The constant k > 0 of ``x // k`` or ``x % k`` (None otherwise); cuts boxes where x // k changes."""
    k = _const_of(ins[1])
    if k is not None and k > 0:
        grid.suggest_cut(ins[0], lambda lo, hi: np.where((lo // k + 1) * k <= hi, (lo // k + 1) * k, -1))
        return k
    return None


def _floordiv(node, ins, grid: TileGrid):
    k, a = _divisor(ins, grid), _as_range(ins[0], grid)
    if k is None:
        return _any()
    if a.lo is a.hi:
        value = a.lo // k
        return Range(value, value, True)
    return Range(a.lo // k, a.hi // k, _attained(a))  # k > 0: flooring keeps the order of the bounds


def _shift(node, ins, grid: TileGrid):
    k, r = _const_of(ins[1]), _as_range(ins[0], grid)
    if k is None or not 0 <= k < 62:
        return _any()
    if node.op is Op.LSHIFT:
        return Range(_times(r.lo, 2 ** k), _times(r.hi, 2 ** k))
    return Range(r.lo >> k, r.hi >> k, _attained(r))


# The rules ``flexattn.ops.OpDef.interval`` names: (node, input values, grid) -> the node's
# value, a Range or (index arithmetic) an Affine form.
RULES = {
    "add": lambda node, ins, grid: _affine_add(ins[0], ins[1], 1),
    "sub": lambda node, ins, grid: _affine_add(ins[0], ins[1], -1),
    "neg": lambda node, ins, grid: _affine_add(_point(0), ins[0], -1),
    "mul": _mul_rule,
    "compare": _compare,
    "logic": _on_ranges(_logic),
    "where": _on_ranges(_where),
    "abs": _on_ranges(_abs),
    # sign is monotone and takes every value between the signs of the bounds.
    "sign": _on_ranges(lambda node, r: Range(np.sign(r.lo), np.sign(r.hi), _attained(r))),
    "identity": lambda node, ins, grid: ins[0],  # floor, ceil, round, trunc of an int
    "min": _on_ranges(lambda node, a, b: Range(np.minimum(a.lo, b.lo), np.minimum(a.hi, b.hi))),
    "max": _on_ranges(lambda node, a, b: Range(np.maximum(a.lo, b.lo), np.maximum(a.hi, b.hi))),
    "floordiv": _floordiv,
    "mod": lambda node, ins, grid: _any() if (k := _divisor(ins, grid)) is None else _mod(ins[0], k, grid),
    "shift": _shift,
}
