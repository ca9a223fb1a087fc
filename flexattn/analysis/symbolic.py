"""The sympy bridge: an IR graph as a sympy expression, for reading a mask as math."""

from __future__ import annotations

import sympy

from flexattn.ir import DType, Graph, Op

_BINARY = {
    Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b,
    Op.TRUEDIV: lambda a, b: a / b, Op.FLOORDIV: lambda a, b: sympy.floor(a / b), Op.MOD: sympy.Mod,
    Op.POW: lambda a, b: a ** b, Op.MIN: sympy.Min, Op.MAX: sympy.Max,
    Op.LT: sympy.Lt, Op.LE: sympy.Le, Op.GT: sympy.Gt, Op.GE: sympy.Ge, Op.EQ: sympy.Eq, Op.NE: sympy.Ne,
}
_BOOLEAN = {Op.AND: sympy.And, Op.OR: sympy.Or, Op.XOR: sympy.Xor}
_UNARY = {Op.NEG: lambda x: -x, Op.ABS: sympy.Abs, Op.EXP: sympy.exp, Op.LOG: sympy.log, Op.SQRT: sympy.sqrt,
          Op.TANH: sympy.tanh, Op.SIN: sympy.sin, Op.COS: sympy.cos, Op.SIGN: sympy.sign,
          Op.FLOOR: sympy.floor, Op.CEIL: sympy.ceiling}


def to_sympy(graph: Graph) -> sympy.Basic:
    """The graph's output as a sympy expression (buffers become functions: ``doc(q_idx)``).

    Example::

        >>> to_sympy(trace_mask_mod(lambda b, h, q, kv: (q >= kv) & (q - kv <= 8)).graph)
        (q_idx >= kv_idx) & (-kv_idx + q_idx <= 8)
    """
    values: dict = {}
    for node in graph.nodes:
        ins = [values[i] for i in node.inputs]
        if node.op is Op.INPUT:
            value = sympy.Symbol(node.arg, integer=node.arg != "score", real=True)
        elif node.op is Op.CONST:
            value = sympy.sympify(node.arg)
        elif node.op is Op.BUFFER:
            value = sympy.Function(graph.buffers[node.arg].name)
        elif node.op is Op.LOAD:
            value = ins[0](*ins[1:]) if len(ins) > 1 else sympy.Symbol(str(ins[0]))
        elif node.op in _BOOLEAN and node.dtype is DType.BOOL:
            value = _BOOLEAN[node.op](*ins)
        elif node.op is Op.NOT and node.dtype is DType.BOOL:
            value = sympy.Not(ins[0])
        elif node.op is Op.WHERE:
            value = sympy.Piecewise((ins[1], ins[0]), (ins[2], True))
        elif node.op is Op.CAST:
            value = ins[0]
        elif node.op in _BINARY:
            value = _BINARY[node.op](*ins)
        elif node.op in _UNARY:
            value = _UNARY[node.op](ins[0])
        else:  # bit operations and the rest keep their IR name
            value = sympy.Function(node.op.value)(*ins)
        values[node] = value
    return values[graph.output]
