"""Torch functions that are exact compositions of the op table's ops, lowered when traced.

A ``Composite`` names torch spellings (as ``OpDef.spell`` does) and a lowering
written with the table's ops (``_op``) and Python operators on traced values.
The formulas are the ones of torch's CPU kernels, so results equal torch's to
float32 rounding. The first ``arity`` arguments are operands (traced values,
Python numbers, 0-dim tensors); the others are the options of torch's
signature. ``examples`` are the option sets the op tests try.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from flexattn.capture import fail_at_user_line
from flexattn.ir import DType
from flexattn.ops import BY_NAME
from flexattn.proxy import Proxy, cast_proxy, as_proxy, promoted_dtype, apply

_FLOAT32_MAX = 3.4028234663852886e38
_SQRT1_2 = 0.7071067811865476


@dataclass(frozen=True)
class Composite:
    """A torch function lowered to table ops: its spellings, operand count and lowering."""

    spell: str
    arity: int
    lower: Callable
    examples: tuple[dict, ...] = ({},)

    @property
    def spellings(self) -> tuple[str, ...]:
        return tuple(self.spell.split())


def _op(name: str, *args) -> Proxy:
    return apply(BY_NAME[name], *args)


def _where(condition, a, b) -> Proxy:
    return _op("where", condition, a, b)


def _bool(x) -> Proxy:
    return cast_proxy(as_proxy(x), DType.BOOL)


def _option(value, *operands: Proxy):
    """A Python number option as torch applies it: truncated to an int where the operands are integers."""
    integer = not any(p.node.dtype.is_float for p in operands)
    return int(value) if isinstance(value, float) and integer and math.isfinite(value) else value


def _no_inplace(inplace: bool) -> None:
    if inplace:
        fail_at_user_line("inplace=True in a traced mod. Mods must not mutate: leave inplace out and use the result.")


def _scaled(x, alpha):
    """``alpha * x``, keeping ``x`` (and its dtype) when alpha is 1."""
    return x if alpha == 1 else alpha * x


def _alpha(a, b, alpha):
    """``alpha * b`` of torch.add(a, b, alpha=...): on two bools torch reads alpha as a bool."""
    both_bool = a.node.dtype is DType.BOOL and b.node.dtype is DType.BOOL
    return b if both_bool and alpha else _scaled(b, alpha)


def _div(a, b, *, rounding_mode=None):
    if rounding_mode is None:
        return a / b
    if rounding_mode == "floor":
        return a // b
    if rounding_mode != "trunc":
        fail_at_user_line(f"torch.div(rounding_mode={rounding_mode!r}); torch takes None, 'trunc' or 'floor'.")
    if a.node.dtype.is_float or b.node.dtype.is_float:
        return _op("trunc", a / b)
    # Rounding toward zero is rounding down, one up where a negative quotient was inexact.
    quotient = a // b
    return _where((a % b != 0) & ((a < 0) != (b < 0)), quotient + 1, quotient)


def _round(x, *, decimals=0):
    if decimals == 0:
        return _op("round", x)
    # As torch: scale by 10**|decimals|, round half to even, scale back.
    scale = 10.0 ** abs(decimals)
    return _op("round", x * scale) / scale if decimals > 0 else _op("round", x / scale) * scale


def _clamp(x, min=None, max=None):
    if min is not None:
        x = _op("max", x, min)
    if max is not None:
        x = _op("min", x, max)
    return x


def _square(x):
    # torch.square is pow(x, 2): a bool squares as int64.
    x = cast_proxy(x, DType.INT64) if x.node.dtype is DType.BOOL else x
    return x * x


def _logical(name: str):
    return lambda a, b: _op(name, _bool(a), _bool(b))


def _relu(x, inplace=False):
    _no_inplace(inplace)
    return _op("max", x, 0)


def _hardtanh(x, min_val=-1.0, max_val=1.0, inplace=False):
    _no_inplace(inplace)
    return _clamp(x, _option(min_val, x), _option(max_val, x))


def _gelu(x, approximate="none"):
    if approximate == "tanh":
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1 + _op("tanh", inner))
    if approximate != "none":
        fail_at_user_line(f"gelu(approximate={approximate!r}); torch takes 'none' or 'tanh'.")
    return x * 0.5 * (1 + _op("erf", x * _SQRT1_2))


def _silu(x, inplace=False):
    _no_inplace(inplace)
    return x * _op("sigmoid", x)


def _softplus(x, beta=1.0, threshold=20.0):
    scaled = x * beta
    return _where(scaled > threshold, x, _op("log1p", _op("exp", scaled)) / beta)


def _mish(x, inplace=False):
    _no_inplace(inplace)
    return x * _op("tanh", _softplus(x))


def _elu_like(x, alpha, scale, input_scale, inplace):
    """torch's elu kernel: ``expm1(x * input_scale) * alpha * scale`` where x <= 0, else ``x * scale``."""
    _no_inplace(inplace)
    return _where(x <= 0, _op("expm1", x * input_scale) * (alpha * scale), x * scale)


def _elu(x, alpha=1.0, inplace=False):
    return _elu_like(x, alpha, 1.0, 1.0, inplace)


def _selu(x, inplace=False):
    return _elu_like(x, 1.6732632423543772, 1.0507009873554805, 1.0, inplace)


def _celu(x, alpha=1.0, inplace=False):
    return _elu_like(x, alpha, 1.0, 1.0 / alpha, inplace)


def _leaky_relu(x, negative_slope=0.01, inplace=False):
    _no_inplace(inplace)
    return _where(x > 0, x, x * negative_slope)


def _hardsigmoid(x, inplace=False):
    _no_inplace(inplace)
    return _clamp(x + 3, 0, 6) / 6


def _hardswish(x, inplace=False):
    _no_inplace(inplace)
    return x * _clamp(x + 3, 0, 6) / 6


def _threshold(x, threshold, value, inplace=False):
    _no_inplace(inplace)
    return _where(x <= _option(threshold, x), _option(value, x), x)


def _nan_to_num(x, nan=0.0, posinf=None, neginf=None):
    if not x.node.dtype.is_float:
        return x
    posinf = _FLOAT32_MAX if posinf is None else posinf
    neginf = -_FLOAT32_MAX if neginf is None else neginf
    return _where(_op("isnan", x), nan, _where(x == math.inf, posinf, _where(x == -math.inf, neginf, x)))


def _logaddexp(exp: str, inverse_log_base: float):
    def lower(a, b):
        both_inf = (_op("abs", a) == math.inf) & (a == b)
        tail = _op("log1p", _op(exp, -_op("abs", a - b)))
        return _where(both_inf, a, _op("max", a, b) + _scaled(tail, inverse_log_base))
    return lower


def _xlogy(log: str):
    return lambda x, y: _where(_op("isnan", y), y, _where(x == 0, 0, x * _op(log, y)))


def _nan_ignoring(name: str):
    return lambda a, b: _where(_op("isnan", a), b, _where(_op("isnan", b), a, _op(name, a, b)))


def _sinc(x):
    product = x * math.pi
    return _where(x == 0, 1.0, _op("sin", product) / product)


def _logit(x, eps=None):
    z = x if eps is None else _clamp(x, eps, 1 - eps)
    return _op("log", z / (1 - z))


def _entr(x):
    return _where(_op("isnan", x), x, _where(x > 0, -(x * _op("log", x)), _where(x == 0, 0.0, -math.inf)))


def _gcd(a, b):
    """Euclid's algorithm unrolled: a bounded number of steps suffices (Fibonacci inputs are the worst case)."""
    dtype = promoted_dtype([a, b])
    if not dtype.is_int:
        fail_at_user_line(f"torch.gcd of {dtype.value} values: torch defines it for integers only; cast with .long().")
    steps = 46 if dtype is DType.INT32 else 92  # F(47) > 2**31, F(93) > 2**63
    a, b = _op("abs", cast_proxy(a, dtype)), _op("abs", cast_proxy(b, dtype))
    for _ in range(steps):
        done = b == 0
        a, b = _where(done, a, b), _where(done, 0, a % _where(done, 1, b))
    return a


def _lerp(start, end, weight):
    return _where(_op("abs", weight) < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))


COMPOSITES: tuple[Composite, ...] = (
    # arithmetic with options
    Composite("torch.add Tensor.add", 2, lambda a, b, *, alpha=1: a + _alpha(a, b, alpha), ({}, {"alpha": 3})),
    Composite("torch.sub torch.subtract Tensor.sub Tensor.subtract", 2,
              lambda a, b, *, alpha=1: a - _alpha(a, b, alpha), ({}, {"alpha": 3})),
    Composite("torch.rsub", 2, lambda a, b, *, alpha=1: b - _alpha(b, a, alpha), ({}, {"alpha": 3})),
    Composite("torch.div torch.divide Tensor.div Tensor.divide", 2, _div,
              ({}, {"rounding_mode": "floor"}, {"rounding_mode": "trunc"})),
    Composite("torch.round Tensor.round torch.special.round", 1, _round, ({}, {"decimals": 2}, {"decimals": -1})),
    Composite("torch.clamp torch.clip Tensor.clamp Tensor.clip", 1, _clamp,
              ({"min": -0.5}, {"max": 2}, {"min": -1, "max": 0.5})),
    Composite("torch.addcmul Tensor.addcmul", 3,
              lambda x, a, b, *, value=1: x + (a * b if value == 1 else _option(value, x, a, b) * a * b),
              ({}, {"value": 0.5})),
    Composite("torch.addcdiv Tensor.addcdiv", 3, lambda x, a, b, *, value=1: x + _scaled(a / b, value),
              ({}, {"value": 0.5})),
    Composite("torch.square Tensor.square", 1, _square),
    Composite("torch.reciprocal Tensor.reciprocal", 1, lambda x: 1 / x),
    Composite("torch.frac Tensor.frac", 1, lambda x: x - _op("trunc", x)),
    Composite("torch.positive Tensor.positive", 1, lambda x: x),
    Composite("torch.ldexp Tensor.ldexp", 2, lambda x, e: x * (2.0 ** e)),
    Composite("torch.lerp Tensor.lerp", 3, _lerp),
    Composite("torch.gcd Tensor.gcd", 2, _gcd),
    Composite("torch.logical_and Tensor.logical_and", 2, _logical("and")),
    Composite("torch.logical_or Tensor.logical_or", 2, _logical("or")),
    Composite("torch.logical_xor Tensor.logical_xor", 2, _logical("xor")),
    Composite("torch.logical_not Tensor.logical_not", 1, lambda x: ~_bool(x)),
    Composite("Tensor.where", 3, lambda x, condition, other: _where(condition, x, other)),
    # masked_fill keeps x's dtype, as torch's does.
    Composite("torch.masked_fill Tensor.masked_fill", 2,
              lambda x, mask, value: cast_proxy(_where(mask, value, x), x.node.dtype), ({"value": -math.inf}, {"value": 2})),
    # activations
    Composite("torch.relu Tensor.relu F.relu", 1, _relu),
    Composite("F.relu6", 1, lambda x, inplace=False: _hardtanh(x, 0.0, 6.0, inplace)),
    Composite("F.hardtanh", 1, _hardtanh, ({}, {"min_val": -0.5, "max_val": 2.0})),
    Composite("F.gelu", 1, _gelu, ({}, {"approximate": "tanh"})),
    Composite("F.silu", 1, _silu),
    Composite("F.mish", 1, _mish),
    Composite("F.softplus", 1, _softplus, ({}, {"beta": 2.0, "threshold": 3.0})),
    Composite("F.elu", 1, _elu, ({}, {"alpha": 0.7})),
    Composite("torch.selu F.selu", 1, _selu),
    Composite("torch.celu F.celu", 1, _celu, ({}, {"alpha": 1.5})),
    Composite("F.leaky_relu", 1, _leaky_relu, ({}, {"negative_slope": 0.2})),
    Composite("F.logsigmoid", 1, lambda x: _op("min", x, 0) - _op("log1p", _op("exp", -_op("abs", x)))),
    Composite("F.softsign", 1, lambda x: x / (1 + _op("abs", x))),
    Composite("F.tanhshrink", 1, lambda x: x - _op("tanh", x)),
    Composite("F.hardsigmoid", 1, _hardsigmoid),
    Composite("F.hardswish", 1, _hardswish),
    Composite("F.hardshrink Tensor.hardshrink", 1,
              lambda x, lambd=0.5: _where((x >= -lambd) & (x <= lambd), 0, x), ({}, {"lambd": 1.0})),
    Composite("F.softshrink", 1,
              lambda x, lambd=0.5: _where(x > lambd, x - lambd, _where(x < -lambd, x + lambd, x * 0)),
              ({}, {"lambd": 1.0})),
    Composite("torch.threshold F.threshold", 1, _threshold, ({"threshold": 0.5, "value": 2.0},)),
    # predicates and clean-up
    Composite("torch.isinf Tensor.isinf", 1, lambda x: _op("abs", x) == math.inf),
    Composite("torch.isposinf Tensor.isposinf", 1, lambda x: x == math.inf),
    Composite("torch.isneginf Tensor.isneginf", 1, lambda x: x == -math.inf),
    Composite("torch.isfinite Tensor.isfinite", 1, lambda x: _op("abs", x) < math.inf),
    Composite("torch.signbit Tensor.signbit", 1, lambda x: _op("copysign", 1.0, x) < 0),
    Composite("torch.nan_to_num Tensor.nan_to_num", 1, _nan_to_num,
              ({}, {"nan": 1.0, "posinf": 5.0, "neginf": -5.0})),
    Composite("torch.fmax Tensor.fmax", 2, _nan_ignoring("max")),
    Composite("torch.fmin Tensor.fmin", 2, _nan_ignoring("min")),
    Composite("torch.heaviside Tensor.heaviside", 2,
              lambda x, values: cast_proxy(_where(x > 0, 1, _where(x == 0, values, 0)), promoted_dtype([x, values]))),
    # special functions
    Composite("torch.logaddexp Tensor.logaddexp", 2, _logaddexp("exp", 1)),
    Composite("torch.logaddexp2 Tensor.logaddexp2", 2, _logaddexp("exp2", 1 / math.log(2))),
    Composite("torch.xlogy Tensor.xlogy torch.special.xlogy", 2, _xlogy("log")),
    Composite("torch.special.xlog1py", 2, _xlogy("log1p")),
    Composite("torch.sinc Tensor.sinc torch.special.sinc", 1, _sinc),
    Composite("torch.deg2rad Tensor.deg2rad", 1, lambda x: x * (math.pi / 180)),
    Composite("torch.rad2deg Tensor.rad2deg", 1, lambda x: x * (180 / math.pi)),
    Composite("torch.logit Tensor.logit torch.special.logit", 1, _logit, ({}, {"eps": 1e-3})),
    Composite("torch.special.ndtr", 1, lambda x: (1 + _op("erf", x * _SQRT1_2)) * 0.5),
    Composite("torch.special.entr", 1, _entr),
)
