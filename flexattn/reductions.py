"""Reductions and products over tensor-valued traced values, and the searches of sorted buffers.

Each lowers to the op table's scalar ops over a ``flexattn.vectors.Vector``'s elements:
``sum``/``any``/``amax``/... fold a group of elements per output position, ``dot``/``matmul``/
``einsum`` sum products, ``isin`` ors comparisons. ``torch.searchsorted``/``bucketize`` over a
captured 1-D tensor (or one row of one: ``offsets[b]``) is a binary search unrolled into
``ceil(log2(n + 1))`` steps of a load and a compare, so it works for any length, in every back
end, and the interval analysis decides it exactly on tiles whose indices stay in one bucket.
``FUNCTIONS`` and ``METHODS`` are the spellings (merged into ``flexattn.spellings``' tables).
"""

from __future__ import annotations

import collections
import functools
import itertools
import math

import torch

from flexattn.capture import fail_at_user_line
from flexattn.ir import DType
from flexattn.ops import BY_NAME
from flexattn.proxy import Proxy, cast_proxy, as_proxy, promoted_dtype, apply, load_proxy, tensor_valued
from flexattn.vectors import BufferView, Vector, check_vector_size, broadcast_map, positions, rearranged, to_vector, wrap

MaxResult = collections.namedtuple("max", ["values", "indices"])
MinResult = collections.namedtuple("min", ["values", "indices"])


def _op(name: str, *args) -> Proxy:
    return apply(BY_NAME[name], *args)


def _dims(shape, dim) -> list[int]:
    """The reduced dimensions of ``dim`` (None or ``()``: all), each in range as torch checks."""
    ndim = len(shape)
    if dim is None or (isinstance(dim, (tuple, list)) and not dim):
        return list(range(ndim))
    out = []
    for d in (dim if isinstance(dim, (tuple, list)) else (dim,)):
        if not -max(ndim, 1) <= d < max(ndim, 1):
            fail_at_user_line(f"dimension {d} is out of range for a tensor of {ndim} dimensions.")
        out.append(d % max(ndim, 1))
    return sorted(set(out) & set(range(ndim)))


def _groups(value, dim, keepdim: bool):
    """(the element groups, one per output position, and the output shape) of a reduction over ``dim``."""
    v = to_vector(value)
    dims = _dims(v.shape, dim)
    kept = [d for d in range(v.ndim) if d not in dims]
    where = positions(v.shape).permute(kept + dims).reshape(math.prod(v.shape[d] for d in kept), -1)
    groups = [[v.elements[i] for i in row] for row in where.tolist()]
    shape = [1 if d in dims else v.shape[d] for d in range(v.ndim)] if keepdim else [v.shape[d] for d in kept]
    return groups, shape


def _fold(name: str, group: list, empty):
    if not group:
        if empty is None:
            fail_at_user_line(f"{name} of an empty tensor: torch defines no value for it.")
        return as_proxy(empty)
    return functools.reduce(lambda a, b: _op(name, a, b), group)


def _reduction(combine: str, prepare=None, empty=None, finish=None):
    """A torch reduction ``f(x, dim=None, keepdim=False)``: ``combine`` folds each group after ``prepare``."""
    def reduce(x, dim=None, keepdim=False, *, dtype=None):
        groups, shape = _groups(x, dim, keepdim)
        out = []
        for group in groups:
            group = [cast_proxy(as_proxy(e), _dtype(dtype)) if dtype is not None else e for e in group]
            group = [prepare(e) for e in group] if prepare else group
            value = _fold(combine, group, empty)
            out.append(finish(value, len(group)) if finish else value)
        return wrap(out, shape)
    return reduce


def _dtype(dtype: torch.dtype) -> DType:
    from flexattn.spellings import ir_dtype_of
    return ir_dtype_of(dtype)


def _widen(e):
    """Sums and products of bools and ints are int64, as in torch."""
    return e if e.node.dtype.is_float else cast_proxy(e, DType.INT64)


def _mean_finish(total, n):
    if not total.node.dtype.is_float:
        fail_at_user_line("mean() of an integer or bool tensor: torch requires a floating point input; use .float() first.")
    return total / n


_sum = _reduction("add", _widen, 0)
_any = _reduction("or", lambda e: cast_proxy(as_proxy(e), DType.BOOL), False)
_all = _reduction("and", lambda e: cast_proxy(as_proxy(e), DType.BOOL), True)
_amax = _reduction("max")
_amin = _reduction("min")


def _mean(x, dim=None, keepdim=False, *, dtype=None):
    return _reduction("add", finish=_mean_finish)(x, dim, keepdim, dtype=dtype)


def _count_nonzero(x, dim=None):
    return _sum(broadcast_map(lambda e: e != 0, [x]), dim)


def _arg_best(better: str):
    """argmax / argmin: the first position of the largest (smallest) element, NaN counting as largest."""
    def best(group):
        value, index = group[0], as_proxy(0)
        for j, e in enumerate(group[1:], 1):
            take = _op(better, e, value)
            if e.node.dtype.is_float:
                take = take | (_op("isnan", e) & ~_op("isnan", value))
            value, index = _op("where", take, e, value), _op("where", take, j, index)
        return value, index
    return best


def _best(better: str, x, dim=None, keepdim=False):
    """(values, indices) over ``dim``; with dim None the flat index."""
    flat = dim is None
    groups, shape = _groups(rearranged(x, lambda p: p.reshape(-1)) if flat else x, 0 if flat else dim, keepdim)
    pairs = [_arg_best(better)(g) for g in groups]
    return wrap([p[0] for p in pairs], shape), wrap([p[1] for p in pairs], shape)


def _extreme(name: str, result, better: str, elementwise: str):
    """torch.max / torch.min: of all elements, ``(values, indices)`` over a dim, or of two tensors."""
    reduce_all = _amax if name == "max" else _amin

    def extreme(x, dim=None, keepdim=False, *, other=None):
        if isinstance(dim, (Proxy, Vector, torch.Tensor)) or other is not None:
            return _op(elementwise, x, dim if other is None else other)
        if dim is None:
            return reduce_all(x)
        return result(*_best(better, x, dim, keepdim))
    return extreme


def _arg(better: str):
    return lambda x, dim=None, keepdim=False: _best(better, x, dim, keepdim)[1]


def _finite_max(x, dim, keepdim: bool):
    """The max over ``dim``, 0 where it is infinite (as torch's logsumexp shifts by it)."""
    top = _amax(x, dim, keepdim)
    return _op("where", _op("abs", top) == math.inf, 0.0, top)


def _logsumexp(x, dim, keepdim=False):
    total = _sum(_op("exp", x - _finite_max(x, dim, True)), dim, keepdim)
    return _op("log", total) + _finite_max(x, dim, keepdim)


def _root(total, root):
    """``root(total)`` with a zero gradient where total is 0, as torch's norm backward gives there."""
    zero = total == 0
    return _op("where", zero, 0.0, root(_op("where", zero, 1.0, total)))


def _norm(x, p=2, dim=None, keepdim=False, *, ord=None, dtype=None, out=None):
    if out is not None:
        fail_at_user_line("norm(out=...) in a traced mod. Mods must not mutate: use the returned value.")
    p = ord if ord is not None else ("fro" if p is None else p)
    if p in (2, 2.0, "fro"):
        return _root(_sum(x * x, dim, keepdim), lambda t: _op("sqrt", t))
    if p == math.inf or p == -math.inf:
        return (_amax if p > 0 else _amin)(_op("abs", x), dim, keepdim)
    if p == 0:
        return broadcast_map(lambda e: cast_proxy(e, DType.FLOAT32), [_sum(x != 0, dim, keepdim)])
    if p == 1:
        return _sum(_op("abs", x), dim, keepdim)
    if not isinstance(p, (int, float)):
        fail_at_user_line(f"norm with p={p!r} of a traced tensor; use p=2, 1, 0, inf or a number.")
    return _root(_sum(_op("abs", x) ** p, dim, keepdim), lambda t: t ** (1.0 / p))


# ----- products ------------------------------------------------------------------

def _einsum(equation: str, *operands):
    """torch.einsum for explicit labels (no ``...``): each output element sums products over the others."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if "." in equation or len(terms) != len(operands):
        fail_at_user_line(f"einsum({equation!r}) with {len(operands)} operands; flexattn takes explicit labels, no '...'.")
    vectors = [to_vector(o) for o in operands]
    sizes = {}
    for term, v in zip(terms, vectors):
        if len(term) != v.ndim:
            fail_at_user_line(f"einsum term {term!r} for a tensor of shape {list(v.shape)}.")
        for label, n in zip(term, v.shape):
            sizes.setdefault(label, n)
    if not arrow:
        output = "".join(sorted(label for label in sizes if inputs.count(label) == 1))
    summed = [label for label in sizes if label not in output]
    check_vector_size([sizes[label] for label in output])
    strides = [[math.prod(v.shape[d + 1:]) for d in range(v.ndim)] for v in vectors]
    out = []
    for coords in _product(output, sizes):
        terms_out = []
        for inner in _product(summed, sizes):
            at = {**dict(zip(output, coords)), **dict(zip(summed, inner))}
            factors = [v.elements[sum(at[label] * s for label, s in zip(term, st))]
                       for term, v, st in zip(terms, vectors, strides)]
            terms_out.append(functools.reduce(lambda a, b: a * b, factors))
        out.append(functools.reduce(lambda a, b: a + b, terms_out) if terms_out else as_proxy(0))
    return wrap(out, [sizes[label] for label in output])


def _product(labels, sizes):
    return itertools.product(*(range(sizes[label]) for label in labels))


def _dot(a, b):
    va, vb = to_vector(a), to_vector(b)
    if va.ndim != 1 or vb.ndim != 1 or va.shape != vb.shape:
        fail_at_user_line(f"dot of shapes {list(va.shape)} and {list(vb.shape)}: torch takes two 1-D tensors of one length.")
    return _einsum("i,i->", va, vb)


def _matmul(a, b):
    va, vb = to_vector(a), to_vector(b)
    labels = {(1, 1): "i,i->", (2, 1): "ij,j->i", (1, 2): "j,jk->k", (2, 2): "ij,jk->ik"}
    equation = labels.get((va.ndim, vb.ndim))
    if equation is None:
        fail_at_user_line(f"matmul of shapes {list(va.shape)} and {list(vb.shape)} in a traced mod; flexattn takes 1-D "
              "and 2-D operands (both arguments to matmul need to be at least 1-D).")
    if va.shape[-1] != vb.shape[0 if vb.ndim == 1 else -2]:
        fail_at_user_line(f"matmul of shapes {list(va.shape)} and {list(vb.shape)}: the inner sizes differ.")
    return _einsum(equation, va, vb)


# ----- membership and sorted search ------------------------------------------------

def _isin(elements, test_elements, *, assume_unique=False, invert=False):
    tests = to_vector(test_elements).elements

    def member(x):
        found = functools.reduce(lambda a, b: a | b, [x == t for t in tests]) if tests else as_proxy(False)
        return ~found if invert else found
    return broadcast_map(member, [elements])


# Sequences up to this length are searched by counting (one compare per element, each decided
# exactly per tile by the interval analysis); longer ones by the unrolled binary search.
_COUNTED = 32


def _searchsorted(sorted_sequence, values, *, out_int32=False, right=False, side=None, sorter=None):
    if side is not None:
        if side not in ("left", "right") or (right and side == "left"):
            fail_at_user_line(f"searchsorted(side={side!r}, right={right}); torch takes side 'left' or 'right', "
                  "agreeing with right.")
        right = side == "right"
    read, n = _sorted_reader(sorted_sequence, sorter)
    dtype = DType.INT32 if out_int32 else DType.INT64

    def search(x):
        # Count the leading elements e with not (e >= x) (e > x for right), as torch's binary search
        # tests them (so a NaN x counts every element), one bit of the count per step.
        def advance(e):
            if not (e.node.dtype.is_float or x.node.dtype.is_float):
                return e <= x if right else e < x
            return ~(e > x) if right else ~(e >= x)
        if read is None or n <= _COUNTED:
            elements = n if read is None else [read(as_proxy(j)) for j in range(n)]
            count = functools.reduce(lambda a, b: a + b, [cast_proxy(advance(e), DType.INT64) for e in elements],
                                     as_proxy(0))
            return Proxy(cast_proxy(count, dtype).node)
        pos = as_proxy(0)
        step = 1 << max(n.bit_length() - 1, 0)
        while n and step:
            candidate = pos + step
            ok = advance(read(candidate - 1))
            ok = ok if step == 1 << (n.bit_length() - 1) else (candidate <= n) & ok
            pos = _op("where", ok, candidate, pos)
            step >>= 1
        return Proxy(cast_proxy(pos, dtype).node)
    return broadcast_map(search, [values])


def _sorted_reader(sequence, sorter):
    """(read(position) of the sorted sequence, its length), or (None, its elements) for a computed one."""
    if isinstance(sequence, torch.Tensor) and not isinstance(sequence, Proxy):
        sequence = to_vector(sequence)
    if not isinstance(sequence, Vector) or sequence.ndim != 1:
        shape = list(getattr(sequence, "shape", []))
        fail_at_user_line(f"searchsorted over a sequence of shape {shape} with one value per (b, h, q_idx, kv_idx): torch "
              "takes a 1-D sorted sequence here; index its rows down to one (offsets[b]).")
    if sorter is not None:
        order = to_vector(sorter)
        if order.shape != sequence.shape:
            fail_at_user_line("searchsorted: sorter must have the shape of the sorted sequence.")
        return (lambda i: _read(sequence, _read(order, i))), sequence.shape[0]
    if isinstance(sequence, BufferView):
        return (lambda i: _read(sequence, i)), sequence.shape[0]
    return None, sequence.elements


def _read(row: Vector, i: Proxy) -> Proxy:
    """Element ``i`` of a captured row; the search's positions are in range, so no negative-index wrap."""
    if not isinstance(row, BufferView):
        fail_at_user_line("searchsorted: a sorter must be a captured tensor.")
    return load_proxy(row.buffer, row.indices + (cast_proxy(i, DType.INT64).node,))


def _bucketize(values, boundaries, *, out_int32=False, right=False):
    return _searchsorted(boundaries, values, out_int32=out_int32, right=right)


def _promoted(values) -> list:
    dtype = promoted_dtype([Proxy(e.node) for v in values for e in v.elements])
    return [Vector([cast_proxy(e, dtype) for e in v.elements], v.shape) for v in values]


def _stack(tensors, dim=0):
    vectors = _promoted([to_vector(t) for t in tensors])
    return _joined(vectors, lambda where: torch.stack(where, dim))


def _cat(tensors, dim=0):
    vectors = _promoted([to_vector(t) for t in tensors])
    return _joined(vectors, lambda where: torch.cat(where, dim))


def _joined(vectors, join):
    elements, where, offset = [], [], 0
    for v in vectors:
        where.append(positions(v.shape) + offset)
        elements += v.elements
        offset += len(v.elements)
    return rearranged(Vector(elements, (len(elements),)), lambda flat: join(where))


def _shape_op(name: str):
    return lambda x, *args, **kwargs: rearranged(x, lambda where: getattr(where, name)(*args, **kwargs))


def _expand_as(x, other):
    return rearranged(x, lambda where: where.expand(tuple(to_vector(other).shape)))


_SHAPE_OPS = ("unsqueeze", "squeeze", "reshape", "flatten", "permute", "transpose", "swapaxes", "movedim",
              "flip", "broadcast_to", "ravel", "unbind", "chunk", "split", "narrow", "roll", "tile",
              "unflatten", "t")
_REDUCTIONS = {
    "sum": _sum, "any": _any, "all": _all, "amax": _amax, "amin": _amin, "mean": _mean,
    "prod": _reduction("mul", _widen, 1), "count_nonzero": _count_nonzero, "logsumexp": _logsumexp,
    "max": _extreme("max", MaxResult, "gt", "max"), "min": _extreme("min", MinResult, "lt", "min"),
    "argmax": _arg("gt"), "argmin": _arg("lt"), "norm": _norm, "dot": _dot, "vdot": _dot, "inner": _dot,
    "matmul": _matmul, "mm": _matmul, "mv": _matmul, "isin": _isin,
}
FUNCTIONS = {**_REDUCTIONS, **{name: _shape_op(name) for name in _SHAPE_OPS},
             "linalg_vector_norm": _norm, "einsum": _einsum, "searchsorted": _searchsorted,
             "bucketize": _bucketize, "stack": _stack, "cat": _cat, "concat": _cat, "concatenate": _cat}
METHODS = {**_REDUCTIONS, **{name: _shape_op(name) for name in _SHAPE_OPS}, "view": _shape_op("reshape"),
           "expand": _shape_op("expand"), "repeat": _shape_op("repeat"), "expand_as": _expand_as,
           "__matmul__": _matmul, "__rmatmul__": lambda a, b: _matmul(b, a)}
for _cls in (Proxy, Vector):
    _cls.__matmul__, _cls.__rmatmul__ = METHODS["__matmul__"], METHODS["__rmatmul__"]
