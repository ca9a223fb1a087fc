"""The Triton printer of every op-table entry, run under TRITON_INTERPRET=1 on CPU tensors.

Each op's graph (its operands loaded from captured tensors) is printed into a one-tile kernel
with the templates' helpers; its values must equal ``apply_op``'s and its forward-mode
derivatives torch autograd's. The interpreter has no libdevice, so here each libdevice
function is torch's: that checks what the printer composes, not libdevice's rounding.
"""

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton printer cannot run")
tl = pytest.importorskip("triton.language")
from triton.runtime.interpreter import TensorHandle

from codegen.triton import load_kernel_module, templates
from codegen.triton.printer import TL_DTYPE, ModPrinter, constant_args
from flexattn.errors import LoweringError
from flexattn.ir import SPECS, DType, Op
from flexattn.ops import OPS
from flexattn.proxy import apply
from flexattn.semantics import TORCH_DTYPES, apply_op
from op_samples import COMBOS, N, close, evaluate_values, sample, trace_values

# The inputs include infinities and NaN, on which numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
_TORCH_NAMES = {"rint": "round"}  # libdevice names torch spells otherwise
_KERNELS = itertools.count()


class _Libdevice:
    """libdevice for the interpreter: each function is torch's, on the tiles' numpy data (float32)."""

    def __getattr__(self, name):
        fn = getattr(torch, _TORCH_NAMES.get(name, name))

        def call(*args):
            data = fn(*(torch.from_numpy(np.asarray(a.handle.data)) for a in args)).numpy().astype(np.float32)
            kind = tl.float32 if data.ndim == 0 else tl.block_type(tl.float32, list(data.shape))
            return tl.core.tensor(TensorHandle(data, tl.float32), kind)
        return call


def _kernel(printer: ModPrinter, tangents: list[str]):
    lines = printer.values() + tangents[:-1] if tangents else printer.values()
    out = TL_DTYPE[printer.graph.output.dtype]
    stored = "tl.int8" if printer.graph.output.dtype is DType.BOOL else out
    results = [f"tl.store(t{j}_ptr + q_idx, {name} + tl.zeros([N, 1], tl.float32))"
               for j, name in enumerate(tangents[-1] if tangents else [])]
    body = "\n    ".join(lines + [f"tl.store(out_ptr + q_idx, ({printer.output} + tl.zeros([N, 1], {out})).to({stored}))"]
                         + results)
    params = ", ".join([f"t{j}_ptr" for j in range(len(results))] + printer.params())
    source = templates.HELPERS + f"""

@triton.jit
def kernel(out_ptr, {params}{', ' if params else ''}N: tl.constexpr):
    q_idx = tl.arange(0, N)[:, None].to(tl.int64)
    kv_idx = tl.zeros([1, 1], tl.int64)
    score = tl.zeros([N, 1], tl.float32)
    {body}
"""
    module = load_kernel_module(source, f"ops_test_{next(_KERNELS)}")
    module.libdevice = _Libdevice()
    return module.kernel


def _run(kernel, graph, buffers, n_tangents: int):
    dtype = TORCH_DTYPES[graph.output.dtype]
    out = torch.zeros(N, dtype=torch.int8 if dtype == torch.bool else dtype)
    tangents = [torch.zeros(N) for _ in range(n_tangents)]
    args = []
    for buffer in buffers:
        args += [buffer.to(torch.uint8) if buffer.dtype == torch.bool else buffer, *buffer.shape, *buffer.stride()]
    kernel[(1,)](out, *tangents, *args, *constant_args(graph), N=N)
    return out.to(dtype), tangents


def _graph(spec, combo, special: bool):
    tensors = [sample(dtype, i, spec.int_domain, seed=int(special), special=special) for i, dtype in enumerate(combo)]
    return trace_values(lambda *xs: apply(spec, *xs), tensors)


def _autograd(spec, graph, buffers, seed_buffer: int) -> torch.Tensor | None:
    """d(op)/d(operand) per element by torch autograd, or None where torch has no derivative."""
    operands = [b.clone().requires_grad_(i == seed_buffer) for i, b in enumerate(buffers)]
    try:
        value = apply_op(graph.output.op, graph.output.dtype, operands)
        return torch.autograd.grad(value.sum(), operands[seed_buffer])[0]
    except (RuntimeError, NotImplementedError):
        return None


@pytest.mark.parametrize("spec", OPS, ids=[op.name for op in OPS])
def test_triton_printer_values_and_derivatives(spec):
    checked = 0
    for combo in COMBOS[spec.arity]:
        try:
            graph, buffers = _graph(spec, combo, special=True)
            printer = ModPrinter(graph, "m_")
            printer.values()
        except LoweringError:
            continue  # the op has no Triton form for these operands (an integer pow)
        except TypeError:  # a TraceError: the op refuses these dtypes
            continue
        seeds = printer.float_loads() if graph.output.dtype.is_float and graph.output.op is not Op.CAST else []
        tangents = [printer.tangent(seed, f"d{j}_") for j, seed in enumerate(seeds)]
        lines = [line for tangent_lines, _ in tangents for line in tangent_lines]
        kernel = _kernel(printer, lines + [[name for _, name in tangents]] if tangents else [])
        got, _ = _run(kernel, graph, buffers, len(tangents))
        want = evaluate_values(graph, buffers)
        assert close(got, want, atol=1e-5).all(), (combo, got, want)
        # Derivatives at generic points (no ties, kinks or infinities), against autograd.
        graph, buffers = _graph(spec, combo, special=False)
        _, derivatives = _run(kernel, graph, buffers, len(tangents))
        value = evaluate_values(graph, buffers)
        for seed, derivative in zip(seeds, derivatives):
            want = _autograd(spec, graph, buffers, seed.inputs[0].arg)
            if want is not None:
                finite = torch.isfinite(want) & torch.isfinite(value)
                assert close(derivative[finite], want[finite], rtol=1e-4, atol=1e-5).all(), (combo, derivative, want)
        checked += 1
    assert checked


def test_a_missing_derivative_fails_only_when_one_is_needed(monkeypatch):
    spec = SPECS[Op.ERF]
    monkeypatch.setitem(SPECS, Op.ERF, replace(spec, derivative=None))
    graph, _ = _graph(spec, (torch.float32,), special=False)
    printer = ModPrinter(graph, "m_")
    assert printer.values()
    with pytest.raises(LoweringError, match="differentiate op 'erf'"):
        printer.tangent(printer.float_loads()[0], "d")
