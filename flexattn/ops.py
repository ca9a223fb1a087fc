"""The op table: every elementwise IR op, defined once.

An ``OpDef`` holds everything flexattn knows about one op: its torch
spellings, arity, dtype rule, what it computes, its interval rule, its torch
and Triton code, its Triton forward-mode derivative and its sympy form.
``ir.Op`` and every per-op table (the tracer's torch functions,
``semantics.apply_op``, both printers, the interval analysis, the sympy
bridge, the op tests) are derived from ``OPS``: adding an op is adding one
entry here. Torch functions that are exact compositions of these ops (gelu,
softplus, lerp, ...) are not IR ops; ``flexattn.composites`` lowers them.

Templates fill ``{0}``, ``{1}``, ``{2}`` with the operands' names. A field
may instead map an operand kind (``"bool"``, ``"int"``, ``"float"``: the kind
of the op's last operand, after promotion) to a template; a bool operand
without an entry uses the ``"int"`` one, and a kind without either has no
template (the back end raises ``LoweringError``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

# One derivative term per operand, summed over the operands that have a tangent.
Terms = tuple[str, ...]


@dataclass(frozen=True)
class OpDef:
    """One elementwise op of the IR.

    * ``name``: the IR name; ``ir.Op`` has the member ``name.upper()``.
    * ``fn``: what the op computes, on tensors of the IR operand dtypes.
    * ``spell``: torch spellings, ``"torch.X"`` (``torch.special.X`` too),
      ``"F.X"`` (``torch.nn.functional``) and ``"Tensor.X"`` (a method).
    * ``operators``: Python operator stems: ``"add"`` is ``__add__``, plus
      ``__radd__`` for a binary op that does not return a bool.
    * ``promote``: ``"common"`` (operands take torch's common dtype),
      ``"float"`` (then ints and bools become float32) or ``"select"`` (the
      first operand is a bool condition, the others take their common dtype).
    * ``bools``: what bool operands do: ``"keep"``, ``"int64"`` (computed as
      int64), or the name of the op that computes it on bools (add is or).
    * ``rejects``: operand kind -> the ``TraceError`` message refusing it.
    * ``result``: ``"operand"`` (the promoted operand dtype) or ``"bool"``.
    * ``interval``: the rule's name in ``analysis.intervals.RULES``; None:
      the analysis knows nothing (every value is possible).
    * ``torch``: the torch printer's template; ``{t0}`` is operand 0 as a
      tensor (a constant is a Python scalar in ``{0}``).
    * ``triton``: the Triton printer's template; ``{dtype}`` is the result's
      ``tl`` dtype. Operands of a ``"float"`` op are float32 views.
    * ``derivative``: Triton forward mode. A template over the operands'
      tangents ``{da}``, ``{db}``, ``{dc}`` (``0.0`` where absent), their
      float32 views ``{a}``, ``{b}``, ``{c}`` and the value ``{v}``; or one
      term per operand (``Terms``), summed over the operands with a tangent,
      so a zero tangent never multiplies an inf. None: no derivative (a
      ``LoweringError`` only when one is needed).
    * ``sympy``: a sympy function name, or ``f(sympy, *operands)``; None: an
      opaque function named after the op.
    * ``int_domain``: where the op is defined on integers (for the tests):
      ``""`` everywhere, ``"divisor"`` (operand 1 nonzero), ``"exponent"``
      (operand 1 >= 0), ``"shift"`` (operand 1 in [0, 63)).
    """

    name: str
    arity: int
    fn: Callable
    torch: str | Mapping[str, str]
    triton: str | Mapping[str, str]
    spell: str = ""
    operators: tuple[str, ...] = ()
    promote: str = "common"
    bools: str = "keep"
    rejects: Mapping[str, str] = field(default_factory=dict)
    result: str = "operand"
    interval: str | None = None
    derivative: str | Terms | None = None
    sympy: Any = None
    int_domain: str = ""

    @property
    def spellings(self) -> tuple[str, ...]:
        return tuple(self.spell.split())


def variant(value, kind: str):
    """The entry of a per-kind field (see the module docstring) for operands of ``kind``."""
    if not isinstance(value, Mapping):
        return value
    return value.get(kind, value.get("int") if kind == "bool" else None)


def _not(x):
    return torch.logical_not(x) if x.dtype == torch.bool else torch.bitwise_not(x)


def _math(name: str, triton: str, derivative: str, sympy=None, also: str = "") -> OpDef:
    """A float function of one operand spelled ``torch.X`` and ``Tensor.X`` (ints become float32)."""
    return OpDef(name, 1, getattr(torch, name), f"torch.{name}({{t0}})", triton, f"torch.{name} Tensor.{name} {also}",
                 promote="float", derivative=derivative, sympy=sympy or name)


def _compare(name: str, symbol: str, spell: str, sympy: str) -> OpDef:
    return OpDef(name, 2, getattr(torch, name), f"{{0}} {symbol} {{1}}", f"{{0}} {symbol} {{1}}", spell,
                 operators=(name,), result="bool", interval="compare", sympy=sympy)


def _bitwise(name: str, symbol: str, fn, spell: str, **fields) -> OpDef:
    return OpDef(name, 2, fn, f"{{0}} {symbol} {{1}}", f"{{0}} {symbol} {{1}}", spell, operators=(name,),
                 rejects={"float": f"bitwise '{name}' on a float value; use it on bools (masks) or ints only."},
                 **fields)


_TWO_OVER_SQRT_PI = "1.1283791670955126"
_SIGN = "(({0} > 0).to({dtype}) - ({0} < 0).to({dtype}))"
_ATAN2_NORM = "({a} * {a} + {b} * {b})"


def _float_floor_division() -> tuple[str, str]:
    """Triton forms of torch's float ``remainder`` and ``floor_divide`` kernels, from C's fmod (``%``).

    floor(a / b) would round 1.0 // 0.1 up to 10 (torch: 9) and give -inf // 2 = -inf (torch: nan).
    """
    fmod = "({0} % {1})"
    wrong_sign = "((" + fmod + " != 0) & ((" + fmod + " < 0) != ({1} < 0)))"
    remainder = "tl.where(" + wrong_sign + ", " + fmod + " + {1}, " + fmod + ")"
    exact = "(({0} - " + fmod + ") / {1})"
    quotient = "tl.where(" + wrong_sign + ", " + exact + " - 1.0, " + exact + ")"
    floor = "tl.floor(" + quotient + ")"
    rounded = "tl.where(" + quotient + " - " + floor + " > 0.5, " + floor + " + 1.0, " + floor + ")"
    signed = "tl.where(" + quotient + " != 0, " + rounded + ", 0.0 * ({0} / {1}))"
    return remainder, "tl.where({1} == 0, {0} / {1}, " + signed + ")"


_REMAINDER, _FLOOR_DIVIDE = _float_floor_division()

OPS: tuple[OpDef, ...] = (
    # ----- unary -------------------------------------------------------------
    OpDef("neg", 1, torch.neg, "-{t0}", "-{0}", "torch.neg torch.negative Tensor.neg Tensor.negative",
          operators=("neg",), rejects={"bool": "negating a bool; use ~ for logical not."}, interval="neg",
          derivative="-{da}", sympy=lambda s, x: -x),
    OpDef("abs", 1, torch.abs, "torch.abs({t0})", "tl.abs({0})", "torch.abs torch.absolute Tensor.abs Tensor.absolute",
          operators=("abs",), bools="int64", interval="abs", derivative="tl.where({a} < 0, -{da}, {da})", sympy="Abs"),
    OpDef("not", 1, _not, {"bool": "torch.logical_not({t0})", "int": "torch.bitwise_not({t0})"},
          {"bool": "({0} == 0)", "int": "~{0}"}, "torch.bitwise_not Tensor.bitwise_not", operators=("invert",),
          rejects={"float": "bitwise not (~) on a float value; use it on bools (masks) or ints only."},
          interval="logic", sympy={"bool": "Not"}),
    _math("exp", "tl.exp({0})", "{da} * {v}"),
    _math("exp2", "tl.exp2({0})", "{da} * {v} * 0.6931471805599453", lambda s, x: 2 ** x, "torch.special.exp2"),
    _math("expm1", "libdevice.expm1({0})", "{da} * ({v} + 1.0)", lambda s, x: s.exp(x) - 1, "torch.special.expm1"),
    _math("log", "tl.log({0})", "{da} / {a}"),
    _math("log2", "tl.log2({0})", "{da} / ({a} * 0.6931471805599453)", lambda s, x: s.log(x, 2)),
    _math("log10", "libdevice.log10({0})", "{da} / ({a} * 2.302585092994046)", lambda s, x: s.log(x, 10)),
    _math("log1p", "libdevice.log1p({0})", "{da} / (1.0 + {a})", lambda s, x: s.log(1 + x), "torch.special.log1p"),
    _math("sqrt", "tl.sqrt_rn({0})", "{da} * 0.5 / {v}"),
    _math("rsqrt", "tl.rsqrt({0})", "-0.5 * {da} * {v} / {a}", lambda s, x: 1 / s.sqrt(x)),
    _math("sin", "tl.sin({0})", "{da} * tl.cos({a})"),
    _math("cos", "tl.cos({0})", "-{da} * tl.sin({a})"),
    _math("tan", "libdevice.tan({0})", "{da} * (1.0 + {v} * {v})"),
    _math("asin", "libdevice.asin({0})", "{da} / tl.sqrt(1.0 - {a} * {a})", also="torch.arcsin Tensor.arcsin"),
    _math("acos", "libdevice.acos({0})", "-{da} / tl.sqrt(1.0 - {a} * {a})", also="torch.arccos Tensor.arccos"),
    _math("atan", "libdevice.atan({0})", "{da} / (1.0 + {a} * {a})", also="torch.arctan Tensor.arctan"),
    _math("sinh", "libdevice.sinh({0})", "{da} * libdevice.cosh({a})"),
    _math("cosh", "libdevice.cosh({0})", "{da} * libdevice.sinh({a})"),
    _math("tanh", "_tanh({0})", "{da} * (1.0 - {v} * {v})", also="F.tanh"),
    _math("asinh", "libdevice.asinh({0})", "{da} / tl.sqrt({a} * {a} + 1.0)", also="torch.arcsinh Tensor.arcsinh"),
    _math("acosh", "libdevice.acosh({0})", "{da} / tl.sqrt({a} * {a} - 1.0)", also="torch.arccosh Tensor.arccosh"),
    _math("atanh", "libdevice.atanh({0})", "{da} / (1.0 - {a} * {a})", also="torch.arctanh Tensor.arctanh"),
    _math("sigmoid", "tl.sigmoid({0})", "{da} * {v} * (1.0 - {v})", lambda s, x: 1 / (1 + s.exp(-x)),
          "F.sigmoid torch.special.expit"),
    _math("erf", "tl.erf({0})", f"{{da}} * {_TWO_OVER_SQRT_PI} * tl.exp(-{{a}} * {{a}})", also="torch.special.erf"),
    _math("erfc", "libdevice.erfc({0})", f"-{{da}} * {_TWO_OVER_SQRT_PI} * tl.exp(-{{a}} * {{a}})",
          also="torch.special.erfc"),
    _math("erfinv", "libdevice.erfinv({0})", "{da} * 0.886226925452758 * tl.exp({v} * {v})",
          also="torch.special.erfinv"),
    OpDef("sign", 1, torch.sign, "torch.sign({t0})", _SIGN, "torch.sign torch.sgn Tensor.sign Tensor.sgn",
          interval="sign", derivative="0.0", sympy="sign"),
    OpDef("floor", 1, torch.floor, "torch.floor({t0})", {"float": "tl.floor({0})", "int": "{0}"},
          "torch.floor Tensor.floor", bools="int64", interval="identity", derivative="0.0", sympy="floor"),
    OpDef("ceil", 1, torch.ceil, "torch.ceil({t0})", {"float": "tl.ceil({0})", "int": "{0}"},
          "torch.ceil Tensor.ceil", bools="int64", interval="identity", derivative="0.0", sympy="ceiling"),
    # Spelled by flexattn.composites, which also takes torch.round's ``decimals``.
    OpDef("round", 1, torch.round, "torch.round({t0})", {"float": "libdevice.rint({0})", "int": "{0}"},
          bools="int64", interval="identity", derivative="0.0"),
    OpDef("trunc", 1, torch.trunc, "torch.trunc({t0})", {"float": "libdevice.trunc({0})", "int": "{0}"},
          "torch.trunc torch.fix Tensor.trunc Tensor.fix", bools="int64", interval="identity", derivative="0.0",
          sympy=lambda s, x: s.sign(x) * s.floor(s.Abs(x))),
    OpDef("isnan", 1, torch.isnan, "torch.isnan({t0})", "({0} != {0})", "torch.isnan Tensor.isnan", result="bool"),
    # ----- binary (torch.add/sub/div and their alpha/rounding_mode are composites) --------
    OpDef("add", 2, torch.add, "{0} + {1}", "{0} + {1}", operators=("add",), bools="or", interval="add",
          derivative=("{da}", "{db}"), sympy=lambda s, a, b: a + b),
    OpDef("sub", 2, torch.sub, "{0} - {1}", "{0} - {1}", operators=("sub",), interval="sub",
          rejects={"bool": "subtracting bools; use ^ (xor) or logical_xor, or cast with .long() first."},
          derivative=("{da}", "-{db}"), sympy=lambda s, a, b: a - b),
    OpDef("mul", 2, torch.mul, "{0} * {1}", "{0} * {1}", "torch.mul torch.multiply Tensor.mul Tensor.multiply",
          operators=("mul",), bools="and", interval="mul", derivative=("{da} * {b}", "{a} * {db}"),
          sympy=lambda s, a, b: a * b),
    OpDef("truediv", 2, torch.true_divide, "{0} / {1}", "{0} / {1}", "torch.true_divide Tensor.true_divide",
          operators=("truediv", "div"), promote="float", derivative=("{da} / {b}", "-{v} * {db} / {b}"),
          sympy=lambda s, a, b: a / b),
    OpDef("floordiv", 2, torch.floor_divide, "{0} // {1}",
          {"float": _FLOOR_DIVIDE, "int": "_floordiv_int({0}, {1})"},
          "torch.floor_divide Tensor.floor_divide", operators=("floordiv",), bools="int64", interval="floordiv",
          derivative="0.0", sympy=lambda s, a, b: s.floor(a / b), int_domain="divisor"),
    OpDef("mod", 2, torch.remainder, "{0} % {1}", {"float": _REMAINDER, "int": "_mod_int({0}, {1})"},
          "torch.remainder Tensor.remainder", operators=("mod",), bools="int64", interval="mod",
          derivative=("{da}", "-{db} * tl.floor({a} / {b})"), sympy="Mod", int_domain="divisor"),
    # Triton's % is C's remainder (the sign of the dividend) on ints and floats: fmod.
    OpDef("fmod", 2, torch.fmod, "torch.fmod({t0}, {1})", "{0} % {1}", "torch.fmod Tensor.fmod", bools="int64",
          derivative=("{da}", "-{db} * libdevice.trunc({a} / {b})"), int_domain="divisor"),
    OpDef("pow", 2, torch.pow, "{0} ** {1}", {"float": "libdevice.pow({0}, {1})"}, "torch.pow Tensor.pow",
          operators=("pow",), bools="int64",
          # As torch's pow_backward: no term from a zero exponent, nor from a zero base.
          derivative=("tl.where({b} == 0.0, 0.0, {da} * {b} * libdevice.pow({a}, {b} - 1.0))",
                      "tl.where(({a} == 0.0) & ({b} >= 0.0), 0.0, {db} * {v} * tl.log({a}))"),
          sympy=lambda s, a, b: a ** b, int_domain="exponent"),
    OpDef("atan2", 2, torch.atan2, "torch.atan2({t0}, {t1})", "libdevice.atan2({0}, {1})",
          "torch.atan2 torch.arctan2 Tensor.atan2 Tensor.arctan2", promote="float",
          derivative=(f"{{da}} * {{b}} / {_ATAN2_NORM}", f"-{{db}} * {{a}} / {_ATAN2_NORM}"), sympy="atan2"),
    OpDef("hypot", 2, torch.hypot, "torch.hypot({t0}, {t1})", "libdevice.hypot({0}, {1})", "torch.hypot Tensor.hypot",
          promote="float", derivative=("{da} * {a} / {v}", "{db} * {b} / {v}"),
          sympy=lambda s, a, b: s.sqrt(a * a + b * b)),
    OpDef("copysign", 2, torch.copysign, "torch.copysign({t0}, {t1})", "libdevice.copysign({0}, {1})",
          "torch.copysign Tensor.copysign", promote="float",
          derivative=("tl.where({a} == 0.0, 0.0, {da} * {v} / {a})",), sympy=lambda s, a, b: s.Abs(a) * s.sign(b)),
    # Floats propagate NaN, as torch.minimum does (tl.minimum alone need not).
    OpDef("min", 2, torch.minimum, "torch.minimum({t0}, {t1})",
          {"float": "tl.minimum({0}, {1}, tl.PropagateNan.ALL)", "int": "tl.minimum({0}, {1})"},
          "torch.minimum torch.clamp_max Tensor.minimum Tensor.clamp_max", interval="min",
          derivative="tl.where({a} <= {b}, {da}, {db})", sympy="Min"),
    OpDef("max", 2, torch.maximum, "torch.maximum({t0}, {t1})",
          {"float": "tl.maximum({0}, {1}, tl.PropagateNan.ALL)", "int": "tl.maximum({0}, {1})"},
          "torch.maximum torch.clamp_min Tensor.maximum Tensor.clamp_min", interval="max",
          derivative="tl.where({a} >= {b}, {da}, {db})", sympy="Max"),
    _compare("lt", "<", "torch.lt torch.less Tensor.lt Tensor.less", "Lt"),
    _compare("le", "<=", "torch.le torch.less_equal Tensor.le Tensor.less_equal", "Le"),
    _compare("gt", ">", "torch.gt torch.greater Tensor.gt Tensor.greater", "Gt"),
    _compare("ge", ">=", "torch.ge torch.greater_equal Tensor.ge Tensor.greater_equal", "Ge"),
    _compare("eq", "==", "torch.eq Tensor.eq", "Eq"),
    _compare("ne", "!=", "torch.ne torch.not_equal Tensor.ne Tensor.not_equal", "Ne"),
    _bitwise("and", "&", torch.bitwise_and, "torch.bitwise_and Tensor.bitwise_and", interval="logic",
             sympy={"bool": "And"}),
    _bitwise("or", "|", torch.bitwise_or, "torch.bitwise_or Tensor.bitwise_or", interval="logic",
             sympy={"bool": "Or"}),
    _bitwise("xor", "^", torch.bitwise_xor, "torch.bitwise_xor Tensor.bitwise_xor", interval="logic",
             sympy={"bool": "Xor"}),
    _bitwise("lshift", "<<", torch.bitwise_left_shift, "torch.bitwise_left_shift Tensor.bitwise_left_shift",
             bools="int64", interval="shift", int_domain="shift"),
    _bitwise("rshift", ">>", torch.bitwise_right_shift, "torch.bitwise_right_shift Tensor.bitwise_right_shift",
             bools="int64", interval="shift", int_domain="shift"),
    # ----- ternary (Tensor.where takes its operands in another order: a composite) ---------
    OpDef("where", 3, torch.where, "torch.where({t0}, {1}, {2})", "tl.where({0}, {1}, {2})", "torch.where",
          promote="select", interval="where", derivative="tl.where({0}, {db}, {dc})",
          sympy=lambda s, c, a, b: s.Piecewise((a, c), (b, True))),
)

BY_NAME: dict[str, OpDef] = {op.name: op for op in OPS}
