"""Random mod programs (hypothesis), run through flexattn and torch.

An expression grammar over the index inputs (b, h, q_idx, kv_idx), integer constants,
captured tensors (int, bool and float tables, indexed in range with ``% n``) and torch
elementwise ops builds the source of a mask_mod (integer arithmetic, comparisons, boolean
algebra, ``where``) and of a score_mod (bounded float functions of the score, of the
indices and of the tables). Conditions read only integers, so float32 rounding can never
flip a branch between the libraries.

Checks: ``create_mask`` exactly, ``create_block_mask`` tile by tile (full / partial /
empty, via to_dense() and the index lists), ``flex_attention`` output and LSE against
torch, and gradients (q, k, v and a captured float table) against a float64 reference.
Examples are derandomized, so a failure found here is found on every run.
"""

import functools

import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from conformance_helpers import (Case, assert_forward_matches_torch, assert_gradients_match_reference,
                                 case_qkv, check_block_mask, check_create_mask, qkv, reference)

G = torch.Generator().manual_seed(11)
NAMESPACE = {
    "torch": torch,
    "ITAB": torch.randint(0, 40, (64,), generator=G),
    "ITAB2": torch.randint(-20, 20, (5, 64), generator=G),
    "BTAB": torch.rand(64, generator=G) < 0.5,
    "FTAB": torch.randn(64, generator=G),
    "ITAB3": torch.randint(-20, 20, (64, 4), generator=G),  # rows: tensor-valued intermediates
    "STAB": torch.randint(-10, 120, (12,), generator=G).sort().values,  # sorted: searchsorted's sequence
}
PARAM = torch.randn(4, 64, generator=G)  # the learnable table of the gradient fuzz, read as P[h % 4, ...]

CMPS = ["<", "<=", ">", ">=", "==", "!="]
# No shrinking: a strict xfail must fail in bounded time; the first failing example is reported as is.
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False)


def binary(t):
    return f"({t[0]} {t[1]} {t[2]})"


def call(name):
    return lambda args: f"{name}({', '.join(map(str, args if isinstance(args, tuple) else (args,)))})"


INDEX_LEAVES = st.sampled_from(["q_idx", "kv_idx", "b", "h", "(kv_idx - q_idx)", "(q_idx + 3 * kv_idx)"])


def constant(low, high):
    return st.integers(low, high).map(str)


@functools.lru_cache(None)
def ints(depth):
    """Integer index expressions (every one reads an index, so each is a tensor)."""
    if depth == 0:
        return INDEX_LEAVES
    sub = ints(depth - 1)
    right_operands = {"+": st.one_of(sub, constant(-5, 40)), "-": sub, "*": constant(-3, 9), "//": constant(1, 9),
                      "%": constant(1, 9), "&": constant(0, 15), "|": constant(0, 15), "^": constant(0, 15),
                      ">>": constant(0, 3), "<<": constant(0, 3)}
    arithmetic = [st.tuples(sub, st.just(op), rhs).map(binary) for op, rhs in right_operands.items()]
    calls = [sub.map(call("torch.abs")), st.tuples(sub, sub).map(call("torch.minimum")),
             st.tuples(sub, sub).map(call("torch.maximum")),
             st.tuples(sub, constant(-10, 0), constant(1, 60)).map(call("torch.clamp")),
             st.tuples(bools(depth - 1), sub, sub).map(call("torch.where"))]
    lookups = [sub.map("ITAB[({}) % 64]".format), st.tuples(sub, sub).map("ITAB2[({0[0]}) % 5, ({0[1]}) % 64]".format),
               # tensor-valued intermediates: a row of ITAB3 reduced, a sorted table searched
               st.tuples(sub, st.sampled_from(["sum()", "amax(0)", "amin(-1)"])).map(
                   "ITAB3[({0[0]}) % 64].{0[1]}".format),
               st.tuples(sub, st.booleans()).map("torch.searchsorted(STAB, {0[0]}, right={0[1]})".format)]
    return st.one_of(INDEX_LEAVES, *arithmetic, *calls, *lookups)


@functools.lru_cache(None)
def bools(depth):
    """Boolean expressions: a mask_mod's body."""
    cmp = st.tuples(ints(depth), st.sampled_from(CMPS),
                    st.one_of(ints(depth), st.integers(-10, 250).map(str))).map(binary)
    leaf = st.one_of(cmp, ints(depth).map("BTAB[({}) % 64]".format))
    if depth == 0:
        return leaf
    sub = bools(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(sub, st.sampled_from(["&", "|", "^"]), sub).map(binary),
        sub.map("(~{})".format),
        st.tuples(sub, sub, sub).map(call("torch.where")),
    )


@functools.lru_cache(None)
def floats(depth, table="FTAB[({}) % 64]"):
    """Float expressions of the score, bounded functions of the indices, and table reads."""
    leaf = st.one_of(st.just("score"), ints(1).map("torch.sin(({}) * 0.1)".format), ints(1).map(table.format))
    if depth == 0:
        return leaf
    sub = floats(depth - 1, table)
    constant = st.floats(-2, 2).map(lambda x: f"{x:.3f}")
    return st.one_of(
        leaf,
        st.tuples(sub, st.sampled_from(["+", "-", "*"]), st.one_of(sub, constant)).map(binary),
        st.sampled_from(["torch.tanh", "torch.sigmoid", "torch.cos", "torch.sin"]).flatmap(
            lambda f: sub.map(call(f))),
        sub.map("torch.exp(-torch.abs({}))".format),
        sub.map("torch.sqrt(torch.abs({}) + 1)".format),
        sub.map("torch.log(torch.abs({}) + 1)".format),
        sub.map("torch.clamp({}, -3.0, 3.0)".format),
        st.tuples(sub, sub).map(lambda t: f"({t[0]} / (torch.abs({t[1]}) + 1))"),
        st.tuples(sub, sub).map(call("torch.maximum")),
        st.tuples(bools(1), sub, sub).map(call("torch.where")),
        st.tuples(bools(1), sub).map(lambda t: f"torch.where({t[0]}, {t[1]}, float('-inf'))"),
    )


def as_mask_mod(body):
    return eval(f"lambda b, h, q_idx, kv_idx: {body}", dict(NAMESPACE))  # noqa: S307


def as_score_mod(body, **tables):
    return eval(f"lambda score, b, h, q_idx, kv_idx: {body}", {**NAMESPACE, **tables})  # noqa: S307


SIZES = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(16, 300), st.integers(16, 300))
BLOCKS = st.sampled_from([16, 32, 64, 128, (16, 32), (32, 16), (64, 32)])


@settings(FUZZ, max_examples=60)
@given(body=bools(2), sizes=SIZES, block=BLOCKS)
def test_fuzz_mask_structure(body, sizes, block):
    """create_mask and create_block_mask of a random mask_mod equal torch's."""
    mask_mod = as_mask_mod(body)
    check_create_mask(mask_mod, *sizes)
    check_block_mask(mask_mod, *sizes, block)


@settings(FUZZ, max_examples=40)
@given(body=floats(2), sizes=SIZES)
def test_fuzz_score_create_mask(body, sizes):
    """create_mask of a score_mod: True where the modified score of a zero score is not -inf."""
    check_create_mask(as_score_mod(body), *sizes)


LAYOUTS = st.permutations(range(4)).map(tuple)  # the order a tensor's dims are stored in memory


@settings(FUZZ, max_examples=25)
@given(score=st.one_of(st.none(), floats(2)), mask=st.one_of(st.none(), bools(1)),
       heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]), lengths=st.tuples(st.integers(1, 200), st.integers(16, 200)),
       block=BLOCKS,
       layouts=st.one_of(st.none(), st.tuples(LAYOUTS, LAYOUTS, LAYOUTS)))
def test_fuzz_attention(score, mask, heads, lengths, block, layouts):
    """flex_attention's output and LSE equal torch's for a random score_mod and mask_mod, on q, k, v
    stored in any memory layout (torch's fused CPU kernel misreads some: flexattn must not)."""
    hq, hkv = heads
    q, k, v = qkv(2, hq, *lengths, 8, Hkv=hkv, layouts=layouts)
    mask_mod = None if mask is None else as_mask_mod(mask)
    score_mod = None if score is None else as_score_mod(score)
    assert_forward_matches_torch(q, k, v, score_mod, mask_mod, 2, hq, block, enable_gqa=hq != hkv)


@settings(FUZZ, max_examples=20)
@given(score=floats(2, table="P[h % 4, ({}) % 64]"), mask=st.one_of(st.none(), bools(1)),
       lengths=st.tuples(st.integers(16, 128), st.integers(16, 128)))
def test_fuzz_gradients(score, mask, lengths):
    """Gradients for q, k, v and a captured learnable table equal the float64 reference's."""
    def build(table):
        return as_score_mod(score, P=table), None if mask is None else as_mask_mod(mask)
    case = Case("fuzz", build, (PARAM,), B=2, H=2, L=lengths[0], S=lengths[1], D=8)
    # A program whose scores reach +inf or NaN (sqrt(abs(-inf))) has a NaN output in torch too, and
    # no gradient to compare: such programs are not drawn.
    score_mod, mask_mod, _ = case.mods(torch.float64)
    q, k, v = case_qkv(case, dtype=torch.float64)
    assume(not torch.isnan(reference(q, k, v, score_mod, mask_mod)[0]).any())
    assert_gradients_match_reference(case)
