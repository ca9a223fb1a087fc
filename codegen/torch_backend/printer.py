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
from flexattn.ir import SPECS, DType, Graph, Node, Op
from flexattn.ops import variant

_TORCH_DTYPE = {DType.BOOL: "torch.bool", DType.INT32: "torch.int32", DType.INT64: "torch.int64"}

_FLOAT_STORAGE = ("torch.float16", "torch.bfloat16")


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
        return self.elementwise(node)

    def elementwise(self, node: Node) -> str:
        """A table op: its ``OpDef.torch`` template over the operands' names (``{0}``) and tensors (``{t0}``)."""
        spec = SPECS.get(node.op)
        template = variant(spec.torch, node.inputs[-1].dtype.kind) if spec is not None else None
        if template is None:
            raise LoweringError(f"the torch back end cannot lower op {node.op.value!r} (in {self.graph.name})")
        names = [self.name(i) for i in node.inputs]
        # Constant folding leaves no op of constants only, but Python scalars alone would not
        # give a tensor: make the first operand one.
        if all(i.op is Op.CONST for i in node.inputs):
            names[0] = self.tensor(node.inputs[0])
        tensors = {f"t{k}": self.tensor(i) for k, i in enumerate(node.inputs)}
        return self.typed(node, template.format(*names, **tensors))

    def multiply_add(self, node: Node) -> str:
        """``x + a * b`` / ``x - a * b`` as one torch.addcmul (or torch.add with alpha for a constant)."""
        product = next(i for i in node.inputs if self.fused.get(id(i)) is node)
        other = node.inputs[0] if node.inputs[1] is product else node.inputs[1]
        return self.scaled_add(other, *product.inputs, "-" if node.op is Op.SUB else "")

    def scaled_add(self, other: Node, a: Node, b: Node, sign: str) -> str:
        """``other + a * b`` (``sign`` "") or ``other - a * b`` ("-") as one torch call."""
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


def print_mod(graph: Graph, fn_name: str, printer_class: type = TorchPrinter) -> str:
    """The source of ``def fn_name(...)`` computing ``graph`` elementwise.

    A score_mod becomes ``fn(score, b, h, q_idx, kv_idx, buffers, consts, cf)``
    returning a ``cf`` tensor; a mask_mod becomes ``fn(b, h, q_idx, kv_idx,
    buffers, consts, cf)`` returning a bool tensor (or Python bool for a
    constant mask). Inputs are broadcastable int64 index tensors.

    ``printer_class``: a ``TorchPrinter`` subclass that prints some ops differently.
    Raises ``LoweringError`` for an op the printer does not know.
    """
    printer = printer_class(graph)
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
