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

import math

from flexattn.errors import LoweringError
from flexattn.ir import DType, Graph, Node, Op

TL_DTYPE = {DType.BOOL: "tl.int1", DType.INT32: "tl.int32", DType.INT64: "tl.int64", DType.FLOAT32: "tl.float32"}
_INFIX = {
    Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=",
    Op.EQ: "==", Op.NE: "!=", Op.AND: "&", Op.OR: "|", Op.XOR: "^", Op.LSHIFT: "<<", Op.RSHIFT: ">>",
}
_FLOAT_CALL = {
    Op.EXP: "tl.exp({})", Op.EXP2: "tl.exp2({})", Op.LOG: "tl.log({})", Op.LOG2: "tl.log2({})",
    Op.SQRT: "tl.sqrt_rn({})", Op.RSQRT: "tl.rsqrt({})", Op.TANH: "_tanh({})", Op.SIGMOID: "tl.sigmoid({})",
    Op.SIN: "tl.sin({})", Op.COS: "tl.cos({})", Op.FLOOR: "tl.floor({})", Op.CEIL: "tl.ceil({})",
    Op.ROUND: "libdevice.rint({})",
}
_FLOAT_STORAGE = ("torch.float16", "torch.bfloat16", "torch.float32", "torch.float64")


def constant_args(graph: Graph | None) -> list:
    """The run-time values of a graph's CONST slots (bools as ints), in ``graph.nodes`` order.

    Example: ``constant_args(trace_mask_mod(lambda b, h, q, kv: q - kv < 64).graph) == [64]``.
    """
    if graph is None:
        return []
    return [int(n.arg) if isinstance(n.arg, bool) else n.arg for n in graph.nodes if n.op is Op.CONST]


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
        if op in _FLOAT_CALL:
            return _FLOAT_CALL[op].format(self.as_float(ins[0]))
        if op is Op.NEG:
            return f"-{self.name(ins[0])}"
        if op is Op.ABS:
            return f"tl.abs({self.name(ins[0])})"
        if op is Op.NOT:
            x = self.name(ins[0])
            return f"({x} == 0)" if ins[0].dtype is DType.BOOL else f"~{x}"
        if op is Op.SIGN:
            x = self.name(ins[0])
            return f"(({x} > 0).to({TL_DTYPE[node.dtype]}) - ({x} < 0).to({TL_DTYPE[node.dtype]}))"
        if op is Op.ISNAN:
            return f"({self.name(ins[0])} != {self.name(ins[0])})"
        if op is Op.WHERE:
            c, a, b = map(self.name, ins)
            return self.typed(node, f"tl.where({c}, {a}, {b})")
        a, b = ins[0], ins[1] if len(ins) > 1 else None
        if op is Op.TRUEDIV:
            return f"{self.as_float(a)} / {self.as_float(b)}"
        if op is Op.POW:
            if node.dtype is not DType.FLOAT32:
                raise LoweringError(f"the triton back end cannot lower an integer pow (in {self.graph.name})")
            return f"libdevice.pow({self.as_float(a)}, {self.as_float(b)})"
        if op in (Op.FLOORDIV, Op.MOD):
            kind = "float" if node.dtype is DType.FLOAT32 else "int"
            return self.typed(node, f"_{op.value}_{kind}({self.name(a)}, {self.name(b)})")
        if op in (Op.MIN, Op.MAX):
            fn = "tl.minimum" if op is Op.MIN else "tl.maximum"
            return self.typed(node, f"{fn}({self.name(a)}, {self.name(b)})")
        if op in _INFIX:
            return self.typed(node, f"{self.name(a)} {_INFIX[op]} {self.name(b)}")
        raise LoweringError(f"the triton back end cannot lower op {op.value!r} (in {self.graph.name})")

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
        """One forward-mode rule per float op: the tangent of ``node`` from its inputs' tangents."""
        if all(x is None for x in dins):
            return None
        op, ins, v = node.op, node.inputs, self.name(node)
        da = dins[0] if dins[0] is not None else "0.0"
        db = (dins[1] if dins[1] is not None else "0.0") if len(dins) > 1 else None
        a = self.as_float(ins[0])
        b = self.as_float(ins[1]) if len(ins) > 1 and ins[1].dtype is not DType.BOOL else None
        rules = {
            Op.ADD: lambda: f"{da} + {db}",
            Op.SUB: lambda: f"{da} - {db}",
            Op.MUL: lambda: f"{da} * {b} + {a} * {db}",
            Op.TRUEDIV: lambda: f"({da} - {v} * {db}) / {b}",
            Op.NEG: lambda: f"-{da}",
            Op.EXP: lambda: f"{da} * {v}",
            Op.EXP2: lambda: f"{da} * {v} * {math.log(2.0)!r}",
            Op.LOG: lambda: f"{da} / {a}",
            Op.LOG2: lambda: f"{da} / ({a} * {math.log(2.0)!r})",
            Op.SQRT: lambda: f"{da} * 0.5 / {v}",
            Op.RSQRT: lambda: f"-0.5 * {da} * {v} / {a}",
            Op.TANH: lambda: f"{da} * (1.0 - {v} * {v})",
            Op.SIGMOID: lambda: f"{da} * {v} * (1.0 - {v})",
            Op.SIN: lambda: f"{da} * tl.cos({a})",
            Op.COS: lambda: f"-{da} * tl.sin({a})",
            Op.ABS: lambda: f"tl.where({a} < 0, -{da}, {da})",
            Op.MIN: lambda: f"tl.where({a} <= {b}, {da}, {db})",
            Op.MAX: lambda: f"tl.where({a} >= {b}, {da}, {db})",
            Op.POW: lambda: f"{da} * {b} * libdevice.pow({a}, {b} - 1.0) + {db} * {v} * tl.log({a})",
            Op.CAST: lambda: da,
            Op.FLOOR: lambda: "0.0", Op.CEIL: lambda: "0.0", Op.ROUND: lambda: "0.0", Op.SIGN: lambda: "0.0",
            Op.FLOORDIV: lambda: "0.0",
            Op.MOD: lambda: f"{da} - {db} * tl.floor({a} / {b})",
        }
        if op is Op.WHERE:
            t = [x if x is not None else "0.0" for x in dins[1:]]
            return f"tl.where({self.name(ins[0])}, {t[0]}, {t[1]})"
        if op not in rules:
            raise LoweringError(f"the triton back end cannot differentiate op {op.value!r} (in {self.graph.name})")
        return rules[op]()
