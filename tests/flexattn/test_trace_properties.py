"""Property tests: a traced program, run by the IR interpreter, equals the same
Python function run directly on real index tensors (values and dtypes)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexattn.semantics import evaluate, index_grid
from flexattn.semantics import TORCH_DTYPES
from flexattn.trace import trace_mask_mod, trace_score_mod

B, H, Q, KV = 2, 3, 7, 9
INT_BUF = torch.tensor([3, -1, 4, 1, -5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2], dtype=torch.int64)
TABLE = torch.arange(33, dtype=torch.int32).view(3, 11) - 10
FLOAT_BUF = torch.linspace(-2.0, 3.0, 13)
BOOL_BUF = torch.tensor([True, False, True, True, False, False, True])
NAMESPACE = {"torch": torch, "ibuf": INT_BUF, "table": TABLE, "fbuf": FLOAT_BUF, "bbuf": BOOL_BUF}


# Leaves are always traced values; constants appear as operands of binary ops,
# so no generated sub-expression is a plain Python number.
def _ints(depth, score=False):
    leaves = st.sampled_from(["q_idx", "kv_idx", "b", "h"])
    if depth == 0:
        return leaves
    i, f, c = _ints(depth - 1, score), _floats(depth - 1, score), _bools(depth - 1, score)
    i_or_const = st.one_of(i, st.sampled_from(["3", "-2", "0", "7"]))
    k = st.sampled_from(["1", "2", "3", "5", "-3"])
    s = st.sampled_from(["0", "1", "3"])
    return st.one_of(
        leaves,
        st.tuples(i, st.sampled_from(["+", "-", "*", "&", "|", "^"]), i_or_const).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(i_or_const, st.sampled_from(["+", "-"]), i).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(i, st.sampled_from(["//", "%"]), k).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(i, st.sampled_from(["<<", ">>"]), s).map(lambda t: f"(({t[0]}) {t[1]} {t[2]})"),
        i.map(lambda a: f"abs({a})"), i.map(lambda a: f"(-{a})"),
        st.tuples(st.sampled_from(["minimum", "maximum"]), i, i).map(lambda t: f"torch.{t[0]}({t[1]}, {t[2]})"),
        st.tuples(c, i, i_or_const).map(lambda t: f"torch.where({t[0]}, {t[1]}, {t[2]})"),
        i.map(lambda a: f"torch.clamp({a}, min=-4, max=6)"),
        f.map(lambda a: f"(({a}).clamp(min=-50.0, max=50.0)).long()"),
        c.map(lambda a: f"({a}).long()"),
        i.map(lambda a: f"({a}).int()"),
        i.map(lambda a: f"ibuf[{a}]"),
        st.tuples(i, i).map(lambda t: f"table[{t[0]}, {t[1]}]"),
        i.map(lambda a: f"ibuf[ibuf[{a}]]"),
    )


def _floats(depth, score=False):
    leaves = st.sampled_from((["score"] if score else []) + ["(q_idx * 0.5)", "(kv_idx / 4)", "fbuf[h]"])
    if depth == 0:
        return leaves
    i, f, c = _ints(depth - 1, score), _floats(depth - 1, score), _bools(depth - 1, score)
    f_or_const = st.one_of(f, st.sampled_from(["0.5", "-1.25", "2.0"]))
    return st.one_of(
        leaves,
        st.tuples(f, st.sampled_from(["+", "-", "*"]), f_or_const).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(f_or_const, st.sampled_from(["-", "/"]), f).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(f, i).map(lambda t: f"({t[0]} * {t[1]})"),
        i.map(lambda a: f"({a} / 3)"), f.map(lambda a: f"({a} / 4.0)"), f.map(lambda a: f"({a} // 1.5)"),
        st.tuples(st.sampled_from(["tanh", "sigmoid", "sin", "cos", "floor", "ceil", "round", "sign", "abs"]), f)
        .map(lambda t: f"torch.{t[0]}({t[1]})"),
        f.map(lambda a: f"torch.exp(torch.tanh({a}))"), f.map(lambda a: f"torch.exp2(torch.tanh({a}))"),
        f.map(lambda a: f"torch.sqrt(torch.abs({a}))"), f.map(lambda a: f"torch.log(torch.abs({a}) + 1)"),
        f.map(lambda a: f"torch.log2(torch.abs({a}) + 1)"), f.map(lambda a: f"torch.rsqrt(torch.abs({a}) + 1)"),
        i.map(lambda a: f"({a}).float()"), i.map(lambda a: f"torch.exp(({a}) * 0.1)"),
        i.map(lambda a: f"fbuf[{a}]"),
        st.tuples(c, f, f_or_const).map(lambda t: f"torch.where({t[0]}, {t[1]}, {t[2]})"),
        st.tuples(c, f).map(lambda t: f"torch.where({t[0]}, {t[1]}, -float('inf'))"),
        st.tuples(f, f).map(lambda t: f"torch.maximum({t[0]}, {t[1]})"),
        f.map(lambda a: f"({a}) ** 2"),
    )


def _bools(depth, score=False):
    leaves = st.sampled_from(["(q_idx >= kv_idx)", "(b == 1)", "(h != 2)"])
    if depth == 0:
        return leaves
    i, f, c = _ints(depth - 1, score), _floats(depth - 1, score), _bools(depth - 1, score)
    return st.one_of(
        leaves,
        st.tuples(i, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), st.one_of(i, st.just("2"))).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(f, st.sampled_from(["<", ">="]), f).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(c, st.sampled_from(["&", "|", "^"]), c).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        c.map(lambda a: f"(~{a})"), c.map(lambda a: f"torch.logical_not({a})"),
        st.tuples(c, c).map(lambda t: f"torch.logical_and({t[0]}, {t[1]})"),
        st.tuples(c, c).map(lambda t: f"torch.logical_or({t[0]}, {t[1]})"),
        f.map(lambda a: f"torch.isnan({a})"), i.map(lambda a: f"bbuf[{a}]"),
    )


def _compare(traced_value, direct_value, dtype):
    direct = torch.as_tensor(direct_value)
    assert TORCH_DTYPES[dtype] == direct.dtype or (dtype.is_float and direct.is_floating_point())
    expect = direct.expand(torch.broadcast_shapes(direct.shape, traced_value.shape))
    got = traced_value.expand_as(expect)
    if expect.is_floating_point():
        torch.testing.assert_close(got, expect, equal_nan=True, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got.to(expect.dtype), expect)


def _direct_inputs(with_score: bool):
    grid = index_grid(B, H, Q, KV)
    if with_score:
        grid["score"] = torch.randn(B, H, Q, KV, generator=torch.Generator().manual_seed(0)) * 3
    return grid


class _Clamped:
    """A buffer for direct evaluation, read as traced mods read one: a negative tensor index counts from
    the end (as in torch), and an index still out of bounds is clamped into them (as IR loads are)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __getitem__(self, item):
        items = item if isinstance(item, tuple) else (item,)
        wrapped = [torch.where(torch.as_tensor(i) < 0, torch.as_tensor(i) + n, i) for i, n in zip(items, self.tensor.shape)]
        return self.tensor[tuple(torch.clamp(i, 0, n - 1) for i, n in zip(wrapped, self.tensor.shape))]


DIRECT_NAMESPACE = {name: _Clamped(v) if isinstance(v, torch.Tensor) else v for name, v in NAMESPACE.items()}


def _run(expr: str, args: str, with_score: bool):
    source = f"lambda {args}: {expr}"
    traced_fn = eval(source, dict(NAMESPACE))  # noqa: S307 - generated test programs
    direct_fn = eval(source, dict(DIRECT_NAMESPACE))  # noqa: S307
    traced = (trace_score_mod if with_score else trace_mask_mod)(traced_fn)
    grid = _direct_inputs(with_score)
    got = evaluate(traced.graph, grid, list(traced.buffers))
    direct = direct_fn(*(grid[name.strip()] for name in args.split(",")))
    _compare(got, direct, traced.graph.output.dtype)


@settings(max_examples=150, deadline=None)
@given(_bools(3))
def test_mask_programs_match_direct_evaluation(expr):
    _run(expr, "b, h, q_idx, kv_idx", with_score=False)


@settings(max_examples=150, deadline=None)
@given(_floats(3, score=True))
def test_score_programs_match_direct_evaluation(expr):
    _run(expr, "score, b, h, q_idx, kv_idx", with_score=True)


def test_partial_indexing_equals_tuple_indexing():
    """table[h][q - kv] and table[h, q - kv] trace to the same load."""
    a = trace_score_mod(lambda s, b, h, q, kv: s + table_row(h)[q - kv])
    b = trace_score_mod(lambda s, b, h, q, kv: s + TABLE[h, q - kv])
    assert a.graph.structural_key() == b.graph.structural_key()


def table_row(h):
    return TABLE[h]
