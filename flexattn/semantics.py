"""What each IR op computes, as torch functions on tensors or Python scalars.

This is the executable meaning of the IR: constant folding, the dense
reference interpreter and tile refinement all evaluate ops through
``apply_op``, so they cannot disagree. Printers for other targets (torch
source, Triton source) must match these semantics.
"""

from __future__ import annotations

import torch

from flexattn.ir import DType, Graph, Op

TORCH_DTYPES = {
    DType.BOOL: torch.bool,
    DType.INT32: torch.int32,
    DType.INT64: torch.int64,
    DType.FLOAT32: torch.float32,
}


def _float(x):
    """Promote ints and bools to the compute float, as torch does for exp(int)."""
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.to(torch.float32)
    return torch.tensor(float(x), dtype=torch.float32)


def _not(x):
    if isinstance(x, torch.Tensor):
        return torch.logical_not(x) if x.dtype == torch.bool else torch.bitwise_not(x)
    return (not x) if isinstance(x, bool) else ~x


def _floordiv(a, b):
    return torch.floor_divide(torch.as_tensor(a), b)


def _mod(a, b):
    return torch.remainder(torch.as_tensor(a), b)


def _clamp_index(index, size):
    return torch.clamp(torch.as_tensor(index), 0, size - 1)


UNARY = {
    Op.NEG: lambda x: -x,
    Op.ABS: lambda x: torch.abs(torch.as_tensor(x)),
    Op.NOT: _not,
    Op.EXP: lambda x: torch.exp(_float(x)),
    Op.EXP2: lambda x: torch.exp2(_float(x)),
    Op.LOG: lambda x: torch.log(_float(x)),
    Op.LOG2: lambda x: torch.log2(_float(x)),
    Op.SQRT: lambda x: torch.sqrt(_float(x)),
    Op.RSQRT: lambda x: torch.rsqrt(_float(x)),
    Op.TANH: lambda x: torch.tanh(_float(x)),
    Op.SIGMOID: lambda x: torch.sigmoid(_float(x)),
    Op.SIN: lambda x: torch.sin(_float(x)),
    Op.COS: lambda x: torch.cos(_float(x)),
    Op.SIGN: lambda x: torch.sign(torch.as_tensor(x)),
    Op.FLOOR: lambda x: torch.floor(torch.as_tensor(x)),
    Op.CEIL: lambda x: torch.ceil(torch.as_tensor(x)),
    Op.ROUND: lambda x: torch.round(torch.as_tensor(x)),
    Op.ISNAN: lambda x: torch.isnan(torch.as_tensor(x)),
}

BINARY = {
    Op.ADD: lambda a, b: a + b,
    Op.SUB: lambda a, b: a - b,
    Op.MUL: lambda a, b: a * b,
    Op.TRUEDIV: lambda a, b: torch.true_divide(torch.as_tensor(a), b),
    Op.FLOORDIV: _floordiv,
    Op.MOD: _mod,
    Op.POW: lambda a, b: torch.pow(torch.as_tensor(a), b),
    Op.MIN: lambda a, b: torch.minimum(torch.as_tensor(a), torch.as_tensor(b)),
    Op.MAX: lambda a, b: torch.maximum(torch.as_tensor(a), torch.as_tensor(b)),
    Op.LT: lambda a, b: torch.as_tensor(a) < b,
    Op.LE: lambda a, b: torch.as_tensor(a) <= b,
    Op.GT: lambda a, b: torch.as_tensor(a) > b,
    Op.GE: lambda a, b: torch.as_tensor(a) >= b,
    Op.EQ: lambda a, b: torch.as_tensor(a) == b,
    Op.NE: lambda a, b: torch.as_tensor(a) != b,
    Op.AND: lambda a, b: torch.as_tensor(a) & b,
    Op.OR: lambda a, b: torch.as_tensor(a) | b,
    Op.XOR: lambda a, b: torch.as_tensor(a) ^ b,
    Op.LSHIFT: lambda a, b: torch.bitwise_left_shift(torch.as_tensor(a), b),
    Op.RSHIFT: lambda a, b: torch.bitwise_right_shift(torch.as_tensor(a), b),
}


def apply_op(op: Op, dtype: DType, args: list, arg=None):
    """Evaluate one non-leaf op on already-evaluated inputs.

    ``args`` are tensors (broadcastable) or Python scalars. The result is cast
    to the node's ``dtype`` so every evaluator agrees with the IR's typing.
    """
    if op is Op.CAST:
        (x,) = args
        return torch.as_tensor(x).to(TORCH_DTYPES[arg])
    if op is Op.WHERE:
        cond, a, b = args
        result = torch.where(torch.as_tensor(cond), torch.as_tensor(a), torch.as_tensor(b))
    elif op in UNARY:
        result = UNARY[op](args[0])
    elif op in BINARY:
        result = BINARY[op](args[0], args[1])
    else:
        raise ValueError(f"apply_op cannot evaluate leaf op {op}")
    result = torch.as_tensor(result)
    want = TORCH_DTYPES[dtype]
    if result.dtype != want and not (dtype is DType.FLOAT32 and result.is_floating_point()):
        result = result.to(want)
    return result


def load(buffer: torch.Tensor, indices: list) -> torch.Tensor:
    """Read ``buffer[indices]`` with every index clamped into bounds (see ``Op.LOAD``)."""
    if buffer.dim() == 0:
        value = buffer
    else:
        clamped = [_clamp_index(i, size).long() for i, size in zip(indices, buffer.shape)]
        value = buffer[tuple(clamped)]
    want = load_dtype(buffer.dtype)
    if want is DType.FLOAT32 and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    if want is not DType.FLOAT32 and value.dtype != TORCH_DTYPES[want]:
        return value.to(TORCH_DTYPES[want])
    return value


def load_dtype(torch_dtype: torch.dtype) -> DType:
    """The IR dtype of a value loaded from a buffer of ``torch_dtype``."""
    if torch_dtype == torch.bool:
        return DType.BOOL
    if torch_dtype.is_floating_point:
        return DType.FLOAT32
    if torch_dtype == torch.int64:
        return DType.INT64
    return DType.INT32


def evaluate(graph: Graph, env: dict[str, torch.Tensor], buffers) -> torch.Tensor:
    """Evaluate ``graph`` elementwise over broadcastable input tensors.

    ``env`` maps input names (``score``, ``b``, ``h``, ``q_idx``, ``kv_idx``) to
    tensors that broadcast against each other; ``buffers`` are the tensors of
    the graph's buffer inputs. Returns a tensor of the broadcast shape (or a
    0-dim tensor when the output depends on no input).
    """
    values: dict = {}
    for node in graph.nodes:
        if node.op is Op.INPUT:
            value = env[node.arg]
        elif node.op is Op.CONST:
            value = node.arg
        elif node.op is Op.BUFFER:
            value = buffers[node.arg]
        elif node.op is Op.LOAD:
            value = load(values[node.inputs[0]], [values[i] for i in node.inputs[1:]])
        else:
            value = apply_op(node.op, node.dtype, [values[i] for i in node.inputs], node.arg)
        values[node] = value
    return torch.as_tensor(values[graph.output])


def index_grid(B: int, H: int, Q_LEN: int, KV_LEN: int, device="cpu") -> dict[str, torch.Tensor]:
    """Index tensors shaped to broadcast to (B, H, Q_LEN, KV_LEN)."""
    arange = lambda n: torch.arange(n, device=device, dtype=torch.int64)  # noqa: E731
    return {
        "b": arange(B).view(B, 1, 1, 1),
        "h": arange(H).view(1, H, 1, 1),
        "q_idx": arange(Q_LEN).view(1, 1, Q_LEN, 1),
        "kv_idx": arange(KV_LEN).view(1, 1, 1, KV_LEN),
    }
