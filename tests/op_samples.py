"""Inputs and tracing helpers shared by the op-table tests (tests/flexattn/test_ops*.py).

An op is traced on values read from 1-D captured tensors (``x[q_idx]``), so the graph of a
single op has LOAD operands of any dtype, and is evaluated over ``q_idx = 0..N-1``.
"""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from flexattn import passes
from flexattn.proxy import as_proxy
from flexattn.semantics import evaluate, index_grid
from flexattn.trace import trace_score_mod

N = 64
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.5, math.inf, -math.inf, math.nan, 1e-7, -1e-7, 30.0, -30.0,
           100.0]
f32, i64, i32, b8 = torch.float32, torch.int64, torch.int32, torch.bool
COMBOS = {
    1: [(f32,), (i64,), (i32,), (b8,)],
    2: [(f32, f32), (i64, i64), (i32, i32), (b8, b8), (f32, i64), (i64, f32), (i32, i64), (b8, i64), (b8, f32),
        (f32, b8), (i64, b8)],
    3: [(f32, f32, f32), (i64, i64, i64), (b8, f32, f32), (b8, i64, f32), (b8, i32, i64), (b8, b8, b8),
        (f32, b8, f32), (i64, b8, i64), (f32, f32, i64)],
}
# Integer operands past the first, per OpDef.int_domain: (low, high, zero allowed).
_INT_RANGES = {"": (-20, 20, True), "divisor": (-20, 20, False), "exponent": (0, 4, True), "shift": (0, 8, True)}
_NAMESPACES = {"torch": torch, "torch.special": torch.special, "F": F}


def resolve(spelling: str):
    """The callable a spelling names: ``torch.special.erf``, ``F.relu``, or a method call for ``Tensor.exp``."""
    owner, _, attr = spelling.rpartition(".")
    if owner == "Tensor":
        return lambda x, *args, **kwargs: getattr(x, attr)(*args, **kwargs)
    return getattr(_NAMESPACES[owner], attr)


def sample(dtype: torch.dtype, position: int, int_domain: str | None = None, seed: int = 0,
           special: bool = True) -> torch.Tensor:
    """N values of ``dtype`` for operand ``position``: specials (inf, nan, -0.0, ...) and random ones.

    ``int_domain`` None (a composite) keeps integer operands past the first nonzero."""
    g = torch.Generator().manual_seed(1000 * seed + position)
    if dtype == torch.bool:  # a divisor bool is True (it computes as the int 1)
        return torch.rand(N, generator=g) < (0.5 if position == 0 or int_domain != "divisor" else 2.0)
    if dtype.is_floating_point:
        values = torch.randn(N, generator=g) * 3
        if special:
            specials = torch.tensor(SPECIAL)[torch.randperm(len(SPECIAL), generator=g)]
            values[:len(SPECIAL)] = specials
        return values
    low, high, zero = _INT_RANGES[int_domain or ""] if position else _INT_RANGES[""]
    if int_domain is None and position:
        zero = False
    values = torch.randint(low, high + 1, (N,), generator=g)
    if not zero:
        values = torch.where(values == 0, torch.ones_like(values), values)
    return values.to(dtype)


def trace_values(fn, tensors: list[torch.Tensor]):
    """The traced graph of ``fn(x0[q], x1[q], ...)`` and its buffers. The output is fn's own value,
    of its own dtype (not the float32 a score_mod's result is cast to)."""
    result = []

    def mod(score, b, h, q_idx, kv_idx):
        result.append(as_proxy(fn(*[t[q_idx] for t in tensors])).node)
        return score

    traced = trace_score_mod(mod)
    return passes.simplify(replace(traced.graph, output=result[-1])), list(traced.buffers)


def grid_env() -> dict:
    env = index_grid(1, 1, N, 1)
    env["score"] = torch.zeros(1, 1, N, 1)
    return env


def evaluate_values(graph, buffers) -> torch.Tensor:
    """The graph's values at q_idx = 0..N-1, as a 1-D tensor."""
    return torch.as_tensor(evaluate(graph, grid_env(), buffers)).expand(1, 1, N, 1).reshape(N)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-5, atol: float = 1e-6) -> torch.Tensor:
    """Elementwise: equal, both NaN, or within float32 rounding (exact for ints and bools)."""
    if not want.is_floating_point():
        return got == want
    got, want = got.double(), want.double()
    return (got == want) | (got.isnan() & want.isnan()) | ((got - want).abs() <= atol + rtol * want.abs())
