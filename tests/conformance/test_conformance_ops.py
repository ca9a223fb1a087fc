"""Op coverage: each torch elementwise op or tensor method a mod may call, against torch.

One small score_mod per op (the op applied to a bounded function of the score, or to the
indices), run through flexattn and torch's eager flex_attention; the differentiable ones
also have their gradients checked against the float64 reference. Arguments are kept in each
op's domain (asin in (-1, 1), log of positive numbers) so NaN never enters the comparison.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conformance_helpers import Case, assert_forward_matches_torch, assert_gradients_match_reference, qkv


def bounded(score):
    return torch.tanh(score) * 0.9


def positive(score):
    return torch.abs(score) + 0.5


# name -> (op, argument): score_mod = score + op(argument(score))
UNARY = {
    "relu": (torch.relu, bounded), "erf": (torch.erf, bounded), "erfc": (torch.erfc, bounded),
    "atan": (torch.atan, bounded), "asin": (torch.asin, bounded), "acos": (torch.acos, bounded),
    "tan": (torch.tan, bounded), "sinh": (torch.sinh, bounded), "cosh": (torch.cosh, bounded),
    "asinh": (torch.asinh, bounded), "atanh": (torch.atanh, bounded), "expm1": (torch.expm1, bounded),
    "log1p": (torch.log1p, positive), "log10": (torch.log10, positive), "reciprocal": (torch.reciprocal, positive),
    "square": (torch.square, bounded), "trunc": (torch.trunc, bounded), "frac": (torch.frac, bounded),
    "ceil": (torch.ceil, bounded), "floor": (torch.floor, bounded), "round": (torch.round, bounded),
    "sign": (torch.sign, bounded), "sgn": (torch.sgn, bounded), "exp": (torch.exp, bounded),
    "exp2": (torch.exp2, bounded), "log": (torch.log, positive), "log2": (torch.log2, positive),
    "sqrt": (torch.sqrt, positive), "rsqrt": (torch.rsqrt, positive), "sigmoid": (torch.sigmoid, bounded),
    "tanh": (torch.tanh, bounded), "sin": (torch.sin, bounded), "cos": (torch.cos, bounded),
    "neg": (torch.neg, bounded), "abs": (torch.abs, bounded), "deg2rad": (torch.deg2rad, bounded),
    "softplus": (F.softplus, bounded), "gelu": (F.gelu, bounded), "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"),
                                                                               bounded),
    "silu": (F.silu, bounded), "elu": (F.elu, bounded), "leaky_relu": (F.leaky_relu, bounded),
    "hardtanh": (F.hardtanh, bounded), "logsigmoid": (F.logsigmoid, bounded), "mish": (F.mish, bounded),
    "softsign": (F.softsign, bounded), "tanh_method": (torch.Tensor.tanh, bounded),
    "clamp_min": (lambda x: x.clamp_min(-0.2), bounded), "clamp_max": (lambda x: x.clamp_max(0.3), bounded),
    "nan_to_num": (torch.nan_to_num, bounded), "pow_float": (lambda x: torch.pow(x, 2.5), positive),
    "float_pow_tensor": (lambda x: 2.0 ** x, bounded),
}

# name -> op(score, index_float): score_mod = score + op(bounded(score), kv_idx * 0.01 + 0.5)
BINARY = {
    "atan2": torch.atan2, "hypot": torch.hypot, "fmod": torch.fmod, "remainder": torch.remainder,
    "copysign": torch.copysign, "logaddexp": torch.logaddexp, "fmax": torch.fmax, "fmin": torch.fmin,
    "maximum": torch.maximum, "minimum": torch.minimum, "true_divide": torch.true_divide,
    # torch.lerp takes one dtype (the float64 reference's score against a float32 index term); pow a positive base.
    "xlogy": torch.xlogy, "lerp": lambda a, b: torch.lerp(a, b.to(a.dtype), 0.3),
    "addcmul": lambda a, b: torch.addcmul(a, a, b), "pow": lambda a, b: torch.pow(torch.abs(a) + 0.1, b), "sub_alpha": lambda a, b: torch.sub(a, b, alpha=2), "div_method": torch.Tensor.div,
}

# name -> score_mod using the index inputs (methods and integer ops)
INDEX_OPS = {
    "new_ones": lambda s, b, h, q, kv: s * h.new_ones(()),
    "new_zeros": lambda s, b, h, q, kv: s + q.new_zeros(()),
    "new_full": lambda s, b, h, q, kv: s + q.new_full((), 2),
    "new_tensor_scalar": lambda s, b, h, q, kv: s + kv.new_tensor(3) * 0.1,
    "to_float": lambda s, b, h, q, kv: s + q.to(torch.float32) * 0.01,
    "type_as": lambda s, b, h, q, kv: s + (q - kv).type_as(s) * 0.01,
    "div_floor": lambda s, b, h, q, kv: s + torch.div(q - kv, 3, rounding_mode="floor") * 0.01,
    "div_trunc": lambda s, b, h, q, kv: s + torch.div(q - kv, 3, rounding_mode="trunc") * 0.01,
    "fmod_int": lambda s, b, h, q, kv: s + torch.fmod(q - kv, 5) * 0.1,
    "bitwise_not": lambda s, b, h, q, kv: torch.where((~q & 3) == 0, s, s * 0.5),
    "logical_xor": lambda s, b, h, q, kv: torch.where(torch.logical_xor(q > 10, kv > 20), s, -s),
    "masked_fill": lambda s, b, h, q, kv: s.masked_fill(q < kv, float("-inf")),
    "where_scalar_other": lambda s, b, h, q, kv: torch.where(q >= kv, s, -math.inf),
    "full_like": lambda s, b, h, q, kv: s + torch.full_like(s, 0.25),
    "clone_detach": lambda s, b, h, q, kv: s.clone() + q.detach() * 0.01,
    "python_min_max": lambda s, b, h, q, kv: s + torch.clamp(q - kv, min=-3, max=5) * 0.1,
    "bool_arithmetic": lambda s, b, h, q, kv: s + (q > kv) * 0.5,
    "int_true_division": lambda s, b, h, q, kv: s + (q / 7) * 0.01,
    "gcd": lambda s, b, h, q, kv: s + torch.gcd(q, kv + 1) * 0.01,
    "unsqueeze_any": lambda s, b, h, q, kv: torch.where((q.unsqueeze(-1) == torch.tensor([1, 5, 9])).any(-1), -s, s),
}

DIFFERENTIABLE = ["relu", "erf", "atan", "asin", "tan", "sinh", "cosh", "expm1", "log1p", "reciprocal", "square",
                  "softplus", "gelu", "silu", "elu", "mish", "exp", "log", "sqrt", "sigmoid", "pow_float",
                  "atan2", "hypot", "logaddexp", "xlogy", "lerp", "addcmul"]


def unary_mod(name):
    op, argument = UNARY[name]
    return lambda score, b, h, q_idx, kv_idx: score + op(argument(score))


def binary_mod(name):
    op = BINARY[name]
    return lambda score, b, h, q_idx, kv_idx: score + op(bounded(score), kv_idx * 0.01 + 0.5)


def mod_of(name):
    if name in UNARY:
        return unary_mod(name)
    return binary_mod(name) if name in BINARY else INDEX_OPS[name]


@pytest.mark.parametrize("name", [*UNARY, *BINARY, *INDEX_OPS])
def test_op_forward(name):
    q, k, v = qkv(1, 2, 48, 40, 8)
    assert_forward_matches_torch(q, k, v, mod_of(name), None, 1, 2, 16)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_op_gradients(name):
    assert_gradients_match_reference(Case(name, lambda: (mod_of(name), None), B=1, L=48, S=40, D=8, block=16))
