"""What each IR op computes, as torch functions on tensors or Python scalars.

This is the executable meaning of the IR: constant folding, the dense
reference interpreter and tile refinement all evaluate ops through
``apply_op``, so they cannot disagree. Printers for other targets (torch
source, Triton source) must match these semantics.
"""

from __future__ import annotations

import functools
import math

import torch

from flexattn.ir import SPECS, DType, Graph, Op

TORCH_DTYPES = {
    DType.BOOL: torch.bool,
    DType.INT32: torch.int32,
    DType.INT64: torch.int64,
    DType.FLOAT32: torch.float32,
}


def _clamp_index(index, size):
    return torch.clamp(torch.as_tensor(index), 0, size - 1)


def _kind(dtype: torch.dtype) -> type:
    return bool if dtype == torch.bool else float if dtype.is_floating_point else int


def _tensors(args: list) -> list[torch.Tensor]:
    """The operands as tensors: a Python scalar takes the dtype and device of an operand
    tensor of its kind (as a scalar promotes), so a float64 evaluation keeps its constants exact."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    out = []
    for a in args:
        if not isinstance(a, torch.Tensor):
            like = next((t for t in tensors if _kind(t.dtype) is type(a)), None)
            a = _constant(a, type(a), _negative_zero(a), None if like is None else like.dtype,
                          None if like is None else like.device)
        out.append(a)
    return out


def _negative_zero(value) -> bool:
    return isinstance(value, float) and value == 0.0 and math.copysign(1.0, value) < 0


@functools.lru_cache(maxsize=1024)
def _constant(value, kind: type, negative_zero: bool, dtype: torch.dtype | None,
              device: torch.device | None) -> torch.Tensor:
    """The 0-dim tensor of the scalar ``value``, made once: a mask evaluated every decoding step
    converts the same constants (no op writes into its operands). ``kind`` and ``negative_zero`` keep
    apart the scalars that compare equal (1 and True, 0.0 and -0.0)."""
    return torch.as_tensor(value) if dtype is None else torch.as_tensor(value, dtype=dtype, device=device)


def apply_op(op: Op, dtype: DType, args: list, arg=None):
    """Evaluate one non-leaf op on already-evaluated inputs.

    ``args`` are tensors (broadcastable) or Python scalars. The result is cast
    to the node's ``dtype`` so every evaluator agrees with the IR's typing.
    """
    if op is Op.CAST:
        (x,) = args
        return torch.as_tensor(x).to(TORCH_DTYPES[arg])
    spec = SPECS.get(op)
    if spec is None:
        raise ValueError(f"apply_op cannot evaluate leaf op {op}")
    operands = _tensors(args)
    if spec.promote == "float":  # as torch does for exp(int)
        operands = [x if x.is_floating_point() else x.to(torch.float32) for x in operands]
    result = torch.as_tensor(spec.fn(*operands))
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
