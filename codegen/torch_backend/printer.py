"""The torch printer: one line of torch code per IR node.

``print_mod(graph, fn_name)`` turns a traced score_mod or mask_mod into the
source of a Python function over tile index tensors::

    def score_mod(score, b, h, q_idx, kv_idx, buffers, consts, cf):
        v0 = score
        v1 = q_idx
        v2 = kv_idx
        v3 = v1 - v2                      # sub : int64
        v4 = consts[0]                    # const slot 0 (was 5)
        ...

Every ``CONST`` is read from ``consts`` (a run-time list, one slot per
constant in ``graph.nodes`` order) and every buffer from ``buffers``, so a new
window size or bias table reuses the same generated code. ``cf`` is the
compute float (float32, or float64 for float64 inputs): it is what
``cast to float32`` means here, as in the reference. The semantics equal
``flexattn.semantics.apply_op``/``load``: loads clamp each index into
``[0, size - 1]``, ``//`` and ``%`` follow Python's sign rules.
"""

from __future__ import annotations

from flexattn.errors import LoweringError
from flexattn.ir import DType, Graph, Node, Op

_TORCH_DTYPE = {DType.BOOL: "torch.bool", DType.INT32: "torch.int32", DType.INT64: "torch.int64"}

# Ops printed as Python operators: tensors (and a Python scalar on either side) work.
_INFIX = {
    Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.TRUEDIV: "/", Op.FLOORDIV: "//", Op.MOD: "%",
    Op.POW: "**", Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=", Op.EQ: "==", Op.NE: "!=",
    Op.AND: "&", Op.OR: "|", Op.XOR: "^", Op.LSHIFT: "<<", Op.RSHIFT: ">>",
}
_CALL_BINARY = {Op.MIN: "torch.minimum", Op.MAX: "torch.maximum"}
_CALL_UNARY = {
    Op.ABS: "torch.abs", Op.EXP: "torch.exp", Op.EXP2: "torch.exp2", Op.LOG: "torch.log",
    Op.LOG2: "torch.log2", Op.SQRT: "torch.sqrt", Op.RSQRT: "torch.rsqrt", Op.TANH: "torch.tanh",
    Op.SIGMOID: "torch.sigmoid", Op.SIN: "torch.sin", Op.COS: "torch.cos", Op.SIGN: "torch.sign",
    Op.FLOOR: "torch.floor", Op.CEIL: "torch.ceil", Op.ROUND: "torch.round", Op.ISNAN: "torch.isnan",
}
_FLOAT_STORAGE = ("torch.float16", "torch.bfloat16")


def constants_of(graph: Graph | None) -> list:
    """The run-time values of a graph's ``CONST`` slots, in the order ``print_mod`` numbers them.

    Example: ``constants_of(trace_mask_mod(lambda b, h, q, kv: q - kv < 64).graph) == [64]``.
    """
    if graph is None:
        return []
    return [node.arg for node in graph.nodes if node.op is Op.CONST]


class TorchPrinter:
    """A visitor over a graph's nodes; ``line(node)`` is the torch code of one node."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.names: dict[int, str] = {}
        self.const_slots = 0
        uses: dict[int, int] = {id(graph.output): 1}
        for node in graph.nodes:
            for i in node.inputs:
                uses[id(i)] = uses.get(id(i), 0) + 1
        # Float products used once, by an add/sub: printed fused into it (one pass over
        # the scores instead of two, e.g. ALiBi's score + slope * distance).
        self.fused: dict[int, Node] = {}
        for node in graph.nodes:
            if node.op in (Op.ADD, Op.SUB) and node.dtype.is_float:
                product = node.inputs[1] if node.op is Op.SUB else next(
                    (i for i in reversed(node.inputs) if i.op is Op.MUL), node.inputs[1])
                if product.op is Op.MUL and product.dtype.is_float and uses[id(product)] == 1 \
                        and not all(i.op is Op.CONST for i in product.inputs):
                    self.fused[id(product)] = node

    def name(self, node: Node) -> str:
        return self.names[id(node)]

    def tensor(self, node: Node) -> str:
        """An operand that must be a tensor (constants are Python scalars at run time)."""
        name = self.name(node)
        return f"torch.as_tensor({name})" if node.op is Op.CONST else name

    def line(self, node: Node) -> str:
        op, ins = node.op, node.inputs
        if op is Op.INPUT:
            return node.arg
        if op is Op.CONST:
            slot = self.const_slots
            self.const_slots += 1
            return f"consts[{slot}]  # const {node.arg!r}"
        if op is Op.BUFFER:
            return f"buffers[{node.arg}]  # {self.graph.buffers[node.arg].name}"
        if op is Op.LOAD:
            return self.load(node)
        if op is Op.CAST:
            target = "cf" if node.arg is DType.FLOAT32 else _TORCH_DTYPE[node.arg]
            return f"{self.tensor(ins[0])}.to({target})"
        if id(node) in self.fused:
            return None
        if any(self.fused.get(id(i)) is node for i in ins):
            return self.multiply_add(node)
        if op is Op.NEG:
            return f"-{self.tensor(ins[0])}"
        if op is Op.NOT:
            fn = "torch.logical_not" if ins[0].dtype is DType.BOOL else "torch.bitwise_not"
            return f"{fn}({self.tensor(ins[0])})"
        if op in _CALL_UNARY:
            return self.typed(node, f"{_CALL_UNARY[op]}({self.tensor(ins[0])})")
        if op in _INFIX:
            a, b = ins
            # A constant on the left of an infix op would be a Python scalar op Python scalar
            # only if both were constants, which constant folding rules out; still be safe.
            left = self.tensor(a) if a.op is Op.CONST and b.op is Op.CONST else self.name(a)
            return self.typed(node, f"{left} {_INFIX[op]} {self.name(b)}")
        if op in _CALL_BINARY:
            return f"{_CALL_BINARY[op]}({self.tensor(ins[0])}, {self.tensor(ins[1])})"
        if op is Op.WHERE:
            cond, a, b = ins
            return self.typed(node, f"torch.where({self.tensor(cond)}, {self.name(a)}, {self.name(b)})")
        raise LoweringError(f"the torch back end cannot lower op {op.value!r} (in {self.graph.name})")

    def multiply_add(self, node: Node) -> str:
        """``x + a * b`` / ``x - a * b`` as one torch.addcmul (or torch.add with alpha for a constant)."""
        product = next(i for i in node.inputs if self.fused.get(id(i)) is node)
        other = node.inputs[0] if node.inputs[1] is product else node.inputs[1]
        sign = "-" if node.op is Op.SUB else ""
        a, b = product.inputs
        if a.op is Op.CONST or b.op is Op.CONST:
            constant, tensor = (a, b) if a.op is Op.CONST else (b, a)
            return f"torch.add({self.tensor(other)}, {self.name(tensor)}, alpha={sign}{self.name(constant)})"
        return f"torch.addcmul({self.tensor(other)}, {self.name(a)}, {self.name(b)}, value={sign or '+'}1)"

    def typed(self, node: Node, expr: str) -> str:
        """Cast to the node's int/bool dtype where torch's result type could differ (as apply_op does)."""
        if node.dtype.is_float:
            return expr
        return f"({expr}).to({_TORCH_DTYPE[node.dtype]})"

    def load(self, node: Node) -> str:
        buffer, *indices = node.inputs
        spec = self.graph.buffers[buffer.arg]
        buf = self.name(buffer)
        if indices:
            clamped = ", ".join(
                f"{self.tensor(i)}.clamp(0, {buf}.shape[{d}] - 1)" for d, i in enumerate(indices))
            expr = f"{buf}[{clamped}]"
        else:
            expr = buf
        if spec.torch_dtype in _FLOAT_STORAGE:
            return f"{expr}.float()"
        if spec.dtype is DType.FLOAT32:
            return expr
        if spec.torch_dtype != _TORCH_DTYPE[spec.dtype]:
            return f"{expr}.to({_TORCH_DTYPE[spec.dtype]})"
        return expr


def print_mod(graph: Graph, fn_name: str) -> str:
    """The source of ``def fn_name(...)`` computing ``graph`` elementwise.

    A score_mod becomes ``fn(score, b, h, q_idx, kv_idx, buffers, consts, cf)``
    returning a ``cf`` tensor; a mask_mod becomes ``fn(b, h, q_idx, kv_idx,
    buffers, consts, cf)`` returning a bool tensor (or Python bool for a
    constant mask). Inputs are broadcastable int64 index tensors.

    Raises ``LoweringError`` for an op the printer does not know.
    """
    printer = TorchPrinter(graph)
    params = ", ".join(graph.input_names)
    lines = [f"def {fn_name}({params}, buffers, consts, cf):",
             f'    """The {graph.kind}, printed from its IR (shared by every mod of the same structure)."""']
    for i, node in enumerate(graph.nodes):
        name = f"v{i}"
        code = printer.line(node)
        printer.names[id(node)] = name
        if code is None:
            lines.append(f"    # {name} = {node.op.value} (fused into its user below)")
        else:
            lines.append(f"    {name} = {code}")
    lines.append(f"    return {printer.tensor(graph.output)}")
    return "\n".join(lines) + "\n"
