"""Separable score biases: the terms add up to the score_mod's bias exactly; other score_mods give None."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexattn.analysis.separable import separate
from flexattn.semantics import evaluate
from flexattn.trace import trace_score_mod

SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])
TABLE = torch.tensor([1.5, -2.0, 0.25, 3.0, -0.5, 1.0, 2.5, -1.25] * 8)

ROW = ["q_idx", "SLOPES[h]", "(q_idx % 5)", "TABLE[q_idx]", "(b + 1)", "0.5"]
COLUMN = ["kv_idx", "TABLE[kv_idx]", "(kv_idx // 3)", "(kv_idx * 2 - 7)"]
MIXED = ["(kv_idx - q_idx)", "(q_idx - kv_idx) * SLOPES[h]", "(kv_idx + q_idx)"]
OPAQUE = ["torch.abs(kv_idx - q_idx)", "torch.tanh(score / 5.0) * 5.0 - score", "score * 0.5",
          "(q_idx * kv_idx) % 7", "torch.where(q_idx > kv_idx, 1.0, 0.0)"]


@st.composite
def biases(draw):
    def product():
        return "(" + " * ".join(draw(st.lists(st.sampled_from(ROW + COLUMN + MIXED), min_size=1, max_size=2))) + ")"
    terms = [product() for _ in range(draw(st.integers(1, 3)))]
    if draw(st.integers(0, 3)) == 0:  # now and then a term that is not separable
        terms.append(draw(st.sampled_from(OPAQUE)))
    signs = draw(st.lists(st.sampled_from(["+", "-"]), min_size=len(terms), max_size=len(terms)))
    return " ".join(f"{s} {t}" for s, t in zip(signs, terms))


def _grid():
    return {"b": torch.arange(2).view(-1, 1, 1, 1), "h": torch.arange(4).view(1, -1, 1, 1),
            "q_idx": torch.arange(60).view(1, 1, -1, 1), "kv_idx": torch.arange(60).view(1, 1, 1, -1)}


@settings(max_examples=150, deadline=None)
@given(bias=biases())
def test_terms_add_up_to_the_bias(bias):
    score_mod = eval(f"lambda score, b, h, q_idx, kv_idx: score {bias if bias[0] == '-' else '+ ' + bias}",  # noqa: S307
                     {"torch": torch, "SLOPES": SLOPES, "TABLE": TABLE})
    traced = trace_score_mod(score_mod)
    form = separate(traced.graph)
    if form is None:
        return
    env = _grid()
    scores = torch.randn(2, 4, 60, 60, dtype=torch.float64)
    expected = evaluate(traced.graph, {**env, "score": scores.float()}, traced.buffers).double()
    total = scores.clone()
    for term in form.terms:
        total = total + term.sign * form.factor(term.rows, env, traced.buffers) * form.factor(term.columns, env,
                                                                                           traced.buffers)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-3)


def test_alibi_is_one_product_and_one_row_term():
    slopes = SLOPES
    form = separate(trace_score_mod(lambda score, b, h, q_idx, kv_idx: score + slopes[h] * (kv_idx - q_idx)).graph)
    assert len(form.products) == 1 and len(form.terms) == 2


def test_non_additive_score_mods_are_not_separable():
    for score_mod in (lambda s, b, h, q, kv: torch.tanh(s / 30.0) * 30.0, lambda s, b, h, q, kv: s * 2.0,
                      lambda s, b, h, q, kv: s + torch.abs(q - kv).float()):
        assert separate(trace_score_mod(score_mod).graph) is None
