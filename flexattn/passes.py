"""Passes over the IR: each takes a Graph and returns a Graph (or facts about it).

* ``simplify``       -- folding, algebraic identities (``x + 0``, ``m & True``,
  ``~~m``, ``where(c, a, a)``), common-subexpression elimination; dead code
  never survives because a graph only holds what its output reaches.
* ``dependencies``   -- which of score/b/h/q_idx/kv_idx each node reads.
"""

from __future__ import annotations

from dataclasses import replace

from flexattn.ir import DType, Graph, Node, Op
from flexattn.semantics import apply_op

_LEAVES = (Op.INPUT, Op.CONST, Op.BUFFER)


def _python_value(tensor, dtype: DType):
    value = tensor.item()
    if dtype is DType.BOOL:
        return bool(value)
    if dtype.is_int:
        return int(value)
    return float(value)


def _is_const(node: Node, value) -> bool:
    return node.op is Op.CONST and type(node.arg) is type(value) and node.arg == value


def _fold(node: Node) -> Node:
    if node.op in _LEAVES or node.op is Op.LOAD or not node.inputs:
        return node
    if all(i.op is Op.CONST for i in node.inputs):
        value = apply_op(node.op, node.dtype, [i.arg for i in node.inputs], node.arg)
        return Node(Op.CONST, node.dtype, (), _python_value(value, node.dtype))
    return node


def _identity(node: Node) -> Node:
    """Algebraic identities that hold for every value, NaN and inf included."""
    op, ins = node.op, node.inputs
    if op is Op.CAST and ins[0].dtype is node.dtype:
        return ins[0]
    if op is Op.NOT and ins[0].op is Op.NOT:
        return ins[0].inputs[0]
    if op is Op.WHERE:
        cond, a, b = ins
        if cond.op is Op.CONST:
            return a if cond.arg else b
        if a is b:
            return a
        return node
    if len(ins) != 2:
        return node
    a, b = ins
    same_dtype = lambda x: x if x.dtype is node.dtype else node  # noqa: E731
    if op is Op.ADD and (_is_const(b, 0) or _is_const(b, 0.0)):
        return same_dtype(a)
    if op is Op.ADD and (_is_const(a, 0) or _is_const(a, 0.0)):
        return same_dtype(b)
    if op is Op.SUB and (_is_const(b, 0) or _is_const(b, 0.0)):
        return same_dtype(a)
    if op is Op.MUL and (_is_const(b, 1) or _is_const(b, 1.0)):
        return same_dtype(a)
    if op is Op.MUL and (_is_const(a, 1) or _is_const(a, 1.0)):
        return same_dtype(b)
    if op is Op.TRUEDIV and _is_const(b, 1.0):
        return same_dtype(a)
    if node.dtype is DType.BOOL and op in (Op.AND, Op.OR):
        absorbing, neutral = (False, True) if op is Op.AND else (True, False)
        for x, y in ((a, b), (b, a)):
            if _is_const(x, neutral):
                return y
            if _is_const(x, absorbing):
                return x
        if a is b:
            return a
    return node


def rewrite(graph: Graph, rule) -> Graph:
    """Rebuild ``graph`` bottom-up, replacing each node by ``rule(node)``.

    ``rule`` sees the node with its inputs already rewritten.
    """
    new: dict[Node, Node] = {}
    for node in graph.nodes:
        ins = tuple(new[i] for i in node.inputs)
        candidate = node if all(x is y for x, y in zip(ins, node.inputs)) else replace(node, inputs=ins)
        new[node] = rule(candidate)
    return replace(graph, output=new[graph.output])


def eliminate_common_subexpressions(graph: Graph) -> Graph:
    table: dict[tuple, Node] = {}

    def rule(node: Node) -> Node:
        arg = node.arg
        key = (node.op, node.dtype, type(arg).__name__, repr(arg), tuple(id(i) for i in node.inputs))
        return table.setdefault(key, node)

    return rewrite(graph, rule)


def simplify(graph: Graph) -> Graph:
    """Fold constants, apply identities, and share common subexpressions."""
    graph = rewrite(graph, lambda n: _identity(_fold(n)))
    return eliminate_common_subexpressions(graph)


def dependencies(graph: Graph) -> dict[Node, frozenset[str]]:
    """For each node, the set of inputs (score/b/h/q_idx/kv_idx) it depends on."""
    deps: dict[Node, frozenset[str]] = {}
    for node in graph.nodes:
        if node.op is Op.INPUT:
            deps[node] = frozenset({node.arg})
        else:
            deps[node] = frozenset().union(*(deps[i] for i in node.inputs))
    return deps


def depends_on(graph: Graph) -> frozenset[str]:
    """The inputs the graph's output depends on, e.g. ``{"q_idx", "kv_idx"}``."""
    return dependencies(graph)[graph.output]
