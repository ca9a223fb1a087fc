"""dense_scores: a decoding step's whole score matrix with its score_mod in torch ops, against the reference."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from mods import MODS

import flexattn
from flexattn import dispatch
from flexattn.trace import trace_mask_mod, trace_score_mod

LAYOUTS = ["contiguous", "heads inner", "one cache for the batch"]


def _run(backend, q, k, v, block_mask, score_mod=None, max_scores=False, **options):
    mask = trace_mask_mod(block_mask.mask_mod) if block_mask is not None else None
    score = trace_score_mod(score_mod) if score_mod is not None else None
    return dispatch.run(backend, dispatch.call_of(
        q, k, v, score_graph=score.graph if score else None, score_buffers=score.buffers if score else (),
        mask_graph=mask.graph if mask else None, mask_buffers=mask.buffers if mask else (),
        block_mask=block_mask, scale=q.shape[-1] ** -0.5, enable_gqa=True, kernel_options=options,
        max_scores=max_scores))


def _qkv(B, Hq, Hkv, L, S, dtype, layout):
    torch.manual_seed(0)
    q = torch.randn(B, Hq, L, 16, dtype=dtype)
    k, v = torch.randn(B, Hkv, S, 16, dtype=dtype), torch.randn(B, Hkv, S, 12, dtype=dtype)
    if layout == "heads inner":
        k, v = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "one cache for the batch":
        k, v = k[:1].expand(B, -1, -1, -1), v[:1].expand(B, -1, -1, -1)
    return q, k, v


@settings(max_examples=80, deadline=None)
@given(case=st.sampled_from(MODS), L=st.sampled_from([1, 2, 5, 16, 33]), S=st.integers(1, 300),
       kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]), B=st.integers(1, 2),
       per_head=st.booleans(), q_block=st.sampled_from([1, 16, 128]), kv_block=st.sampled_from([16, 128]),
       layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_dense_scores_matches_reference(case, L, S, kv_heads, group, B, per_head, q_block, kv_block, layout, dtype):
    """dense_scores (forced) equals the reference in out, lse and max_scores, with any score_mod and
    mask, GQA, a value head dim unlike the key's, and keys no row attends holding NaN (a paged pool's
    free pages): they must not reach the result (the reference runs on zeros there)."""
    Hq = kv_heads * group
    mods = case.build(L, S, Hq)
    q, k, v = _qkv(B, Hq, kv_heads, L, S, dtype, layout)
    block_mask = None
    if mods.mask_mod is not None:
        shift, inner = max(S - L, 0), mods.mask_mod  # the queries are the last L positions, as in decoding
        mask_mod = lambda b, h, q_idx, kv_idx: inner(b, h, q_idx + shift, kv_idx)  # noqa: E731
        block_mask = flexattn.create_block_mask(mask_mod, B, Hq if per_head else None, L, S,
                                                BLOCK_SIZE=(q_block, kv_block))
    if block_mask is not None and layout != "one cache for the batch":
        kept = flexattn.create_mask(block_mask.mask_mod, B, Hq, L, S)
        unread = ~kept.reshape(B, kv_heads, group * L, S).any(dim=2).unsqueeze(-1)  # (B, Hkv, S, 1)
        want = _run("reference", q, k.masked_fill(unread, 0.0), v.masked_fill(unread, 0.0), block_mask,
                    mods.score_mod, max_scores=True)
        k, v = k.masked_fill(unread, float("nan")), v.masked_fill(unread, float("nan"))
    else:
        want = _run("reference", q, k, v, block_mask, mods.score_mod, max_scores=True)
    got = _run("torch", q, k, v, block_mask, mods.score_mod, max_scores=True, PATH="dense_scores")
    tol = 1e-5 if dtype != torch.bfloat16 else 2e-2
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=tol, atol=tol)
    assert got[0].dtype == dtype
    for got_row, want_row in ((got[1], want[1]), (got[2], want[2])):  # lse, max_scores
        assert torch.equal(torch.isneginf(got_row), torch.isneginf(want_row))
        torch.testing.assert_close(got_row.float(), want_row.float(), rtol=1e-4, atol=1e-4)


def test_a_score_mod_not_finite_where_the_mask_drops_does_not_reach_the_softmax():
    """flex attention masks after the score_mod: a score_mod that gives NaN at dropped positions
    (a log of a negative distance there) leaves kept ones exact."""
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    causal = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx + 47 >= kv_idx, None, None, 3, 50,
                                        BLOCK_SIZE=16)
    score_mod = lambda s, b, h, q_idx, kv_idx: s - torch.log(q_idx + 47 - kv_idx + 1.0)  # noqa: E731
    got = _run("torch", q, k, v, causal, score_mod, PATH="dense_scores")
    want = _run("reference", q, k, v, causal, score_mod)
    assert torch.isfinite(got[0]).all()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_decoding_steps_with_a_score_mod_take_the_whole_matrix():
    softcap = lambda s, b, h, q_idx, kv_idx: 30.0 * torch.tanh(s / 30.0)  # noqa: E731
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 1100, 16), torch.randn(2, 2, 1100, 16)
    causal = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx + 1099 >= kv_idx, None, None, 1, 1100)
    with torch.no_grad():
        choice = flexattn.explain_call(q, k, v, score_mod=softcap, block_mask=causal, enable_gqa=True,
                                       print_it=False)
        assert choice.path.name == "dense_scores"
        assert "dense_scores serves it" in dict(choice.skipped)["decode_batch_in_place"]
        out = flexattn.flex_attention(q, k, v, score_mod=softcap, block_mask=causal, enable_gqa=True)
        want = flexattn.flex_attention(q, k, v, score_mod=softcap, block_mask=causal, enable_gqa=True,
                                       backend="reference")
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        window = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 1100 - 256, None, None, 1, 1100)
        choice = flexattn.explain_call(q, k, v, score_mod=softcap, block_mask=window, enable_gqa=True,
                                       print_it=False)
        assert choice.path.name.startswith("decode_")  # EMPTY tiles: split-KV skips them
        prompt = torch.randn(1, 2, 200, 16)  # longer queries: the tiled paths
        choice = flexattn.explain_call(prompt, prompt, prompt, score_mod=softcap, print_it=False)
        assert "not a decoding shape" in dict(choice.skipped)["dense_scores"]
    q.requires_grad_(True)  # forward only: a training call keeps the paths with a backward
    choice = flexattn.explain_call(q, k, v, score_mod=softcap, block_mask=causal, enable_gqa=True, print_it=False)
    assert choice.path.name != "dense_scores" and "forward only" in dict(choice.skipped)["dense_scores"]


def test_a_long_cache_with_nan_values_where_no_row_reads():
    """A NaN value where no row reads (a long cache, left padding) is zeroed, never multiplied."""
    B, Hkv, S = 2, 2, 8192
    q, k, v = torch.randn(B, 4, 1, 16), torch.randn(B, Hkv, S, 16), torch.randn(B, Hkv, S, 16)
    padded = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 30 * (1 - b), B, None, 1, S)
    unread = (torch.arange(S) < 30).view(1, 1, S, 1) & (torch.arange(B) == 0).view(B, 1, 1, 1)
    bias = lambda s, b, h, q_idx, kv_idx: s + 0.01 * (q_idx - kv_idx)  # noqa: E731
    want = _run("reference", q, k, v.masked_fill(unread, 0.0), padded, bias)
    with torch.no_grad():
        got = _run("torch", q, k.masked_fill(unread, float("nan")), v.masked_fill(unread, float("nan")), padded,
                   bias)
    assert flexattn.explain_call(q, k, v, score_mod=bias, block_mask=padded, enable_gqa=True,
                                 print_it=False).path.name == "dense_scores"
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


def _torch_flex(q, k, v, score_mod, mask_mod, B, L, S):
    from torch.nn.attention import flex_attention as tfa

    torch._dynamo.reset()  # torch's eager flex runs through dynamo, whose cache can mix closures
    block_mask = tfa.create_block_mask(mask_mod, B, None, L, S, device="cpu")
    with torch.no_grad():
        out, aux = tfa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                                      return_aux=tfa.AuxRequest(lse=True))
    return out, aux.lse


@pytest.mark.parametrize("S", [80, 1100])
@pytest.mark.parametrize("mod", ["softcap", "relative bias"])
def test_dense_scores_equals_torch_flex_attention(S, mod):
    """A decoding step as transformers makes it (left padding, GQA) with a score_mod: out and lse
    equal torch's own flex_attention's, on the path dense_scores."""
    B, L = 2, 1
    table = torch.linspace(-1.0, 1.0, 2 * S)
    score_mod = {"softcap": lambda s, b, h, q_idx, kv_idx: 30.0 * torch.tanh(s / 30.0),
                 "relative bias": lambda s, b, h, q_idx, kv_idx: s + table[q_idx - kv_idx + S] * (h + 1)}[mod]

    def padded_causal(b, h, q_idx, kv_idx):
        return (q_idx + S - 1 >= kv_idx) & (kv_idx >= 16 * (1 - b))

    torch.manual_seed(0)
    q, k, v = torch.randn(B, 4, L, 16), torch.randn(B, 2, S, 16), torch.randn(B, 2, S, 16)
    block_mask = flexattn.create_block_mask(padded_causal, B, None, L, S)
    with torch.no_grad():
        choice = flexattn.explain_call(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                                       print_it=False)
        out, aux = flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                                           return_aux=flexattn.AuxRequest(lse=True))
    assert choice.path.name == "dense_scores"
    want_out, want_lse = _torch_flex(q, k, v, score_mod, padded_causal, B, L, S)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux.lse, want_lse, rtol=1e-5, atol=1e-5)
