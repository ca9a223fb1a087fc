"""The flexattn IR: one frozen node type, an op enum, a graph, a printer.

A traced mod is a DAG of ``Node``s in SSA form. Each node is
``(op, dtype, inputs, arg)``:

* ``INPUT``  -- arg is one of ``score``, ``b``, ``h``, ``q_idx``, ``kv_idx``.
* ``CONST``  -- arg is a Python ``bool``/``int``/``float``.
* ``BUFFER`` -- arg is the buffer's position in ``Graph.buffers``; the node
  stands for a captured tensor (a runtime argument, never a constant).
* ``LOAD``   -- inputs are ``(buffer, index_0, ..., index_{ndim-1})``; reads
  one element. Back ends clamp every index into the buffer's bounds, so a
  load at a masked or padded position can never read out of bounds.
* ``CAST``   -- arg is the target ``DType``.
* everything else is an elementwise op on its inputs with torch semantics,
  defined by its entry in ``flexattn.ops.OPS`` (``SPECS[op]``): ``FLOORDIV``
  and ``MOD`` follow Python's sign rules, like ``torch.remainder``.

Index inputs (``b``, ``h``, ``q_idx``, ``kv_idx``) are int64 and ``score`` is
float32 ("the compute float": back ends may compute it in float64 when the
inputs are float64). Nodes compare by identity; ``Graph.nodes`` lists them in
topological order and ``structural_key`` hashes structure, not identity.

This module imports neither the API nor any back end.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

from flexattn.ops import OPS, OpDef


class DType(enum.Enum):
    BOOL = "bool"
    INT32 = "int32"
    INT64 = "int64"
    FLOAT32 = "float32"

    @property
    def is_float(self) -> bool:
        return self is DType.FLOAT32

    @property
    def is_int(self) -> bool:
        return self in (DType.INT32, DType.INT64)

    @property
    def kind(self) -> str:
        """``"bool"``, ``"int"`` or ``"float"``: the key of the op table's per-kind entries."""
        return "float" if self.is_float else "int" if self.is_int else "bool"


# Ops that are not elementwise functions of their inputs, and CAST (its target is an argument).
STRUCTURAL_OPS = ("input", "const", "buffer", "load", "cast")

Op = enum.Enum("Op", [(name.upper(), name) for name in STRUCTURAL_OPS + tuple(op.name for op in OPS)])
Op.__doc__ = "An IR op: the structural ones, then one member per entry of ``flexattn.ops.OPS``."

# The table entry of each elementwise op.
SPECS: dict[Op, OpDef] = {Op(op.name): op for op in OPS}

INDEX_NAMES = ("b", "h", "q_idx", "kv_idx")
SCORE_MOD_INPUTS = ("score",) + INDEX_NAMES
MASK_MOD_INPUTS = INDEX_NAMES


@dataclass(frozen=True, eq=False)
class Node:
    """One SSA value. Compared and hashed by identity."""

    op: Op
    dtype: DType
    inputs: tuple["Node", ...] = ()
    arg: Any = None

    def __repr__(self) -> str:
        return f"Node({self.op.value}, {self.dtype.value}, arg={self.arg!r}, n_inputs={len(self.inputs)})"


@dataclass(frozen=True)
class BufferSpec:
    """A captured tensor as the IR sees it: a name, a shape and a dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    torch_dtype: str  # e.g. "torch.float16": the storage dtype, loads widen it to ``dtype``


@dataclass(frozen=True, eq=False)
class Graph:
    """A traced score_mod (``kind="score_mod"``) or mask_mod (``kind="mask_mod"``)."""

    kind: str
    output: Node
    buffers: tuple[BufferSpec, ...] = ()
    name: str = "mod"
    # Where the user's function lives, for messages: "file.py:12".
    origin: str = ""

    @cached_property
    def nodes(self) -> tuple[Node, ...]:
        """Every node reachable from the output, inputs before users."""
        order: list[Node] = []
        seen: set[int] = set()
        stack: list[tuple[Node, bool]] = [(self.output, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in seen:
                continue
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((i, False) for i in reversed(node.inputs) if id(i) not in seen)
        return tuple(order)

    @property
    def input_names(self) -> tuple[str, ...]:
        return SCORE_MOD_INPUTS if self.kind == "score_mod" else MASK_MOD_INPUTS

    def used_inputs(self) -> frozenset[str]:
        return frozenset(n.arg for n in self.nodes if n.op is Op.INPUT)

    def __str__(self) -> str:
        return format_graph(self)

    def derived(self, name, compute: Callable[[], Any]) -> Any:
        """``compute()``, computed once for this graph and kept with it under ``name``: a graph is
        immutable, so what is computed from it alone (its key, its analysis) never changes."""
        memo = self.__dict__.setdefault("_derived", {})
        if name not in memo:
            memo[name] = compute()
        return memo[name]

    def structural_key(self, *, constants: bool = True, shapes: bool = True) -> str:
        """A hash of the graph's structure.

        Two graphs traced from different Python functions get the same key when
        they compute the same thing. ``constants=False`` leaves constant values
        out (back ends that pass constants at run time use it); ``shapes=False``
        keeps only each buffer's rank and dtype (lengths are run-time values).
        """
        return self.derived(("structural_key", constants, shapes), lambda: self._structural_key(constants, shapes))

    def _structural_key(self, constants: bool, shapes: bool) -> str:
        numbering = {id(n): i for i, n in enumerate(self.nodes)}
        parts = [self.kind]
        for spec in self.buffers:
            shape = spec.shape if shapes else len(spec.shape)
            parts.append(f"buf {shape} {spec.dtype.value} {spec.torch_dtype}")
        for n in self.nodes:
            arg = n.arg
            if n.op is Op.CONST and not constants:
                arg = type(arg).__name__
            elif isinstance(arg, DType):
                arg = arg.value
            ins = ",".join(str(numbering[id(i)]) for i in n.inputs)
            parts.append(f"{n.op.value} {n.dtype.value} {arg!r} {ins}")
        parts.append(f"out {numbering[id(self.output)]}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def format_graph(graph: Graph) -> str:
    """Print a graph like assembly: ``%3 = lt %0 %1 : bool``."""
    names: dict[int, str] = {}
    lines = [f"{graph.kind} {graph.name}({', '.join(graph.input_names)})"]
    for spec in graph.buffers:
        lines.append(f"  buffer {spec.name}: {spec.torch_dtype.replace('torch.', '')}{list(spec.shape)}")
    for i, node in enumerate(graph.nodes):
        name = f"%{i}"
        names[id(node)] = name
        operands = " ".join(names[id(x)] for x in node.inputs)
        if node.op is Op.INPUT:
            rhs = f"input {node.arg}"
        elif node.op is Op.CONST:
            rhs = f"const {node.arg!r}"
        elif node.op is Op.BUFFER:
            rhs = f"buffer {graph.buffers[node.arg].name}"
        elif node.op is Op.CAST:
            rhs = f"cast {operands} to {node.arg.value}"
        else:
            rhs = f"{node.op.value} {operands}"
        lines.append(f"  {name} = {rhs} : {node.dtype.value}")
    lines.append(f"  return {names[id(graph.output)]}")
    return "\n".join(lines)


def constants_of(graph: Graph | None) -> list:
    """The values of a graph's ``CONST`` nodes in ``graph.nodes`` order: the run-time constant slots
    the printers number the same way (so a new window size reuses a generated kernel).

    Example: ``constants_of(trace_mask_mod(lambda b, h, q, kv: q - kv < 64).graph) == [64]``.
    """
    if graph is None:
        return []
    return list(graph.derived("constants", lambda: tuple(node.arg for node in graph.nodes if node.op is Op.CONST)))
