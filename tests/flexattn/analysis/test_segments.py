"""Segment masks: recognised only when the mask is exactly documents (causal or not), and then
the documents' squares are exactly the mask."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexattn
from flexattn.analysis.segments import segment_mask

FORMS = {
    "causal documents": "(ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)",
    "documents": "ids[kv_idx] == ids[q_idx]",
    "reversed causal": "(kv_idx <= q_idx) & (ids[q_idx] == ids[kv_idx])",
    "window": "(ids[q_idx] == ids[kv_idx]) & (q_idx - kv_idx < 3)",
    "two buffers": "(ids[q_idx] == other[kv_idx]) & (q_idx >= kv_idx)",
    "shifted": "(ids[q_idx] == ids[kv_idx + 1]) & (q_idx >= kv_idx)",
}


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, 4), min_size=1, max_size=40), form=st.sampled_from(sorted(FORMS)))
def test_recognised_segments_are_exactly_the_mask(ids, form):
    ids_t, other = torch.tensor(ids), torch.tensor(ids).flip(0)
    mask_mod = eval(f"lambda b, h, q_idx, kv_idx: {FORMS[form]}", {"ids": ids_t, "other": other})  # noqa: S307
    traced = flexattn.trace_mask_mod(mask_mod)
    found = segment_mask(traced.graph)
    assert (found is not None) == (form in ("causal documents", "documents", "reversed causal"))
    runs = found.segments(traced.buffers, len(ids)) if found else None
    if runs is None:
        return
    expected = flexattn.create_mask(mask_mod, 1, 1, len(ids), len(ids))[0, 0]
    built = torch.zeros(len(ids), len(ids), dtype=torch.bool)
    for start, stop in runs:
        block = torch.ones(stop - start, stop - start, dtype=torch.bool)
        built[start:stop, start:stop] = block.tril() if found.causal else block
    assert torch.equal(built, expected)


def test_nan_ids_are_not_documents():
    """A NaN id equals nothing, not even itself: its position sees no key, which no run of documents is."""
    ids = torch.tensor([0.0, 0.0, float("nan"), 1.0])
    found = segment_mask(flexattn.trace_mask_mod(lambda b, h, q_idx, kv_idx: ids[q_idx] == ids[kv_idx]).graph)
    assert found is not None and found.segments([ids], 4) is None
