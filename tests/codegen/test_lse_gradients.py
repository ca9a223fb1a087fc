"""The returned log-sum-exp is differentiable in every back end and path, as torch's is.

Each case builds a loss that uses the lse (attention sinks, a z-loss, two calls merged by their
lse) and compares every gradient with a dense float64 autograd of the same formula.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexattn
from lse_cases import BIAS, MASKS, SCORE_MODS, dense_attention, grads, make_case, sink_loss


@pytest.mark.parametrize("backend,options", [
    ("reference", {}), ("torch", {"FUSED": False}), ("torch", {"FUSED": True}), ("torch", {})])
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), score=st.sampled_from(sorted(SCORE_MODS)), mask=st.sampled_from(sorted(MASKS)),
       B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2]), L=st.integers(1, 40),
       S=st.integers(1, 40))
def test_lse_gradients_match_dense_autograd(backend, options, seed, score, mask, B, Hkv, group, L, S):
    q, k, v, sinks = make_case(seed, B, Hkv, group, L, S, torch.float64)
    bias = BIAS.clone().requires_grad_()
    score_mod, mask_mod = SCORE_MODS[score](bias), MASKS[mask]
    block_mask = flexattn.create_block_mask(mask_mod, None, None, L, S, BLOCK_SIZE=16) if mask_mod else None
    out, aux = flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=group > 1,
                                       return_aux=flexattn.AuxRequest(lse=True), backend=backend,
                                       kernel_options=dict(options, BLOCK_SIZE=16))
    wrt = [q, k, v, sinks, bias]
    got = grads(sink_loss(out, aux.lse, sinks), wrt)
    ref_out, ref_lse = dense_attention(q, k, v, score_mod, mask_mod)
    want = grads(sink_loss(ref_out, ref_lse, sinks), wrt)
    torch.testing.assert_close(aux.lse, ref_lse)
    for name, a, b in zip("q k v sinks bias".split(), got, want):
        if b is None:
            continue
        assert a is not None, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=name)


def test_two_calls_merged_by_their_lse_train_like_one_call():
    """Attention over [keys_a, keys_b] equals the lse-weighted merge of two calls, gradients too."""
    q, k, v, _ = make_case(0, 1, 2, 1, 24, 48, torch.float32)
    whole = flexattn.flex_attention(q, k, v)
    (oa, la), (ob, lb) = (flexattn.flex_attention(q, k[:, :, part], v[:, :, part], return_aux=flexattn.AuxRequest(lse=True))
                          for part in (slice(0, 20), slice(20, 48)))
    la, lb = la.lse, lb.lse
    lse = torch.logaddexp(la, lb)
    merged = oa * torch.exp(la - lse).unsqueeze(-1) + ob * torch.exp(lb - lse).unsqueeze(-1)
    torch.testing.assert_close(merged, whole)
    for a, b in zip(grads(merged.square().sum(), [q, k, v]), grads(whole.square().sum(), [q, k, v])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_max_scores_are_not_differentiable_like_torch():
    q, k, v, _ = make_case(1, 1, 1, 1, 8, 8, torch.float32)
    out, aux = flexattn.flex_attention(q, k, v, return_aux=flexattn.AuxRequest(lse=True, max_scores=True))
    assert aux.lse.requires_grad and not aux.max_scores.requires_grad

