"""Tensor-valued traced values: small tensors whose elements are traced scalars.

torch runs a mod under ``vmap``, so inside it ``topk[b, h, q_tile]`` (a captured tensor
indexed in some of its dimensions), ``q_idx.unsqueeze(-1)`` or ``q_idx == torch.tensor([1, 5])``
are tensors per (b, h, q_idx, kv_idx). flexattn unrolls such a value into its elements
(``Vector``), each an ordinary scalar of the IR (a load, an op), so every evaluator, printer
and the analysis see scalar graphs only. Shapes are known while tracing; the number of
elements is bounded by ``MAX_ELEMENTS`` so an unrolled graph stays small.

Shape ops (unsqueeze, reshape, permute, slicing with constants, ...) run torch's own op on a
tensor of element positions (``rearranged``), so they follow torch exactly; elementwise ops
broadcast their operands the same way (``broadcast_map``). Reductions are in
``flexattn.reductions``.
"""

from __future__ import annotations

import itertools
import math

import torch

from flexattn.capture import fail_at_user_line, is_internal_frame, active_tracer
from flexattn.ir import DType, Node, Op
from flexattn.ops import BY_NAME
from flexattn.proxy import OPERATORS, Proxy, TensorValue, cast_proxy, as_proxy, apply, load_proxy, tensor_valued
from flexattn.semantics import TORCH_DTYPES
from flexattn.trace_errors import control_flow_message

# Every element becomes a few IR nodes in each kernel; past this a mod is better written otherwise.
MAX_ELEMENTS = 64


def check_vector_size(shape) -> None:
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        fail_at_user_line(f"a tensor-valued intermediate of shape {list(shape)} ({n} elements): flexattn unrolls tensors "
              f"inside a mod into at most {MAX_ELEMENTS} scalars. Index the captured tensor down further "
              "(table[b, h, q_idx, j] for a few j), or compute the reduction outside the mod into a captured "
              "table and index that (table[b, h, q_idx]).")


class Vector(TensorValue):
    """A traced tensor of a small, known shape: ``elements`` are its values in row-major order."""

    __slots__ = ("_elements", "shape")

    def __init__(self, elements, shape):
        self._elements, self.shape = tuple(elements), torch.Size(shape)

    @property
    def elements(self) -> tuple[Proxy, ...]:
        return self._elements

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.elements[0].node.dtype] if self.elements else torch.float32

    device = torch.device("cpu")
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"Vector({list(self.shape)})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return active_tracer().call(func, args, kwargs or {})

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return active_tracer().attribute(self, name)

    def __getitem__(self, item):
        return index_vector(self, item)

    def __len__(self) -> int:
        if not self.shape:
            fail_at_user_line("len() of a 0-d tensor.")
        return self.shape[0]

    def __iter__(self):
        return iter([self[i] for i in range(len(self))])

    def __bool__(self):
        fail_at_user_line(control_flow_message(is_internal_frame))

    def __setitem__(self, key, value):
        fail_at_user_line("item assignment on a traced tensor. Mods must not mutate: build a new value (torch.where).")

    def __pos__(self):
        return self


for _name, _method in OPERATORS.items():
    setattr(Vector, _name, _method)


class BufferView(Vector):
    """A captured tensor indexed in its leading dimensions by scalars (``table[h]``), loaded when used.

    Indexing it further (``table[h][q_idx]``) reads one element without unrolling the rows."""

    __slots__ = ("buffer", "indices", "tensor_shape")

    def __init__(self, buffer: Node, indices: tuple[Node, ...], tensor_shape):
        self.buffer, self.indices, self.tensor_shape = buffer, indices, tuple(tensor_shape)
        self.shape = torch.Size(self.tensor_shape[len(indices):])
        self._elements = None

    @property
    def elements(self) -> tuple[Proxy, ...]:
        if self._elements is None:
            check_vector_size(self.shape)
            self._elements = tuple(load_proxy(self.buffer, self.indices + tuple(_const(i) for i in where))
                                   for where in itertools.product(*map(range, self.shape)))
        return self._elements

    def __getitem__(self, item):
        return index_buffer(self.buffer, self.tensor_shape, self.indices, item)


def _const(value: int) -> Node:
    return Node(Op.CONST, DType.INT64, (), value)


def wrap(elements, shape):
    """The traced value of ``elements`` shaped ``shape``: a Proxy for a 0-d shape, else a Vector."""
    elements = list(elements)
    if len(shape) == 0:
        return elements[0]
    check_vector_size(shape)
    return Vector([Proxy(e.node) if e.weak else e for e in elements], shape)


def to_vector(value) -> Vector:
    """Any operand as a Vector (of shape () for a scalar); a captured tensor's elements are loads."""
    if isinstance(value, Vector):
        return value
    if isinstance(value, torch.Tensor) and not isinstance(value, Proxy) and value.dim() > 0:
        return BufferView(active_tracer().buffer(value), (), value.shape)
    return Vector((as_proxy(value),), ())


def positions(shape) -> torch.Tensor:
    return torch.arange(math.prod(shape), dtype=torch.int64).reshape(tuple(shape))


def _torch_call(fn, *args):
    try:
        return fn(*args)
    except (RuntimeError, IndexError, ValueError, TypeError) as error:
        fail_at_user_line(f"{error} (on a traced tensor)")


def rearranged(value, fn):
    """``fn`` (a torch op that only moves elements: unsqueeze, permute, [1:], ...) applied to ``value``.

    ``fn`` runs on the tensor of element positions; a tuple result (chunk, unbind) gives a tuple."""
    v = to_vector(value)
    moved = _torch_call(fn, positions(v.shape))
    if isinstance(moved, (tuple, list)):
        return tuple(wrap([v.elements[i] for i in m.reshape(-1).tolist()], m.shape) for m in moved)
    return wrap([v.elements[i] for i in moved.reshape(-1).tolist()], moved.shape)


def broadcast_shapes(shapes) -> tuple[int, ...]:
    """torch's broadcast of ``shapes`` (torch's own function imports torch._refs: seconds, once)."""
    ndim = max((len(s) for s in shapes), default=0)
    out = []
    for d in range(ndim):
        sizes = {s[d - ndim + len(s)] for s in shapes if d - ndim + len(s) >= 0} - {1}
        if len(sizes) > 1:
            fail_at_user_line(f"shapes {[list(s) for s in shapes]} do not broadcast (sizes {sorted(sizes)} in one dimension).")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def broadcast_map(fn, args):
    """``fn`` applied to each element of ``args`` broadcast together, as torch broadcasts tensors.

    A 0-d operand next to a tensor of one or more dimensions promotes as torch's 0-d tensors do
    (by category only), so ``q_idx + int32_table[b]`` is int32 as in torch."""
    vectors = [to_vector(a) for a in args]
    shape = broadcast_shapes([v.shape for v in vectors])
    check_vector_size(shape)
    dimensioned = any(v.ndim for v in vectors)
    where = [positions(v.shape).expand(shape).reshape(-1).tolist() for v in vectors]
    out = []
    for k in range(math.prod(shape)):
        operands = [v.elements[w[k]] for v, w in zip(vectors, where)]
        if dimensioned:
            operands = [e if v.ndim else Proxy(e.node, weak=True) for e, v in zip(operands, vectors)]
        out.append(as_proxy(fn(*operands)))
    return wrap(out, shape)


def elementwise(lower):
    """A lowering of one scalar (x.float(), x.to(...)), mapped over the elements of a tensor-valued x."""
    def lower_each(x, *args, **kwargs):
        if tensor_valued(x):
            return broadcast_map(lambda e: lower(e, *args, **kwargs), [x])
        return lower(x, *args, **kwargs)
    return lower_each


# ----- indexing ----------------------------------------------------------------

def _is_scalar(item) -> bool:
    return isinstance(item, (int, Proxy)) or (isinstance(item, torch.Tensor) and item.dim() == 0)


def _index_value(item, size: int):
    """A scalar index as an int64 Proxy, or a constant int (a negative one counts from the end, as in torch)."""
    if isinstance(item, bool):
        fail_at_user_line("a bool used as an index (it would be a mask); use an integer.")
    if isinstance(item, int):
        if not -size <= item < size:
            fail_at_user_line(f"index {item} is out of bounds for a dimension of size {size}.")
        return item % size
    p = as_proxy(item)
    if not p.node.dtype.is_int:
        fail_at_user_line(f"a tensor index must be an integer, got {p.node.dtype.value}; "
              "cast it with .long() (bool indices would be a mask, which mods cannot use).")
    p = cast_proxy(p, DType.INT64)
    if _nonnegative(p.node):
        return p
    # torch reads a negative index from the end (bias[q_idx - kv_idx] where kv_idx > q_idx).
    return apply(BY_NAME["where"], p < 0, p + size, p)


_KEEP_SIGN = (Op.ADD, Op.MUL, Op.MIN, Op.WHERE)


def _nonnegative(node: Node) -> bool:
    """Whether an int value is >= 0 by its form alone (an index input, x % k for k > 0, ...)."""
    if node.op is Op.INPUT:
        return node.arg != "score"  # b, h, q_idx and kv_idx count from 0
    if node.op is Op.ABS or node.dtype is DType.BOOL:
        return True
    if node.op is Op.CONST:
        return node.arg >= 0
    if node.op is Op.CAST:
        return _nonnegative(node.inputs[0])
    if node.op in (Op.MOD, Op.FLOORDIV):
        divisor = node.inputs[1]
        positive = divisor.op is Op.CONST and divisor.arg > 0
        return positive and (node.op is Op.MOD or _nonnegative(node.inputs[0]))
    if node.op is Op.MAX:
        return any(_nonnegative(i) for i in node.inputs)
    inputs = node.inputs[1:] if node.op is Op.WHERE else node.inputs
    return node.op in _KEEP_SIGN and all(_nonnegative(i) for i in inputs)


def _node(index) -> Node:
    return _const(index) if isinstance(index, int) else index.node


def index_buffer(buffer: Node, tensor_shape: tuple, done: tuple[Node, ...], item):
    """``tensor[item]`` of a captured tensor already indexed by ``done`` in its leading dimensions."""
    items = item if isinstance(item, tuple) else (item,)
    sub = tensor_shape[len(done):]
    if all(_is_scalar(it) for it in items):
        if len(items) > len(sub):
            fail_at_user_line(f"too many indices for a captured tensor of {len(tensor_shape)} dimensions.")
        indices = done + tuple(_node(_index_value(it, size)) for it, size in zip(items, sub))
        if len(indices) < len(tensor_shape):
            return BufferView(buffer, indices, tensor_shape)
        return load_proxy(buffer, indices)
    return _index_general(lambda idx: load_proxy(buffer, done + tuple(_node(i) for i in idx)), sub, items)


def index_vector(value, item):
    """``value[item]`` of a traced value: constant indices move elements, traced ones select among them."""
    items = item if isinstance(item, tuple) else (item,)
    if all(isinstance(it, (int, slice)) or it is None or it is Ellipsis for it in items):
        return rearranged(value, lambda where: where[item])
    v = to_vector(value)
    return _index_general(lambda idx: _select(v, idx), tuple(v.shape), items)


def _select(v: Vector, index: list):
    """The element of ``v`` at ``index`` (ints or traced); a traced index past either end reads that end."""
    strides = [math.prod(v.shape[d + 1:]) for d in range(len(index))]
    index = [i if isinstance(i, int) else _index_value(i, n) for i, n in zip(index, v.shape)]
    flat = sum(i * s for i, s in zip(index, strides))
    if isinstance(flat, int):
        return v.elements[flat]
    result = v.elements[-1]
    for j in reversed(range(len(v.elements) - 1)):
        result = apply(BY_NAME["where"], flat <= 0 if j == 0 else flat == j, v.elements[j], result)
    return result


def _expand_ellipsis(items: tuple, ndim: int) -> list:
    consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
    if consuming > ndim:
        fail_at_user_line(f"too many indices ({consuming}) for a tensor of {ndim} dimensions.")
    out, expanded = [], False
    for it in items:
        if it is Ellipsis and not expanded:
            out += [slice(None)] * (ndim - consuming)
            expanded = True
        else:
            out.append(it)
    return out if expanded else out + [slice(None)] * (ndim - consuming)


def _index_general(fetch, sub: tuple, items: tuple):
    """Indexing with slices, None or tensor indices, as torch does: scalar indices select,
    tensor indices broadcast together (their dimensions where they stand if adjacent, else first).
    ``fetch(index)`` reads one element at a full index of ints and traced values."""
    dims, axes, advanced = [], [], []  # per dimension its index; the output axes; the tensor indices
    for it in _expand_ellipsis(items, len(sub)):
        if it is None:
            axes.append(("new",))
            continue
        size = sub[len(dims)]
        if isinstance(it, slice):
            axes.append(("dim", len(dims)))
            dims.append(range(*it.indices(size)))
        elif _is_scalar(it):
            dims.append(_index_value(it, size))
        else:
            axes.append(("adv",))
            dims.append(("adv", len(advanced)))
            advanced.append([_index_value(e, size) for e in _index_elements(it)])
    group = ()
    if advanced:
        shapes = [to_vector(it).shape for it in items if _is_tensor_index(it)]
        group = broadcast_shapes(shapes)
        where = [positions(s).expand(group).reshape(-1).tolist() for s in shapes]
        at = [k for k, a in enumerate(axes) if a[0] == "adv"]
        first = at[0] if at == list(range(at[0], at[0] + len(at))) else 0
        axes = [a for a in axes if a[0] != "adv"]
        axes.insert(first, ("group",))
    sizes = [len(dims[a[1]]) if a[0] == "dim" else 1 if a[0] == "new" else math.prod(group) for a in axes]
    shape = [s for a, n in zip(axes, sizes) for s in ((n,) if a[0] != "group" else group)]
    check_vector_size(shape)
    elements = []
    for coords in itertools.product(*map(range, sizes)):
        at_axis = {a[1] if a[0] == "dim" else a[0]: c for a, c in zip(axes, coords)}
        index = [d[at_axis[n]] if isinstance(d, range) else
                 advanced[d[1]][where[d[1]][at_axis["group"]]] if isinstance(d, tuple) else d
                 for n, d in enumerate(dims)]
        elements.append(fetch(index))
    return wrap(elements, shape)


def _is_tensor_index(item) -> bool:
    return item is not None and not isinstance(item, slice) and item is not Ellipsis and not _is_scalar(item)


def _index_elements(item) -> tuple:
    v = to_vector(item)
    if v.elements and v.elements[0].node.dtype is DType.BOOL:
        fail_at_user_line("a bool tensor used as an index (a mask); mods cannot index with masks: use torch.where.")
    return v.elements


def getitem(tensor, item):
    """``tensor[item]`` for a captured tensor (or a traced one) and traced (or constant) indices."""
    if isinstance(tensor, (Proxy, TensorValue)):
        return index_vector(tensor, item)
    if not isinstance(tensor, torch.Tensor):
        fail_at_user_line(f"indexing a {type(tensor).__name__} with a traced value.")
    return index_buffer(active_tracer().buffer(tensor), tuple(tensor.shape), (), item)
