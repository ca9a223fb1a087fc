"""Separable score biases: ``score_mod(score, b, h, q, kv) == score + Σ row(b, h, q) * column(b, h, kv)``.

ALiBi is ``score + slope[h] * (kv - q)`` = ``score + slope[h] * kv - slope[h] * q``:
one product of a row factor (``slope[h]``) and a column factor (``kv``), and one
term of the row alone. A row-only term adds a constant to every score of a query
row, so it changes no softmax weight, only the row's log-sum-exp; a product term
is a dot product, so a back end can append the row factors to the queries and the
column factors to the keys as extra head-dim features and run plain attention.

``separate(graph)`` expands the bias through ``+``, ``-``, unary ``-``, ``*`` and
int-to-float casts; it returns None for any other shape of score_mod.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from flexattn.ir import DType, Graph, Node, Op
from flexattn.passes import dependencies
from flexattn.semantics import evaluate

MAX_PRODUCTS = 8  # more row x column products than this are not worth extra head dims


@dataclass(frozen=True)
class Term:
    """``sign * Π rows * Π columns``: rows depend on (b, h, q_idx) at most, columns on (b, h, kv_idx)."""

    sign: int
    rows: tuple[Node, ...]
    columns: tuple[Node, ...]


@dataclass(frozen=True)
class SeparableBias:
    """The bias of a score_mod as a sum of terms (see the module docstring)."""

    graph: Graph
    terms: tuple[Term, ...]

    @property
    def products(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.columns)

    def factor(self, nodes: tuple[Node, ...], env: dict, buffers) -> torch.Tensor:
        """The product of ``nodes`` evaluated on ``env`` (float64; 1 for no nodes)."""
        value = torch.ones((), dtype=torch.float64)
        for node in nodes:
            value = value * evaluate(replace(self.graph, output=node), env, buffers).to(torch.float64)
        return value

    def row_only(self, env: dict, buffers) -> torch.Tensor:
        """Σ of the terms without columns on ``env`` (b, h, q_idx): a shift of each row's lse."""
        total = torch.zeros((), dtype=torch.float64)
        for term in self.terms:
            if not term.columns:
                total = total + term.sign * self.factor(term.rows, env, buffers)
        return total


def separate(graph: Graph) -> SeparableBias | None:
    """The separable form of a score_mod graph, or None (see the module docstring)."""
    if graph.output.dtype is not DType.FLOAT32:
        return None
    terms = _bias_terms(graph.output, dependencies(graph))
    if terms is None or sum(1 for t in terms if t.columns) > MAX_PRODUCTS:
        return None
    return SeparableBias(graph, tuple(terms))


def _bias_terms(node: Node, deps: dict) -> list[Term] | None:
    """The terms of ``node - score`` for a node that is the score plus or minus terms (at any depth)."""
    if node.op is Op.INPUT and node.arg == "score":
        return []
    if node.op not in (Op.ADD, Op.SUB):
        return None
    a, b = node.inputs
    if node.op is Op.ADD and "score" in deps[b]:
        a, b = b, a
    if "score" in deps[b]:
        return None
    inner, rest = _bias_terms(a, deps), _terms(b, deps)
    if inner is None or rest is None:
        return None
    sign = 1 if node.op is Op.ADD else -1
    return inner + [Term(sign * t.sign, t.rows, t.columns) for t in rest]


def _terms(node: Node, deps: dict) -> list[Term] | None:
    used = deps[node]
    if "score" in used:
        return None
    if "kv_idx" not in used:
        return [Term(1, (node,), ())]
    if "q_idx" not in used:
        return [Term(1, (), (node,))]
    if node.op is Op.CAST and node.dtype is DType.FLOAT32 and node.inputs[0].dtype is not DType.BOOL:
        return _terms(node.inputs[0], deps)  # exact for the integer index arithmetic masks use
    if node.op is Op.NEG:
        inner = _terms(node.inputs[0], deps)
        return None if inner is None else [Term(-t.sign, t.rows, t.columns) for t in inner]
    if node.op in (Op.ADD, Op.SUB, Op.MUL):
        left, right = (_terms(i, deps) for i in node.inputs)
        if left is None or right is None:
            return None
        if node.op is Op.MUL:
            return [Term(a.sign * b.sign, a.rows + b.rows, a.columns + b.columns) for a in left for b in right]
        flip = 1 if node.op is Op.ADD else -1
        return left + [Term(flip * t.sign, t.rows, t.columns) for t in right]
    return None
