"""Random mask programs (hypothesis strategies) over the ops the block-mask analysis reasons about:
affine index forms, //, %, *, bit ops, abs, min, 1-D and 2-D buffer lookups, and/or/xor/not, where."""

import torch
from hypothesis import strategies as st

DOC = torch.repeat_interleave(torch.arange(5), torch.tensor([13, 40, 3, 29, 60]))
TABLE = torch.tensor([[0, 3, 1, 4], [1, 5, 9, 2], [6, 5, 3, 5]])
BIAS = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4] * 4)  # unsorted, unlike DOC
NAMESPACE = {"torch": torch, "DOC": DOC, "TABLE": TABLE, "BIAS": BIAS}


def as_mask_mod(expr: str):
    return eval(f"lambda b, h, q_idx, kv_idx: {expr}", dict(NAMESPACE))  # noqa: S307


def int_expr(depth):
    leaf = st.sampled_from(["q_idx", "kv_idx", "b", "h", "(q_idx - kv_idx)", "(kv_idx - 2 * q_idx)"])
    if depth == 0:
        return leaf
    sub = int_expr(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(sub, st.sampled_from(["+", "-"]), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, st.sampled_from(["//", "%", "*"]), st.integers(1, 9)).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, st.sampled_from(["&", "|", "^", ">>"]), st.integers(0, 7)).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        sub.map(lambda a: f"torch.abs({a})"), sub.map(lambda a: f"DOC[{a}]"), sub.map(lambda a: f"BIAS[{a}]"),
        st.tuples(sub, sub).map(lambda t: f"TABLE[{t[0]}, {t[1]}]"),
        st.tuples(sub, sub).map(lambda t: f"torch.minimum({t[0]}, {t[1]})"),
    )


def mask_expr(depth):
    cmp = st.tuples(int_expr(2), st.sampled_from(["<", "<=", ">", ">=", "==", "!="]),
                    st.one_of(int_expr(1), st.integers(-20, 60).map(str))).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
    if depth == 0:
        return cmp
    sub = mask_expr(depth - 1)
    return st.one_of(
        cmp,
        st.tuples(sub, st.sampled_from(["&", "|", "^"]), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        sub.map(lambda a: f"(~{a})"),
        st.tuples(sub, sub, sub).map(lambda t: f"torch.where({t[0]}, {t[1]}, {t[2]})"),
        st.tuples(sub, int_expr(1)).map(lambda t: f"torch.where({t[0]}, {t[1]} > 3, DOC[q_idx] == DOC[kv_idx])"),
    )
