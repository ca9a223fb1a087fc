"""The sympy bridge: an IR graph as a sympy expression, for reading a mask as math."""

from __future__ import annotations

import sympy

from flexattn.ir import SPECS, DType, Graph, Op
from flexattn.ops import variant


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
            if node.dtype is DType.BOOL:  # a truth value, so that & | ~ and Piecewise take it
                value = sympy.Eq(value, True)
        elif node.op is Op.CAST:
            value = _cast(ins[0], node.inputs[0].dtype, node.dtype)
        else:
            value = _op_form(node, ins)
        values[node] = value
    return values[graph.output]


def _op_form(node, ins: list) -> sympy.Basic:
    """A table op as sympy: its ``OpDef.sympy`` form, or an opaque function named after it."""
    form = variant(SPECS[node.op].sympy, node.inputs[-1].dtype.kind)
    if form is not None:
        try:
            return getattr(sympy, form)(*ins) if isinstance(form, str) else form(sympy, *ins)
        except (TypeError, AttributeError, ValueError, ArithmeticError):  # sympy refuses these operands
            pass  # (bools compared, a remainder by a bool that may be 0): the opaque form stands
    return sympy.Function(node.op.value)(*ins)


def _cast(value, source: DType, target: DType):
    """A cast between truth values and numbers (int and float casts keep the value)."""
    if source is DType.BOOL and target is not DType.BOOL:
        return sympy.Piecewise((1, value), (0, True))
    if target is DType.BOOL and source is not DType.BOOL:
        return sympy.Ne(value, 0)
    return value
