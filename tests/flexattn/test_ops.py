"""Every entry of the op table (flexattn.ops.OPS) and every composite (flexattn.composites),
through every evaluator: traced spellings against torch, the torch printer against apply_op,
the interval rules' soundness, the sympy forms. A new table entry is tested by these
parametrizations without any edit here; tests/flexattn/test_ops_triton.py covers the Triton printer.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sympy.core.function import AppliedUndef

from codegen.torch_backend.printer import print_mod
from flexattn.ir import constants_of
from flexattn.analysis.intervals import RULES, Range, TileGrid, evaluate_ranges
from flexattn.analysis.symbolic import to_sympy
from flexattn.composites import COMPOSITES
from flexattn.errors import TraceError
from flexattn.ir import SPECS, Op
from flexattn.ops import OPS, variant
from flexattn.proxy import apply
from flexattn.semantics import TORCH_DTYPES, evaluate
from flexattn.spellings import dispatch_key
from flexattn.trace import trace_score_mod
from op_samples import COMBOS, N, close, evaluate_values, grid_env, resolve, sample, trace_values

# (spelling, operand count, integer domain, options): every spelling of the table and the composites.
SPELLINGS = [(s, op.arity, op.int_domain, {}) for op in OPS for s in op.spellings] + [
    (s, c.arity, None, options) for c in COMPOSITES for s in c.spellings for options in c.examples]
_TORCH_ERRORS = (RuntimeError, TypeError, ValueError, NotImplementedError)


def _op_graphs(spec, constant_operand: bool = False):
    """(dtypes, graph, buffers) of ``spec`` on loads of every dtype combination it traces for;
    with ``constant_operand``, operand 1 is a Python number instead of a load."""
    for combo in COMBOS[spec.arity]:
        tensors = [sample(dtype, i, spec.int_domain) for i, dtype in enumerate(combo)]
        constant = {torch.float32: 1.5, torch.bool: True}.get(combo[1], 3) if spec.arity > 1 else None

        def fn(*xs):
            xs = list(xs)
            if constant_operand:
                xs[1] = constant
            return apply(spec, *xs)

        try:
            graph, buffers = trace_values(fn, tensors)
        except TraceError:
            continue
        yield combo, graph, buffers


@pytest.mark.parametrize("spelling, arity, int_domain, options", SPELLINGS,
                         ids=[f"{s}{o or ''}" for s, _, _, o in SPELLINGS])
def test_traced_spelling_equals_torch(spelling, arity, int_domain, options):
    fn = resolve(spelling)
    checked = 0
    for combo in COMBOS[arity]:
        tensors = [sample(dtype, i, int_domain) for i, dtype in enumerate(combo)]
        try:
            want = fn(*tensors, **options)
        except _TORCH_ERRORS:
            continue  # torch does not define the op on these dtypes
        graph, buffers = trace_values(lambda *xs: fn(*xs, **options), tensors)
        got = evaluate_values(graph, buffers)
        assert got.dtype == want.dtype, f"{combo}: dtype {got.dtype}, torch {want.dtype}"
        ok = close(got, want)
        if not ok.all():  # torch's kernel for one element may round otherwise than its vector kernel
            ok |= close(got, torch.stack([fn(*[t[i] for t in tensors], **options) for i in range(N)]))
        bad = (~ok).nonzero().flatten()[:4].tolist()
        inputs = [[t[i].item() for t in tensors] for i in bad]
        assert ok.all(), f"{combo}: at {inputs} got {got[bad]}, torch {want[bad]}"
        checked += 1
    assert checked, "torch defines the op on none of the dtype combinations"


def _run_printed(graph, buffers) -> torch.Tensor:
    namespace = {"torch": torch}
    exec(compile(print_mod(graph, "mod"), "<printed mod>", "exec"), namespace)  # noqa: S102 - our own code
    env = grid_env()
    out = namespace["mod"](*(env[n] for n in graph.input_names), buffers, constants_of(graph), torch.float32)
    return torch.as_tensor(out).expand(1, 1, N, 1).reshape(N)


@pytest.mark.parametrize("constant_operand", [False, True], ids=["loads", "constant"])
@pytest.mark.parametrize("spec", OPS, ids=[op.name for op in OPS])
def test_torch_printer_equals_apply_op(spec, constant_operand):
    if constant_operand and spec.arity == 1:
        pytest.skip("a unary op of a constant is folded away")
    cases = list(_op_graphs(spec, constant_operand))
    assert cases
    for combo, graph, buffers in cases:
        want, got = evaluate_values(graph, buffers), _run_printed(graph, buffers)
        assert got.dtype == want.dtype and close(got, want, rtol=1e-6, atol=0).all(), combo


@pytest.mark.parametrize("spec", OPS, ids=[op.name for op in OPS])
def test_sympy_form(spec):
    for combo, graph, _ in _op_graphs(spec):
        expr = to_sympy(graph)
        assert str(expr)
        node = graph.output
        # A form of numbers need not take truth values (a comparison of bools stays opaque).
        numbers = torch.bool not in combo or isinstance(spec.sympy, dict)
        if numbers and node.op is Op(spec.name) and variant(spec.sympy, node.inputs[-1].dtype.kind) is not None:
            assert not any(f.func.__name__ == spec.name for f in expr.atoms(AppliedUndef)), combo


# ----- interval rules --------------------------------------------------------

def _int_operand(draw, position: int, domain: str):
    """A traced int64 operand: an affine form of the indices, or (a divisor, shift, exponent) a constant."""
    if position and domain:
        low, high = {"divisor": (-7, 7), "shift": (0, 6), "exponent": (0, 3)}[domain]
        k = draw(st.integers(low, high).filter(lambda v: v != 0 or domain != "divisor"))
        return lambda q, kv, b, h: k
    a, c, e = (draw(st.integers(-2, 2)) for _ in range(3))
    d = draw(st.integers(-10, 10))
    return lambda q, kv, b, h: q * a + kv * c + h * e + d


def as_proxy(draw, spec, position: int):
    kind = "bool" if spec.promote == "select" and position == 0 else draw(st.sampled_from(["int", "bool", "int"]))
    affine = _int_operand(draw, position, spec.int_domain if kind == "int" else "")
    if kind == "bool":
        return lambda q, kv, b, h: affine(q, kv, b, h) > 0
    return affine


def _box_values(graph, b, h, q_lo, q_hi, kv_lo, kv_hi) -> np.ndarray:
    env = {"b": torch.tensor(b).view(1, 1, 1, 1), "h": torch.tensor(h).view(1, 1, 1, 1),
           "q_idx": torch.arange(q_lo, q_hi + 1).view(1, 1, -1, 1),
           "kv_idx": torch.arange(kv_lo, kv_hi + 1).view(1, 1, 1, -1), "score": torch.zeros(())}
    return torch.as_tensor(evaluate(graph, env, [])).long().flatten().numpy()


@pytest.mark.parametrize("spec", OPS, ids=[op.name for op in OPS])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_interval_rule_is_sound(spec, data):
    makers = [as_proxy(data.draw, spec, i) for i in range(spec.arity)]
    try:
        traced = trace_score_mod(lambda s, b, h, q, kv: apply(spec, *[m(q, kv, b, h) for m in makers]))
    except TraceError:
        return
    graph = traced.graph
    graph = type(graph)(graph.kind, graph.output.inputs[0] if graph.output.op is Op.CAST else graph.output)
    if graph.output.dtype.is_float:
        return  # floats are not tracked: the analysis says "any value"
    boxes = data.draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 30),
                                         st.integers(0, 7), st.integers(0, 30), st.integers(0, 7)),
                               min_size=1, max_size=6))
    b, h, q_lo, q_len, kv_lo, kv_len = (np.array(col, dtype=np.int64) for col in zip(*boxes))
    grid = TileGrid(Range(b, b), Range(h, h), Range(q_lo, q_lo + q_len), Range(kv_lo, kv_lo + kv_len),
                    want_cuts=True)
    r = evaluate_ranges(graph, grid, None)
    lo, hi = (np.broadcast_to(x, (len(boxes),)) for x in (r.lo, r.hi))
    attained = np.broadcast_to(r.attained, (len(boxes),))
    for i in range(len(boxes)):
        try:
            values = _box_values(graph, b[i], h[i], q_lo[i], q_lo[i] + q_len[i], kv_lo[i], kv_lo[i] + kv_len[i])
        except RuntimeError:
            return  # an integer division by zero: the op is not defined there
        assert lo[i] <= values.min() and values.max() <= hi[i], (boxes[i], lo[i], hi[i], values)
        if attained[i]:
            assert set(range(lo[i], hi[i] + 1)) <= set(values.tolist()), (boxes[i], lo[i], hi[i])


# ----- the table itself ------------------------------------------------------

def test_every_spelling_names_a_torch_callable_once():
    seen = {}
    for spelling, *_ in SPELLINGS:
        owner, _, attr = spelling.rpartition(".")
        assert callable(getattr(torch.Tensor, attr)) if owner == "Tensor" else callable(resolve(spelling)), spelling
        key = dispatch_key(spelling)
        entry = next(e for e in list(OPS) + list(COMPOSITES) if spelling in e.spellings)
        assert seen.setdefault(key, entry) is entry, f"{spelling} is spelled by two entries"


def test_every_op_has_an_enum_member_and_a_known_interval_rule():
    assert [SPECS[Op(op.name)] for op in OPS] == list(OPS)
    assert all(op.interval is None or op.interval in RULES for op in OPS)
    assert len({op.name for op in OPS}) == len(OPS)


def test_ir_dtype_follows_torch_promotion_of_loads():
    x, y = torch.tensor([1, 2], dtype=torch.int32), torch.tensor([True, False])
    graph, _ = trace_values(lambda a, c: a + c, [x, y])
    assert TORCH_DTYPES[graph.output.dtype] == (x + y).dtype


def test_constants_made_once_keep_apart_scalars_that_compare_equal():
    """apply_op's constants are made once per (value, dtype): -0.0 / 0.0 and True / 1 stay distinct."""
    from flexattn.semantics import apply_op
    from flexattn.ir import DType

    x = torch.tensor([1.0, -1.0], dtype=torch.float64)
    positive, negative = (apply_op(Op.TRUEDIV, DType.FLOAT32, [x, zero]) for zero in (0.0, -0.0))
    assert positive.tolist() == [float("inf"), float("-inf")] and negative.tolist() == [float("-inf"), float("inf")]
    assert apply_op(Op.ADD, DType.FLOAT32, [x, 0.1]).dtype == torch.float64  # the constant exact in float64
    n = torch.tensor([2, 3])
    assert apply_op(Op.ADD, DType.INT64, [n, 1]).tolist() == [3, 4]
    assert apply_op(Op.ADD, DType.INT64, [n, True]).tolist() == [3, 4]
