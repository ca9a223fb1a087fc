"""merge_attention: attention over disjoint parts of the keys, merged, equals attention over all of
them, values and gradients (against the dense reference), rows empty in some or every part included."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import flexattn


def _attend(q, k, v, offset, window):
    """(out, lse) of the reference over keys [offset, offset + S) with a causal window mask."""
    S = k.shape[2]
    mask = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (kv_idx + offset <= q_idx + 40)
                                      & (q_idx + 40 - kv_idx - offset < window), None, None, q.shape[2], S,
                                      BLOCK_SIZE=8)
    out, aux = flexattn.flex_attention(q, k, v, block_mask=mask, backend="reference",
                                       return_aux=flexattn.AuxRequest(lse=True))
    return out, aux.lse


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 24), S=st.integers(2, 60), cuts=st.lists(st.floats(0.05, 0.95), min_size=1, max_size=3),
       window=st.sampled_from([3, 20, 1000]), seed=st.integers(0, 999))
def test_merged_parts_equal_attention_over_all_keys(L, S, cuts, window, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, L, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, S, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bounds = sorted({0, S, *(max(1, min(S - 1, round(c * S))) for c in cuts)})
    parts = [_attend(q, k[:, :, a:b], v[:, :, a:b], a, window) for a, b in zip(bounds[:-1], bounds[1:])]
    out, lse = flexattn.merge_attention([o for o, _ in parts], [l for _, l in parts])
    want, want_lse = _attend(q, k, v, 0, window)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    finite = torch.isfinite(want_lse)
    loss = lambda o, l: (o * weights).sum() + torch.where(finite, l, 0.0).sum()  # noqa: E731
    ours = torch.autograd.grad(loss(out, lse), (q, k, v))
    theirs = torch.autograd.grad(loss(want, want_lse), (q, k, v))
    for a, b in zip(ours, theirs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_a_count_mismatch_raises():
    with pytest.raises(ValueError, match="one lse per output"):
        flexattn.merge_attention([torch.zeros(1, 1, 2, 4)], [])
