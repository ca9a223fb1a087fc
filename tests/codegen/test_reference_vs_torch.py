"""The dense reference equals torch's flex_attention (eager, float32)."""

import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

import flexattn

L, S, D = 200, 200, 16
DOC_ID = torch.repeat_interleave(torch.arange(4), torch.tensor([37, 80, 3, 80]))
SLOPES = torch.exp2(-torch.arange(1, 5, dtype=torch.float32))
REL_BIAS = torch.randn(4, 2 * 200 - 1, generator=torch.Generator().manual_seed(1))


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 48)


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < 40) | (q_idx >= kv_idx)


def document(b, h, q_idx, kv_idx):
    return (DOC_ID[q_idx] == DOC_ID[kv_idx]) & (q_idx >= kv_idx)


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def relative_bias(score, b, h, q_idx, kv_idx):
    return score + REL_BIAS[h, q_idx - kv_idx + 199]


CASES = [
    ("causal", None, causal), ("sliding_window", None, sliding_window), ("prefix_lm", None, prefix_lm),
    ("document", None, document), ("alibi", alibi, causal), ("softcap", softcap, None),
    ("relative_bias", relative_bias, None),
]


def _inputs(hq, hkv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, hq, L, D, generator=g), torch.randn(2, hkv, S, D, generator=g),
            torch.randn(2, hkv, S, D, generator=g))


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("name,score_mod,mask_mod", CASES, ids=[c[0] for c in CASES])
def test_reference_matches_torch_flex_attention(name, score_mod, mask_mod, gqa):
    q, k, v = _inputs(4, 2 if gqa else 4)
    ours_mask = theirs_mask = None
    if mask_mod is not None:
        ours_mask = flexattn.create_block_mask(mask_mod, 2, 4, L, S, BLOCK_SIZE=64)
        theirs_mask = torch_flex.create_block_mask(mask_mod, 2, 4, L, S, device="cpu", BLOCK_SIZE=64)
    out, lse = flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=ours_mask, enable_gqa=gqa,
                                       return_lse=True, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ref_aux = torch_flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=theirs_mask,
                                                 enable_gqa=gqa, return_aux=torch_flex.AuxRequest(lse=True))
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5
    torch.testing.assert_close(lse, ref_aux.lse, rtol=1e-5, atol=1e-5)


def test_aux_request_returns_lse_and_max_scores():
    """torch cannot return max_scores on CPU, so max_scores is checked against its definition."""
    q, k, v = _inputs(4, 4)
    bm = flexattn.create_block_mask(causal, None, None, L, S)
    out, aux = flexattn.flex_attention(q, k, v, block_mask=bm, backend="reference",
                                       return_aux=flexattn.AuxRequest(lse=True, max_scores=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ref_aux = torch_flex.flex_attention(
            q, k, v, block_mask=torch_flex.create_block_mask(causal, None, None, L, S, device="cpu"),
            return_aux=torch_flex.AuxRequest(lse=True))
    scores = (q @ k.transpose(-1, -2)) / D ** 0.5
    scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux.lse, ref_aux.lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux.max_scores, scores.amax(-1), rtol=1e-5, atol=1e-5)
    assert flexattn.flex_attention(q, k, v, return_aux=flexattn.AuxRequest(), backend="reference")[1] == (None, None)


def test_fully_masked_rows_give_zero_output_and_minus_inf_lse():
    q, k, v = _inputs(2, 2)
    empty_rows = lambda b, h, q_idx, kv_idx: (q_idx >= 100) & (kv_idx < 10)  # noqa: E731
    bm = flexattn.create_block_mask(empty_rows, None, None, L, S, BLOCK_SIZE=32)
    out, lse = flexattn.flex_attention(q, k, v, block_mask=bm, return_lse=True, backend="reference")
    assert torch.all(out[:, :, :100] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :100]))
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 100:]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    q, k, v = (t.to(dtype) for t in _inputs(2, 2))
    out = flexattn.flex_attention(q, k, v, score_mod=softcap, backend="reference")
    expect = flexattn.flex_attention(q.float(), k.float(), v.float(), score_mod=softcap, backend="reference")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expect, rtol=2e-2, atol=2e-2)


def test_different_lengths_and_value_dim_and_scale():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, 70, 8, generator=g), torch.randn(1, 2, 150, 8, generator=g), torch.randn(1, 2, 150, 24, generator=g)
    bm = flexattn.create_block_mask(causal, 1, 2, 70, 150, BLOCK_SIZE=32)
    out = flexattn.flex_attention(q, k, v, block_mask=bm, scale=0.3, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch_flex.flex_attention(q, k, v, block_mask=torch_flex.create_block_mask(
            causal, 1, 2, 70, 150, device="cpu", BLOCK_SIZE=32), scale=0.3)
    assert out.shape == (1, 2, 70, 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mod", [causal, sliding_window, prefix_lm, document, alibi])
def test_create_mask_equals_torch(mod):
    ours = flexattn.create_mask(mod, 2, 4, 90, 130)
    theirs = torch_flex.create_mask(mod, 2, 4, 90, 130, device="cpu")
    assert torch.equal(ours, theirs.expand_as(ours))
