"""The Triton printer: one line of Triton code per IR node, plus derivative lines.

``ModPrinter(graph, prefix)`` prints a traced mod as straight-line Triton code
over tile values: ``score`` is a (BLOCK_M, BLOCK_N) float32 tile, ``b`` and
``h`` are int64 scalars, ``q_idx`` is (BLOCK_M, 1) and ``kv_idx`` (1, BLOCK_N)
int64. Constants are kernel arguments (``{prefix}c{i}``, one per CONST node in
``graph.nodes`` order) so a new constant value reuses the compiled kernel;
buffer ``i`` is a pointer ``{prefix}b{i}_ptr`` with sizes ``{prefix}b{i}_size{d}``
and strides ``{prefix}b{i}_stride{d}``. The semantics equal
``flexattn.semantics``: loads clamp each index into ``[0, size - 1]``, ``//``
and ``%`` follow Python's sign rules, fp16/bf16 buffers widen to float32.

``tangent(seed)`` prints forward-mode derivative lines: d(output)/d(seed) for
the score input (the backward's dscore chain rule) or for a buffer load (a
captured buffer's gradient).
"""

from __future__ import annotations

from flexattn.errors import LoweringError
from flexattn.ir import SPECS, DType, Graph, Node, Op, constants_of
from flexattn.ops import variant

TL_DTYPE = {DType.BOOL: "tl.int1", DType.INT32: "tl.int32", DType.INT64: "tl.int64", DType.FLOAT32: "tl.float32"}
_FLOAT_STORAGE = ("torch.float16", "torch.bfloat16", "torch.float32", "torch.float64")


def constant_args(graph: Graph | None) -> list:
    """``flexattn.ir.constants_of`` as Triton kernel arguments (bools as ints)."""
    return [int(value) if isinstance(value, bool) else value for value in constants_of(graph)]


class ModPrinter:
    """A visitor over one graph; ``values()`` and ``tangent(seed)`` return lists of code lines."""

    def __init__(self, graph: Graph, prefix: str):
        self.graph, self.prefix = graph, prefix
        self.names = {id(n): f"{prefix}v{i}" for i, n in enumerate(graph.nodes)}
        slots = [n for n in graph.nodes if n.op is Op.CONST]
        self.const_slot = {id(n): i for i, n in enumerate(slots)}
        self.n_consts = len(slots)

    def name(self, node: Node) -> str:
        return self.names[id(node)]

    @property
    def output(self) -> str:
        return self.name(self.graph.output)

    def params(self) -> list[str]:
        """Kernel parameters this graph needs: buffer pointers, sizes and strides, then constants."""
        params = []
        for i, spec in enumerate(self.graph.buffers):
            params.append(f"{self.prefix}b{i}_ptr")
            params += [f"{self.prefix}b{i}_size{d}" for d in range(len(spec.shape))]
            params += [f"{self.prefix}b{i}_stride{d}" for d in range(len(spec.shape))]
        return params + [f"{self.prefix}c{i}" for i in range(self.n_consts)]

    def values(self) -> list[str]:
        return [f"{self.name(n)} = {self.value(n)}" for n in self.graph.nodes if n.op is not Op.BUFFER]

    def as_float(self, node: Node) -> str:
        return self.name(node) if node.dtype is DType.FLOAT32 else f"{self.name(node)}.to(tl.float32)"

    def value(self, node: Node) -> str:
        op, ins = node.op, node.inputs
        if op is Op.INPUT:
            return node.arg
        if op is Op.CONST:
            arg = f"{self.prefix}c{self.const_slot[id(node)]}"
            # Adding a typed zero works whether the launcher passes a tensor or a Python scalar.
            return f"({arg} != 0)" if node.dtype is DType.BOOL else f"({arg} + tl.zeros([], {TL_DTYPE[node.dtype]}))"
        if op is Op.LOAD:
            return self.load(node)
        if op is Op.CAST:
            if node.arg is DType.BOOL:
                return f"({self.name(ins[0])} != 0)"
            return f"{self.name(ins[0])}.to({TL_DTYPE[node.arg]})"
        spec = SPECS.get(op)
        kind = ins[-1].dtype.kind if ins else None
        template = variant(spec.triton, kind) if spec is not None else None
        if template is None:
            on = f" on {kind} operands" if spec is not None else ""
            raise LoweringError(f"the triton back end cannot lower op {op.value!r}{on} (in {self.graph.name})")
        return self.typed(node, template.format(*self.operands(node), dtype=TL_DTYPE[node.dtype]))

    def operands(self, node: Node) -> list[str]:
        """The operands' names; float32 views for an op that computes in float."""
        as_float = SPECS[node.op].promote == "float"
        return [self.as_float(i) if as_float else self.name(i) for i in node.inputs]

    def typed(self, node: Node, expr: str) -> str:
        """Cast to the node's dtype, as ``apply_op`` does (Triton's promotion can differ)."""
        if node.dtype is DType.BOOL:
            return f"({expr})"
        return f"({expr}).to({TL_DTYPE[node.dtype]})"

    def offset(self, node: Node) -> str:
        """The element offset of a LOAD, each index clamped into ``[0, size - 1]``."""
        buffer, *indices = node.inputs
        p = f"{self.prefix}b{buffer.arg}"
        terms = [f"tl.minimum(tl.maximum({self.name(i)}, 0), {p}_size{d} - 1) * {p}_stride{d}"
                 for d, i in enumerate(indices)]
        return " + ".join(terms) or "0"

    def load(self, node: Node) -> str:
        spec = self.graph.buffers[node.inputs[0].arg]
        loaded = f"tl.load({self.prefix}b{node.inputs[0].arg}_ptr + {self.offset(node)})"
        if spec.dtype is DType.BOOL:
            return f"({loaded} != 0)"  # bool buffers are passed as uint8
        return f"{loaded}.to({TL_DTYPE[spec.dtype]})"

    def float_loads(self) -> list[Node]:
        """LOAD nodes of floating-point buffers (their gradients are tangents seeded there)."""
        return [n for n in self.graph.nodes
                if n.op is Op.LOAD and self.graph.buffers[n.inputs[0].arg].torch_dtype in _FLOAT_STORAGE]

    def tangent(self, seed: Node, tag: str) -> tuple[list[str], str]:
        """Lines computing d(output)/d(seed) forward-mode; returns (lines, name of the result)."""
        d: dict[int, str | None] = {}
        lines = []
        for i, node in enumerate(self.graph.nodes):
            if node is seed:
                expr = "1.0"
            elif not node.dtype.is_float or node.op in (Op.INPUT, Op.CONST, Op.LOAD, Op.BUFFER):
                expr = None
            else:
                expr = self.derivative(node, [d[id(x)] for x in node.inputs])
            if expr is not None:
                name = f"{self.prefix}{tag}{i}"
                lines.append(f"{name} = {expr}")
                expr = name
            d[id(node)] = expr
        return lines, d[id(self.graph.output)] or "0.0"

    def derivative(self, node: Node, dins: list) -> str | None:
        """The tangent of ``node`` from its inputs' tangents (``OpDef.derivative``; a cast passes it on)."""
        if all(x is None for x in dins):
            return None
        if node.op is Op.CAST:
            return dins[0]
        rule = SPECS[node.op].derivative
        if rule is None:
            raise LoweringError(f"the triton back end cannot differentiate op {node.op.value!r} "
                                f"(in {self.graph.name})")
        fields = {"v": self.name(node)}
        for letter, x, d in zip("abc", node.inputs, dins):
            fields[letter], fields[f"d{letter}"] = self.as_float(x), d if d is not None else "0.0"
        names = [self.name(x) for x in node.inputs]
        if isinstance(rule, str):
            return rule.format(*names, **fields)
        terms = [term.format(*names, **fields) for term, d in zip(rule, dins) if d is not None]
        return " + ".join(terms) or "0.0"
