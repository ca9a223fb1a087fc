"""Proxy values: what a mod's arguments are while it is traced.

Python operators on a ``Proxy`` append IR nodes with torch's type promotion
(``apply``, from the op table); torch functions and Tensor methods on it go
to the active tracer (``flexattn.spellings``); real tensors a mod touches
become buffer inputs of the current trace; anything that needs a concrete
value raises ``TraceError`` naming the user's line.
"""

from __future__ import annotations

import torch

from flexattn.capture import fail_at_user_line, is_internal_frame, active_tracer
from flexattn.ir import DType, Node, Op
from flexattn.ops import BY_NAME, OPS, OpDef
from flexattn.semantics import TORCH_DTYPES
from flexattn.trace_errors import control_flow_message

_CATEGORY = {DType.BOOL: 0, DType.INT32: 1, DType.INT64: 1, DType.FLOAT32: 2}
_DEFAULT_OF_CATEGORY = {0: DType.BOOL, 1: DType.INT64, 2: DType.FLOAT32}
_ORDER = [DType.BOOL, DType.INT32, DType.INT64, DType.FLOAT32]


class TensorValue:
    """Base of the tensor-valued traced values (``flexattn.vectors.Vector``): ops broadcast over them."""

    __slots__ = ()


def tensor_valued(value) -> bool:
    """A traced tensor of one or more dimensions, or a captured tensor of one or more dimensions."""
    if isinstance(value, Proxy):
        return False
    return isinstance(value, TensorValue) or (isinstance(value, torch.Tensor) and value.dim() > 0)


class Proxy(torch.Tensor):
    """A traced scalar value. Supports Python operators, torch functions and Tensor methods.

    It is a Tensor subclass without data so that torch's unbound methods (``torch.Tensor.tanh(x)``,
    whose C descriptors accept only tensors) reach ``__torch_function__`` as its bound methods do."""

    @staticmethod
    def __new__(cls, node: Node, weak: bool = False):
        return torch.Tensor._make_wrapper_subclass(cls, (), dtype=TORCH_DTYPES[node.dtype], device="meta")

    def __init__(self, node: Node, weak: bool = False):
        self.node = node
        # 0-dim captured tensors promote like Python scalars (category only).
        self.weak = weak

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.node.dtype]

    # A traced value stands for one element of a 0-dim tensor; it has no device of its own
    # (factories such as ``x.new_ones((), device=x.device)`` ignore the device).
    device = torch.device("cpu")
    shape = torch.Size([])
    ndim = 0

    def __repr__(self) -> str:
        return f"Proxy({self.node.op.value}: {self.node.dtype.value})"

    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return active_tracer().call(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Every torch call on a traced value stops at __torch_function__; none reaches the dispatcher.
        fail_at_user_line(f"{func} was called on a traced value below torch's function layer, which tracing cannot see.")

    def __pos__(self):
        return self

    # ----- things that need a concrete value --------------------------------
    def __bool__(self):
        fail_at_user_line(control_flow_message(is_internal_frame))

    def __int__(self):
        fail_at_user_line("int() needs a concrete value, but this is a traced value. "
              "Keep it a tensor: use .long() or .int() to change its dtype.")

    def __float__(self):
        fail_at_user_line("float() needs a concrete value, but this is a traced value (math.* functions call it too). "
              "Use .float() to change the dtype, and torch.exp/torch.log/... instead of math.*.")

    def __index__(self):
        fail_at_user_line("a traced value was used as a Python index (list/tuple indexing, range, slicing). "
              "Put the data in a torch tensor and index the tensor: table[q_idx].")

    def __len__(self):
        fail_at_user_line("len() of a traced value: traced values are scalars.")

    def __iter__(self):
        fail_at_user_line("iterating over a traced value: traced values are scalars.")

    def __getitem__(self, item):
        from flexattn.vectors import index_vector
        return index_vector(self, item)

    def __setitem__(self, key, value):
        fail_at_user_line("item assignment on a traced value. Mods must not mutate: return a new value.")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return active_tracer().attribute(self, name)


# ----- building nodes --------------------------------------------------------

def as_proxy(value) -> Proxy:
    """Turn an operand (Proxy, Python scalar, 0-dim tensor) into a Proxy."""
    if isinstance(value, Proxy):
        return value
    if isinstance(value, bool):
        return Proxy(Node(Op.CONST, DType.BOOL, (), value), weak=True)
    if isinstance(value, int):
        return Proxy(Node(Op.CONST, DType.INT64, (), value), weak=True)
    if isinstance(value, float):
        return Proxy(Node(Op.CONST, DType.FLOAT32, (), value), weak=True)
    if tensor_valued(value):
        fail_at_user_line(f"a tensor of shape {list(value.shape)} where one value is needed. Index it down to one element "
              "(bias[h, q_idx - kv_idx]) or reduce it (.sum(-1), .any(-1), torch.dot).")
    if isinstance(value, torch.Tensor):
        return load_proxy(active_tracer().buffer(value), (), weak=True)
    fail_at_user_line(f"a value of type {type(value).__name__} cannot be used in a traced mod; "
          "use Python numbers, torch tensors and traced values.")


def promoted_dtype(operands: list[Proxy]) -> DType:
    category = max(_CATEGORY[p.node.dtype] for p in operands)
    strong = [p.node.dtype for p in operands if not p.weak and _CATEGORY[p.node.dtype] == category]
    if not strong:
        return _DEFAULT_OF_CATEGORY[category]
    return max(strong, key=_ORDER.index)


def cast_proxy(p: Proxy, dtype: DType) -> Proxy:
    if p.node.dtype is dtype:
        return p
    return Proxy(Node(Op.CAST, dtype, (p.node,), dtype), p.weak)


def apply(spec: OpDef, *args) -> Proxy:
    """The node of table op ``spec`` on ``args`` (traced values, Python numbers, 0-dim tensors),
    typed by the op's dtype rule (see ``flexattn.ops.OpDef``). Tensor-valued operands broadcast
    (``flexattn.vectors.broadcast_map``): the op applies to each element."""
    if any(tensor_valued(a) for a in args):
        from flexattn.vectors import broadcast_map
        return broadcast_map(lambda *xs: apply(spec, *xs), args)
    operands = [as_proxy(a) for a in args]
    condition = []
    if spec.promote == "select":
        condition, operands = operands[:1], operands[1:]
        if condition[0].node.dtype is not DType.BOOL:
            fail_at_user_line(f"torch.{spec.name} needs a bool condition, got {condition[0].node.dtype.value}; "
                  "compare it (x != 0).")
    common = promoted_dtype(operands)
    if common.kind in spec.rejects:
        fail_at_user_line(spec.rejects[common.kind])
    if common is DType.BOOL and spec.bools != "keep":
        if spec.bools != "int64":
            return apply(BY_NAME[spec.bools], *condition, *operands)
        common = DType.INT64
    if spec.promote == "float" and not common.is_float:
        common = DType.FLOAT32
    dtype = DType.BOOL if spec.result == "bool" else common
    inputs = tuple(p.node for p in condition) + tuple(cast_proxy(p, common).node for p in operands)
    return Proxy(Node(Op(spec.name), dtype, inputs), all(p.weak for p in condition + operands))


def _operator(spec: OpDef, reflected: bool):
    if spec.arity == 1:
        return lambda a: apply(spec, a)
    if reflected:
        return lambda a, b: apply(spec, b, a)
    return lambda a, b: apply(spec, a, b)


def _operators() -> dict[str, object]:
    """Python operator methods (``__add__``, ``__radd__``, ...) built from the op table."""
    methods = {}
    for spec in OPS:
        for stem in spec.operators:
            methods[f"__{stem}__"] = _operator(spec, reflected=False)
            if spec.arity == 2 and spec.result != "bool":
                methods[f"__r{stem}__"] = _operator(spec, reflected=True)
    return methods


OPERATORS = _operators()
for _name, _method in OPERATORS.items():
    setattr(Proxy, _name, _method)


def load_proxy(buffer: Node, indices: tuple[Node, ...], weak: bool = False) -> Proxy:
    """The traced value ``buffer[indices]`` (a LOAD node)."""
    return Proxy(Node(Op.LOAD, buffer.dtype, (buffer,) + indices), weak)
