"""The sympy bridge: an IR graph as a sympy expression, for reading a mask as math."""

from __future__ import annotations

import sympy

from flexattn.ir import SPECS, Graph, Op
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
        elif node.op is Op.CAST:
            value = ins[0]
        else:
            value = _op_form(node, ins)
        values[node] = value
    return values[graph.output]


def _op_form(node, ins: list) -> sympy.Basic:
    """A table op as sympy: its ``OpDef.sympy`` form, or an opaque function named after it."""
    form = variant(SPECS[node.op].sympy, node.inputs[-1].dtype.kind)
    if form is None:
        return sympy.Function(node.op.value)(*ins)
    return getattr(sympy, form)(*ins) if isinstance(form, str) else form(sympy, *ins)
