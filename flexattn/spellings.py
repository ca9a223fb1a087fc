"""The torch spellings a traced mod can use, and what each one builds.

``FUNCTIONS`` (keyed by a torch function's ``__name__``) and ``METHODS``
(keyed by a Tensor method's name) are generated from the op table
(``flexattn.ops``), the composites (``flexattn.composites``) and the type
helpers and factories here. ``ModTracer`` is the tracer ``flexattn.trace``
runs a mod under: torch calls on traced values dispatch through these
tables, and torch's 0-dim factories called on Python numbers
(``torch.ones(())``, ``torch.tensor(2.0)``) become traced constants.
"""

from __future__ import annotations

import difflib
import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from flexattn.capture import Tracer, fail_at_user_line
from flexattn.composites import COMPOSITES, Composite
from flexattn.ir import DType
from flexattn.ops import OPS, OpDef
from flexattn import reductions
from flexattn.proxy import OPERATORS, Proxy, cast_proxy, as_proxy, apply, tensor_valued
from flexattn.semantics import load_dtype
from flexattn.vectors import broadcast_map, elementwise, getitem, to_vector

_NAMESPACES = {"torch": torch, "torch.special": torch.special, "F": F}
_CASTABLE = (torch.bool, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def dispatch_key(spelling: str) -> tuple[bool, str]:
    """``(is a Tensor method, name it dispatches on)`` of a spelling such as ``"torch.special.erf"``."""
    owner, _, attr = spelling.rpartition(".")
    if owner == "Tensor":
        return True, attr
    return False, getattr(_NAMESPACES[owner], attr).__name__


def _primitive(spec: OpDef):
    def lower(*args, **kwargs):
        if kwargs or len(args) != spec.arity:
            fail_at_user_line(f"'{spec.name}' takes {spec.arity} operand(s) and no keyword arguments in a traced mod; "
                  f"got {len(args)} operand(s) and {sorted(kwargs) or 'no'} keyword arguments.")
        return apply(spec, *args)
    return lower


def _composite(composite: Composite):
    def lower(*args, **kwargs):
        if len(args) < composite.arity:
            fail_at_user_line(f"{composite.spellings[0]} takes {composite.arity} operand(s), got {len(args)}.")
        if any(tensor_valued(a) for a in args[:composite.arity]):
            return broadcast_map(lambda *xs: lower(*xs, *args[composite.arity:], **kwargs), args[:composite.arity])
        operands = [as_proxy(a) for a in args[:composite.arity]]
        return composite.lower(*operands, *args[composite.arity:], **kwargs)
    return lower


# ----- dtypes and 0-dim tensors ----------------------------------------------

def ir_dtype_of(dtype: torch.dtype) -> DType:
    """The IR dtype a cast to ``dtype`` produces: the same widening as a buffer load."""
    if dtype.is_floating_point or dtype in _CASTABLE:
        return load_dtype(dtype)
    fail_at_user_line(f"casting to {dtype} is not supported; use float32, int32, int64 or bool.")


def _to(x, *args, dtype=None, **_):
    """``x.to(dtype)``, ``x.to(other)`` (other's dtype), ``x.to(device)`` (no change)."""
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (Proxy, torch.Tensor)):
            dtype = a.dtype
    return as_proxy(x) if dtype is None else cast_proxy(as_proxy(x), ir_dtype_of(dtype))


def _type(x, dtype=None, **_):
    if not isinstance(dtype, torch.dtype):
        fail_at_user_line(".type() needs a torch.dtype in a traced mod (its string forms name tensor types); "
              "use .to(dtype).")
    return _to(x, dtype)


def _filled(value, dtype: DType | None) -> Proxy:
    """A traced 0-dim tensor holding ``value``: it promotes like the traced values, not as a Python number."""
    p = as_proxy(value)
    return Proxy(cast_proxy(p, dtype or p.node.dtype).node)


def _is_scalar_size(size) -> bool:
    return isinstance(size, (tuple, list, torch.Size)) and len(size) == 0


def _size(args: tuple, kwargs: dict):
    """The size argument of ``new_ones(())``, ``new_ones(size=())``, ``torch.ones(2, 3)``."""
    if "size" in kwargs:
        return kwargs["size"]
    return args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args


def _dtype_kwarg(kwargs: dict, default: DType | None) -> DType | None:
    dtype = kwargs.get("dtype")
    return default if dtype is None else ir_dtype_of(dtype)


def _ir_dtype(x) -> DType:
    return to_vector(x).elements[0].node.dtype


def _new(fill):
    """``x.new_zeros(())`` and friends (``x.new_empty(())`` is zeros): x's dtype unless ``dtype=``."""
    def lower(x, *args, **kwargs):
        size = _size(args, kwargs)
        if not _is_scalar_size(size):
            fail_at_user_line(f"new tensor of size {list(size)} in a traced mod; traced values are scalars: use size ().")
        return _filled(fill, _dtype_kwarg(kwargs, _ir_dtype(x)))
    return lower


def _new_full(x, size, fill_value, **kwargs):
    return _new(fill_value)(x, size, **kwargs)


def _like(fill):
    return lambda x, **kwargs: _filled(fill, _dtype_kwarg(kwargs, as_proxy(x).node.dtype))


def _full_like(x, fill_value, **kwargs):
    return _like(fill_value)(x, **kwargs)


def _factory(fill, default: DType | None):
    """``torch.ones(())`` and friends: a constant for a 0-dim size, None (torch's own tensor) otherwise."""
    def make(*args, **kwargs):
        size = _size(args, kwargs)
        return _filled(fill, _dtype_kwarg(kwargs, default)) if _is_scalar_size(size) else None
    return make


def _full(size, fill_value, **kwargs):
    return _factory(fill_value, None)(size, **kwargs)


def _traced_in(data) -> bool:
    return isinstance(data, Proxy) or tensor_valued(data) and not isinstance(data, torch.Tensor) or \
        isinstance(data, (list, tuple)) and any(_traced_in(d) for d in data)


def _tensor(data, default: DType | None = None, **kwargs):
    """``torch.tensor(2.0)``: a constant for a Python number or a traced value, a stack for a list
    holding traced values, None (torch's own tensor) otherwise."""
    if isinstance(data, (list, tuple)) and _traced_in(data):
        stacked = reductions.FUNCTIONS["stack"]([_tensor(d, default, **kwargs) for d in data])
        return stacked if "dtype" not in kwargs else elementwise(_to)(stacked, kwargs["dtype"])
    if not isinstance(data, (bool, int, float, Proxy)):
        return None
    return _filled(data, _dtype_kwarg(kwargs, default))


_FACTORIES = {
    torch.full: _full, torch.ones: _factory(1, DType.FLOAT32), torch.zeros: _factory(0, DType.FLOAT32),
    torch.empty: _factory(0, DType.FLOAT32), torch.tensor: _tensor, torch.as_tensor: _tensor,
    torch.scalar_tensor: functools.partial(_tensor, default=DType.FLOAT32),
}

_CASTS = {
    "to": _to, "type": _type, "type_as": lambda x, other: _to(x, other),
    "float": lambda x, **_: _to(x, torch.float32), "double": lambda x, **_: _to(x, torch.float32),
    "half": lambda x, **_: _to(x, torch.float16), "bfloat16": lambda x, **_: _to(x, torch.bfloat16),
    "int": lambda x, **_: _to(x, torch.int32), "long": lambda x, **_: _to(x, torch.int64),
    "bool": lambda x, **_: _to(x, torch.bool),
}
_TYPE_METHODS = {
    **{name: elementwise(lower) for name, lower in _CASTS.items()},
    "new_zeros": _new(0), "new_ones": _new(1), "new_empty": _new(0), "new_full": _new_full,
    "new_tensor": lambda x, data, **kwargs: _filled(data, _dtype_kwarg(kwargs, _ir_dtype(x))),
    "clone": lambda x, **_: x, "detach": lambda x: x, "contiguous": lambda x, **_: x,
    "dim": lambda x: x.ndim, "numel": lambda x: x.shape.numel(),
    "size": lambda x, dim=None: x.shape if dim is None else x.shape[dim],
    "is_floating_point": lambda x: x.dtype.is_floating_point,
    "__getitem__": getitem,
    "__setitem__": lambda *_, **__: fail_at_user_line("assigning into a captured tensor inside a mod. Mods must not "
                                          "mutate tensors: compute a new value and return it."),
}

_LIKE_FUNCTIONS = {"zeros_like": elementwise(_like(0)), "ones_like": elementwise(_like(1)),
                   "empty_like": elementwise(_like(0)), "full_like": elementwise(_full_like), "clone": lambda x, **_: x}


def _tables() -> tuple[dict, dict]:
    functions = {**reductions.FUNCTIONS, **_LIKE_FUNCTIONS}
    methods = {**reductions.METHODS, **_TYPE_METHODS}
    entries = [(spec.spellings, _primitive(spec)) for spec in OPS]
    entries += [(c.spellings, _composite(c)) for c in COMPOSITES]
    for spellings, lower in entries:
        for spelling in spellings:
            is_method, key = dispatch_key(spelling)
            (methods if is_method else functions)[key] = lower
    # Tensor's operator methods, for a tensor on the left of a traced value (tensor + proxy).
    methods.update(OPERATORS)
    return functions, methods


FUNCTIONS, METHODS = _tables()


def _shown(func, name: str, is_method: bool) -> str:
    """How the user spelled ``func``, for messages: ``torch.special.i0``, ``Tensor.cumsum``."""
    if is_method:
        return f"Tensor.{name}"
    if name.startswith("special_"):
        return f"torch.special.{name[len('special_'):]}"
    if "nn" in (getattr(func, "__module__", None) or "").split("."):
        return f"torch.nn.functional.{name}"
    return f"torch.{name}"


def _supported(name: str, table: dict) -> str:
    names = sorted(n for n in table if not n.startswith("_"))
    close = difflib.get_close_matches(name, names, n=6)
    return f"{', '.join(close)} (closest of {len(names)})" if close else ", ".join(names)


class _ScalarFactories(TorchFunctionMode):
    """On while tracing: torch's 0-dim factories on Python numbers build traced constants."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        make = _FACTORIES.get(func)
        value = make(*args, **kwargs) if make is not None else None
        return func(*args, **kwargs) if value is None else value


class ModTracer(Tracer):
    """The tracer of ``flexattn.trace``: torch functions and Tensor methods through ``FUNCTIONS``/``METHODS``."""

    def __init__(self):
        super().__init__(_ScalarFactories())

    def call(self, func, args: tuple, kwargs: dict):
        name = getattr(func, "__name__", repr(func))
        is_method = getattr(func, "__qualname__", "").split(".")[0] in ("Tensor", "TensorBase")
        table = METHODS if is_method else FUNCTIONS
        if name in table:
            return table[name](*args, **kwargs)
        shown = _shown(func, name, is_method)
        if name.endswith("_") and name[:-1] in table:
            fail_at_user_line(f"in-place op {shown}() in a traced mod. Mods must not mutate: use {shown[:-1]}().")
        fail_at_user_line(f"{shown} is not supported in a traced mod. Supported: {_supported(name, table)}.")

    def attribute(self, value, name: str):
        if name in METHODS:
            return functools.partial(METHODS[name], value)
        if name in ("item", "tolist"):
            fail_at_user_line(f".{name}() needs a concrete value, but this is a traced value. "
                  "Keep computing with tensors (torch.where instead of if/else).")
        if name.endswith("_") and not name.startswith("_"):
            fail_at_user_line(f"in-place op .{name}() on a traced value. Mods must not mutate: "
                  f"use the out-of-place form .{name[:-1]}() and return the result.")
        fail_at_user_line(f"Tensor attribute or method .{name} is not supported in a traced mod. "
              f"Supported methods: {_supported(name, METHODS)}.")
