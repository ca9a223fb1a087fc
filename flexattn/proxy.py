"""Proxy values: what a mod's arguments are while it is traced.

Python operators and the supported torch functions (``__torch_function__``)
on a ``Proxy`` append IR nodes with torch's type promotion; real tensors a
mod touches become buffer inputs of the current trace; anything that needs a
concrete value raises ``TraceError`` naming the user's line.
"""

from __future__ import annotations

import os
import sys

import torch

from flexattn.errors import TraceError
from flexattn.ir import COMPARISONS, FLOAT_UNARY_OPS, BufferSpec, DType, Node, Op
from flexattn.semantics import load_dtype
from flexattn.trace_errors import control_flow_message, user_location

_CATEGORY = {DType.BOOL: 0, DType.INT32: 1, DType.INT64: 1, DType.FLOAT32: 2}
_DEFAULT_OF_CATEGORY = {0: DType.BOOL, 1: DType.INT64, 2: DType.FLOAT32}
_ORDER = [DType.BOOL, DType.INT32, DType.INT64, DType.FLOAT32]



class _Tracer:
    """Collects the buffers of one trace."""

    def __init__(self):
        self.buffer_tensors: list[torch.Tensor] = []
        self.buffer_specs: list[BufferSpec] = []
        self.buffer_nodes: list[Node] = []

    def buffer(self, tensor: torch.Tensor) -> Node:
        for i, seen in enumerate(self.buffer_tensors):
            if seen is tensor or _same_view(seen, tensor):
                return self.buffer_nodes[i]
        name = _guess_name(tensor) or f"buf{len(self.buffer_tensors)}"
        if any(spec.name == name for spec in self.buffer_specs):
            name = f"{name}_{len(self.buffer_tensors)}"
        spec = BufferSpec(name, tuple(tensor.shape), load_dtype(tensor.dtype), str(tensor.dtype))
        node = Node(Op.BUFFER, spec.dtype, (), len(self.buffer_tensors))
        self.buffer_tensors.append(tensor)
        self.buffer_specs.append(spec)
        self.buffer_nodes.append(node)
        return node


_current: list[_Tracer] = []


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
            and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


def _guess_name(tensor: torch.Tensor) -> str | None:
    """The user's variable name for a captured tensor, for readable IR."""
    frame = sys._getframe(1)
    while frame is not None:
        if not _internal(frame.f_code.co_filename):
            for scope in (frame.f_locals, frame.f_globals):
                for key, value in scope.items():
                    if value is tensor and key.isidentifier():
                        return key
            if frame.f_code.co_freevars:
                return None
        frame = frame.f_back
    return None


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR) or path.startswith(_TORCH_DIR)


def _fail(message: str):
    location, line = user_location(_internal)
    raise TraceError(message, location, line)


class Proxy:
    """A traced scalar value. Supports Python operators and torch functions."""

    __slots__ = ("node", "weak")

    def __init__(self, node: Node, weak: bool = False):
        self.node = node
        # 0-dim captured tensors promote like Python scalars (category only).
        self.weak = weak

    @property
    def dtype(self) -> torch.dtype:
        return {DType.BOOL: torch.bool, DType.INT32: torch.int32,
                DType.INT64: torch.int64, DType.FLOAT32: torch.float32}[self.node.dtype]

    def __repr__(self) -> str:
        return f"Proxy({self.node.op.value}: {self.node.dtype.value})"

    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _call_torch(func, args, kwargs or {})

    # ----- operators -------------------------------------------------------
    def __add__(self, o): return _binary(Op.ADD, self, o)
    def __radd__(self, o): return _binary(Op.ADD, o, self)
    def __sub__(self, o): return _binary(Op.SUB, self, o)
    def __rsub__(self, o): return _binary(Op.SUB, o, self)
    def __mul__(self, o): return _binary(Op.MUL, self, o)
    def __rmul__(self, o): return _binary(Op.MUL, o, self)
    def __truediv__(self, o): return _binary(Op.TRUEDIV, self, o)
    def __rtruediv__(self, o): return _binary(Op.TRUEDIV, o, self)
    def __floordiv__(self, o): return _binary(Op.FLOORDIV, self, o)
    def __rfloordiv__(self, o): return _binary(Op.FLOORDIV, o, self)
    def __mod__(self, o): return _binary(Op.MOD, self, o)
    def __rmod__(self, o): return _binary(Op.MOD, o, self)
    def __pow__(self, o): return _binary(Op.POW, self, o)
    def __rpow__(self, o): return _binary(Op.POW, o, self)
    def __and__(self, o): return _binary(Op.AND, self, o)
    def __rand__(self, o): return _binary(Op.AND, o, self)
    def __or__(self, o): return _binary(Op.OR, self, o)
    def __ror__(self, o): return _binary(Op.OR, o, self)
    def __xor__(self, o): return _binary(Op.XOR, self, o)
    def __rxor__(self, o): return _binary(Op.XOR, o, self)
    def __lshift__(self, o): return _binary(Op.LSHIFT, self, o)
    def __rlshift__(self, o): return _binary(Op.LSHIFT, o, self)
    def __rshift__(self, o): return _binary(Op.RSHIFT, self, o)
    def __rrshift__(self, o): return _binary(Op.RSHIFT, o, self)
    def __lt__(self, o): return _binary(Op.LT, self, o)
    def __le__(self, o): return _binary(Op.LE, self, o)
    def __gt__(self, o): return _binary(Op.GT, self, o)
    def __ge__(self, o): return _binary(Op.GE, self, o)
    def __eq__(self, o): return _binary(Op.EQ, self, o)  # type: ignore[override]
    def __ne__(self, o): return _binary(Op.NE, self, o)  # type: ignore[override]
    def __neg__(self): return _unary(Op.NEG, self)
    def __pos__(self): return self
    def __abs__(self): return _unary(Op.ABS, self)
    def __invert__(self): return _unary(Op.NOT, self)

    # ----- things that need a concrete value --------------------------------
    def __bool__(self):
        _fail(control_flow_message(_internal))

    def __int__(self):
        _fail("int() needs a concrete value, but this is a traced value. "
              "Keep it a tensor: use .long() or .int() to change its dtype.")

    def __float__(self):
        _fail("float() needs a concrete value, but this is a traced value (math.* functions call it too). "
              "Use .float() to change the dtype, and torch.exp/torch.log/... instead of math.*.")

    def __index__(self):
        _fail("a traced value was used as a Python index (list/tuple indexing, range, slicing). "
              "Put the data in a torch tensor and index the tensor: table[q_idx].")

    def __len__(self):
        _fail("len() of a traced value: traced values are scalars.")

    def __iter__(self):
        _fail("iterating over a traced value: traced values are scalars.")

    def __getitem__(self, item):
        _fail("indexing a traced value: traced values are scalars. Index a captured tensor "
              "with it instead: bias[q_idx].")

    def __setitem__(self, key, value):
        _fail("item assignment on a traced value. Mods must not mutate: return a new value.")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in _METHODS:
            return lambda *args, **kwargs: _METHODS[name](self, *args, **kwargs)
        if name == "item" or name == "tolist":
            _fail(f".{name}() needs a concrete value, but this is a traced value. "
                  "Keep computing with tensors (torch.where instead of if/else).")
        if name.endswith("_") and not name.startswith("_"):
            _fail(f"in-place op .{name}() on a traced value. Mods must not mutate: "
                  f"use the out-of-place form .{name[:-1]}() and return the result.")
        _fail(f"Tensor attribute or method .{name} is not supported in a traced mod. "
              f"Supported methods: {', '.join(sorted(_METHODS))}.")


# ----- building nodes --------------------------------------------------------

def _operand(value) -> Proxy:
    """Turn an operand (Proxy, Python scalar, 0-dim tensor) into a Proxy."""
    if isinstance(value, Proxy):
        return value
    if isinstance(value, bool):
        return Proxy(Node(Op.CONST, DType.BOOL, (), value), weak=True)
    if isinstance(value, int):
        return Proxy(Node(Op.CONST, DType.INT64, (), value), weak=True)
    if isinstance(value, float):
        return Proxy(Node(Op.CONST, DType.FLOAT32, (), value), weak=True)
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            _fail(f"a captured tensor of shape {list(value.shape)} was used as a value. "
                  "Index it with the traced indices down to one element, e.g. bias[h, q_idx - kv_idx].")
        return _load_proxy(_tracer().buffer(value), (), weak=True)
    if isinstance(value, _BufferView):
        _fail(f"a captured tensor was indexed with {len(value.indices)} of its "
              f"{value.ndim} dimensions; index every dimension to read one element.")
    _fail(f"a value of type {type(value).__name__} cannot be used in a traced mod; "
          "use Python numbers, torch tensors and traced values.")


def _tracer() -> _Tracer:
    if not _current:
        raise TraceError("a traced value was used outside of tracing")
    return _current[-1]


def _promote(operands: list[Proxy]) -> DType:
    category = max(_CATEGORY[p.node.dtype] for p in operands)
    strong = [p.node.dtype for p in operands if not p.weak and _CATEGORY[p.node.dtype] == category]
    if not strong:
        return _DEFAULT_OF_CATEGORY[category]
    return max(strong, key=_ORDER.index)


def _cast(p: Proxy, dtype: DType) -> Proxy:
    if p.node.dtype is dtype:
        return p
    return Proxy(Node(Op.CAST, dtype, (p.node,), dtype), p.weak)


def _binary(op: Op, a, b) -> Proxy:
    pa, pb = _operand(a), _operand(b)
    common = _promote([pa, pb])
    weak = pa.weak and pb.weak
    if op in COMPARISONS:
        return Proxy(Node(op, DType.BOOL, (_cast(pa, common).node, _cast(pb, common).node)), weak)
    if op is Op.TRUEDIV and not common.is_float:
        common = DType.FLOAT32
    if op in (Op.AND, Op.OR, Op.XOR, Op.LSHIFT, Op.RSHIFT) and common.is_float:
        _fail(f"bitwise '{op.value}' on a float value; use it on bools (masks) or ints only.")
    if op in (Op.LSHIFT, Op.RSHIFT) and common is DType.BOOL:
        common = DType.INT64
    if op in (Op.ADD, Op.SUB, Op.MUL, Op.FLOORDIV, Op.MOD, Op.POW) and common is DType.BOOL:
        if op is Op.SUB:
            _fail("subtracting bools; use ^ (xor) or logical_xor, or cast with .long() first.")
        common = DType.INT64
    return Proxy(Node(op, common, (_cast(pa, common).node, _cast(pb, common).node)), weak)


def _unary(op: Op, a) -> Proxy:
    p = _operand(a)
    dtype = p.node.dtype
    if op in FLOAT_UNARY_OPS and not dtype.is_float:
        p, dtype = _cast(p, DType.FLOAT32), DType.FLOAT32
    if op is Op.ISNAN:
        dtype = DType.BOOL
    if op is Op.NEG and dtype is DType.BOOL:
        _fail("negating a bool; use ~ for logical not.")
    return Proxy(Node(op, dtype, (p.node,)), p.weak)


def _where(cond, a, b) -> Proxy:
    pc = _operand(cond)
    if pc.node.dtype is not DType.BOOL:
        _fail(f"torch.where needs a bool condition, got {pc.node.dtype.value}; compare it (x != 0).")
    pa, pb = _operand(a), _operand(b)
    common = _promote([pa, pb])
    return Proxy(Node(Op.WHERE, common, (pc.node, _cast(pa, common).node, _cast(pb, common).node)),
                 pc.weak and pa.weak and pb.weak)


def _clamp(x, min=None, max=None) -> Proxy:
    result = _operand(x)
    if min is not None:
        result = _binary(Op.MAX, result, min)
    if max is not None:
        result = _binary(Op.MIN, result, max)
    return result


def _to(x, *args, **kwargs) -> Proxy:
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
    if dtype is None:  # .to(device) and friends change nothing here
        return _operand(x)
    return _cast(_operand(x), _dtype_of(dtype))


_CASTABLE = (torch.bool, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _dtype_of(dtype: torch.dtype) -> DType:
    """The IR dtype a cast to ``dtype`` produces: the same widening as a buffer load."""
    if dtype.is_floating_point or dtype in _CASTABLE:
        return load_dtype(dtype)
    _fail(f"casting to {dtype} is not supported; use float32, int32, int64 or bool.")


def _full_like(x, fill_value, *, dtype=None, **_) -> Proxy:
    target = _dtype_of(dtype) if dtype is not None else _operand(x).node.dtype
    return _cast(_operand(fill_value), target)


class _BufferView:
    """A captured tensor indexed in some of its dimensions (``table[h]``)."""

    def __init__(self, buffer: Node, indices: tuple[Node, ...], ndim: int):
        self.buffer, self.indices, self.ndim = buffer, indices, ndim

    def __getitem__(self, item):
        return _index(self.buffer, self.indices, self.ndim, item)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        _operand(self)


def _load_proxy(buffer: Node, indices: tuple[Node, ...], weak: bool = False) -> Proxy:
    return Proxy(Node(Op.LOAD, buffer.dtype, (buffer,) + indices), weak)


def _index(buffer: Node, done: tuple[Node, ...], ndim: int, item):
    items = item if isinstance(item, tuple) else (item,)
    indices = list(done)
    for it in items:
        if isinstance(it, (slice, type(Ellipsis))) or it is None:
            _fail("slicing a captured tensor inside a mod; index every dimension with a "
                  "traced value or an int: table[h, q_idx].")
        p = _operand(it)
        if not p.node.dtype.is_int:
            _fail(f"a tensor index must be an integer, got {p.node.dtype.value}; "
                  "cast it with .long() (bool indices would be a mask, which mods cannot use).")
        indices.append(_cast(p, DType.INT64).node)
    if len(indices) > ndim:
        _fail(f"too many indices for a captured tensor of {ndim} dimensions.")
    if len(indices) < ndim:
        return _BufferView(buffer, tuple(indices), ndim)
    return _load_proxy(buffer, tuple(indices))


def _getitem(tensor, item):
    if not isinstance(tensor, torch.Tensor):
        _fail(f"indexing a {type(tensor).__name__} with a traced value.")
    return _index(_tracer().buffer(tensor), (), tensor.dim(), item)


def _forbid_setitem(*_, **__):
    _fail("assigning into a captured tensor inside a mod. Mods must not mutate tensors: "
          "compute a new value and return it.")


def _swap(op: Op):
    return lambda a, b, **_: _binary(op, b, a)


def _div(a, b, *, rounding_mode=None):
    if rounding_mode is None:
        return _binary(Op.TRUEDIV, a, b)
    if rounding_mode == "floor":
        return _binary(Op.FLOORDIV, a, b)
    _fail("torch.div(rounding_mode='trunc') is not supported; use rounding_mode='floor' or //.")


def _bin(op: Op):
    return lambda a, b, **_: _binary(op, a, b)


def _un(op: Op):
    return lambda a, **_: _unary(op, a)


def _logical(op: Op):
    return lambda a, b, **_: _binary(op, _to(_operand(a), torch.bool), _to(_operand(b), torch.bool))


_FUNCTIONS = {
    "__getitem__": _getitem, "__setitem__": _forbid_setitem,
    "add": _bin(Op.ADD), "__add__": _bin(Op.ADD), "__radd__": _swap(Op.ADD),
    "sub": _bin(Op.SUB), "subtract": _bin(Op.SUB), "__sub__": _bin(Op.SUB),
    "rsub": _swap(Op.SUB), "__rsub__": _swap(Op.SUB),
    "mul": _bin(Op.MUL), "multiply": _bin(Op.MUL), "__mul__": _bin(Op.MUL), "__rmul__": _swap(Op.MUL),
    "div": _div, "divide": _div, "true_divide": _bin(Op.TRUEDIV), "__truediv__": _bin(Op.TRUEDIV),
    "__rtruediv__": _swap(Op.TRUEDIV), "__rdiv__": _swap(Op.TRUEDIV), "__div__": _bin(Op.TRUEDIV),
    "floor_divide": _bin(Op.FLOORDIV), "__floordiv__": _bin(Op.FLOORDIV), "__rfloordiv__": _swap(Op.FLOORDIV),
    "remainder": _bin(Op.MOD), "__mod__": _bin(Op.MOD), "__rmod__": _swap(Op.MOD),
    "pow": _bin(Op.POW), "__pow__": _bin(Op.POW), "__rpow__": _swap(Op.POW),
    "minimum": _bin(Op.MIN), "maximum": _bin(Op.MAX),
    "lt": _bin(Op.LT), "less": _bin(Op.LT), "__lt__": _bin(Op.LT),
    "le": _bin(Op.LE), "less_equal": _bin(Op.LE), "__le__": _bin(Op.LE),
    "gt": _bin(Op.GT), "greater": _bin(Op.GT), "__gt__": _bin(Op.GT),
    "ge": _bin(Op.GE), "greater_equal": _bin(Op.GE), "__ge__": _bin(Op.GE),
    "eq": _bin(Op.EQ), "__eq__": _bin(Op.EQ), "ne": _bin(Op.NE), "not_equal": _bin(Op.NE), "__ne__": _bin(Op.NE),
    "bitwise_and": _bin(Op.AND), "__and__": _bin(Op.AND), "__rand__": _swap(Op.AND),
    "bitwise_or": _bin(Op.OR), "__or__": _bin(Op.OR), "__ror__": _swap(Op.OR),
    "bitwise_xor": _bin(Op.XOR), "__xor__": _bin(Op.XOR), "__rxor__": _swap(Op.XOR),
    "bitwise_left_shift": _bin(Op.LSHIFT), "__lshift__": _bin(Op.LSHIFT), "__rlshift__": _swap(Op.LSHIFT),
    "bitwise_right_shift": _bin(Op.RSHIFT), "__rshift__": _bin(Op.RSHIFT), "__rrshift__": _swap(Op.RSHIFT),
    "logical_and": _logical(Op.AND), "logical_or": _logical(Op.OR), "logical_xor": _logical(Op.XOR),
    "logical_not": lambda a, **_: _unary(Op.NOT, _to(_operand(a), torch.bool)),
    "bitwise_not": _un(Op.NOT), "__invert__": _un(Op.NOT),
    "neg": _un(Op.NEG), "negative": _un(Op.NEG), "__neg__": _un(Op.NEG),
    "abs": _un(Op.ABS), "__abs__": _un(Op.ABS), "absolute": _un(Op.ABS),
    "exp": _un(Op.EXP), "exp2": _un(Op.EXP2), "log": _un(Op.LOG), "log2": _un(Op.LOG2),
    "sqrt": _un(Op.SQRT), "rsqrt": _un(Op.RSQRT), "tanh": _un(Op.TANH), "sigmoid": _un(Op.SIGMOID),
    "sin": _un(Op.SIN), "cos": _un(Op.COS), "sign": _un(Op.SIGN), "floor": _un(Op.FLOOR),
    "ceil": _un(Op.CEIL), "round": _un(Op.ROUND), "isnan": _un(Op.ISNAN),
    "where": lambda c, a, b, **_: _where(c, a, b),
    "clamp": _clamp, "clip": _clamp,
    "to": _to, "type": _to,
    "float": lambda x, **_: _to(x, torch.float32), "double": lambda x, **_: _to(x, torch.float32),
    "int": lambda x, **_: _to(x, torch.int32), "long": lambda x, **_: _to(x, torch.int64),
    "bool": lambda x, **_: _to(x, torch.bool),
    "zeros_like": lambda x, **kw: _full_like(x, 0, **kw), "ones_like": lambda x, **kw: _full_like(x, 1, **kw),
    "full_like": _full_like,
}

_METHODS = {name: fn for name, fn in _FUNCTIONS.items() if not name.startswith("__")}


def _call_torch(func, args, kwargs):
    name = getattr(func, "__name__", repr(func))
    if name in _FUNCTIONS:
        return _FUNCTIONS[name](*args, **kwargs)
    if name.endswith("_") and name[:-1] in _FUNCTIONS:
        _fail(f"in-place op {name}() in a traced mod. Mods must not mutate: use {name[:-1]}().")
    _fail(f"torch.{name} is not supported in a traced mod. Supported: "
          f"{', '.join(sorted(n for n in _METHODS if not n.startswith('_')))}.")
