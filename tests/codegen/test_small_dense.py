"""small_dense: a short call's whole score matrix on torch's fused kernel, against the reference."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import flexattn
from flexattn import dispatch
from flexattn.trace import trace_mask_mod
from mods import MODS


def _run(backend, q, k, v, block_mask, **options):
    mask = trace_mask_mod(block_mask.mask_mod) if block_mask is not None else None
    return dispatch.run(backend, dispatch.call_of(
        q, k, v, mask_graph=mask.graph if mask else None, mask_buffers=mask.buffers if mask else (),
        block_mask=block_mask, scale=q.shape[-1] ** -0.5, enable_gqa=True, kernel_options=options))


def _layout(layout, q, k, v, B):
    if layout == "heads inner":
        k, v = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "head dim outermost":
        q, k, v = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (q, k, v))
    elif layout == "one cache for the batch":
        k, v = k[:1].expand(B, -1, -1, -1), v[:1].expand(B, -1, -1, -1)
    return q, k, v


LAYOUTS = ["contiguous", "heads inner", "head dim outermost", "one cache for the batch"]


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(MODS), L=st.integers(1, 300), S=st.integers(1, 300),
       kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]), B=st.integers(1, 2),
       per_head=st.booleans(), q_block=st.sampled_from([1, 4, 16, 128]), kv_block=st.sampled_from([16, 32, 128]),
       layout=st.sampled_from(LAYOUTS), offset=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_small_dense_matches_reference(case, L, S, kv_heads, group, B, per_head, q_block, kv_block, layout,
                                       offset, dtype):
    """small_dense (forced) on mask-only calls equals the reference for any K/V layout; keys no row
    attends hold NaN (as a paged pool's free pages may) and must not reach the result (the reference,
    which multiplies every value, runs on zeros there)."""
    Hq = kv_heads * group
    mask_mod = case.build(L, S, Hq).mask_mod
    torch.manual_seed(0)
    q = torch.randn(B, Hq, L, 16, dtype=dtype)
    k, v = torch.randn(B, kv_heads, S, 16, dtype=dtype), torch.randn(B, kv_heads, S, 16, dtype=dtype)
    q, k, v = _layout(layout, q, k, v, B)
    block_mask = None
    if mask_mod is not None:
        if offset:  # decode: the queries are the last L positions
            shift, inner = max(S - L, 0), mask_mod
            mask_mod = lambda b, h, q_idx, kv_idx: inner(b, h, q_idx + shift, kv_idx)  # noqa: E731
        block_mask = flexattn.create_block_mask(mask_mod, B, Hq if per_head else None, L, S,
                                                BLOCK_SIZE=(q_block, kv_block))
        kept = flexattn.create_mask(mask_mod, B, Hq, L, S)  # nothing here is FULL against its mask_mod
        unread = ~kept.reshape(B, kv_heads, group * L, S).any(dim=2).unsqueeze(-1)  # (B, Hkv, S, 1)
        if layout != "one cache for the batch":  # there a key unread by one sequence may be read by another
            want = _run("reference", q, k.masked_fill(unread, 0.0), v.masked_fill(unread, 0.0), block_mask)
            k, v = k.masked_fill(unread, float("nan")), v.masked_fill(unread, float("nan"))
    if layout == "one cache for the batch" or block_mask is None:
        want = _run("reference", q, k, v, block_mask)
    got = _run("torch", q, k, v, block_mask, PATH="small_dense")
    tol = 1e-5 if dtype != torch.bfloat16 else 2e-2
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=tol, atol=tol)
    assert got[0].dtype == dtype
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(want[1]))
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(MODS), L=st.integers(1, 70), S=st.integers(1, 70), kv_heads=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 3]), B=st.integers(1, 2), block=st.sampled_from([8, 32]),
       layout=st.sampled_from(LAYOUTS), use_lse=st.booleans())
def test_small_dense_gradients_match_reference(case, L, S, kv_heads, group, B, block, layout, use_lse):
    """Gradients of out and of the lse in q, k and v (float64) equal the reference's."""
    Hq = kv_heads * group
    mask_mod = case.build(L, S, Hq).mask_mod
    g = torch.Generator().manual_seed(L * 1000 + S)
    base = [torch.randn(B, h, n, 8, dtype=torch.float64, generator=g) for h, n in ((Hq, L), (kv_heads, S), (kv_heads, S))]
    block_mask = None if mask_mod is None else flexattn.create_block_mask(mask_mod, B, None, L, S, BLOCK_SIZE=block)
    weights = torch.randn(B, Hq, L, 8, dtype=torch.float64, generator=g), torch.randn(B, Hq, L, dtype=torch.float64, generator=g)
    grads = {}
    for backend, options in (("reference", {}), ("torch", {"PATH": "small_dense"})):
        leaves = [x.clone().requires_grad_(True) for x in base]
        q, k, v = _layout(layout, *leaves, B)
        out, lse, _ = _run(backend, q, k, v, block_mask, **options)
        loss = (out * weights[0]).sum()
        if use_lse:
            loss = loss + torch.where(torch.isneginf(lse), 0.0, lse * weights[1]).sum()
        loss.backward()
        grads[backend] = [x.grad for x in leaves]
    for got, want in zip(grads["torch"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


def test_short_calls_take_the_whole_matrix_and_sparse_or_long_ones_do_not():
    q = k = v = torch.randn(2, 4, 256, 16)
    causal = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 256, 256, BLOCK_SIZE=64)
    assert flexattn.explain_call(q, k, v, block_mask=causal, print_it=False).path.name == "small_dense"
    q.requires_grad_(True)
    assert flexattn.explain_call(q, k, v, block_mask=causal, print_it=False).path.name == "small_dense"
    q = k = v = torch.randn(2, 4, 448, 16)
    window = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() < 16, None, None, 448, 448,
                                        BLOCK_SIZE=64)  # 19 of 49 tiles
    choice = flexattn.explain_call(q, k, v, block_mask=window, print_it=False)
    assert "of its tiles" in dict(choice.skipped)["small_dense"]
    long = torch.randn(1, 1, 1024, 16)
    choice = flexattn.explain_call(long, long, long, print_it=False)
    assert "KV tiles of 128 or more" in dict(choice.skipped)["small_dense"]


def test_a_decoding_step_with_nothing_to_skip_takes_the_whole_matrix():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 1100, 16), torch.randn(2, 2, 1100, 16)
    choice = flexattn.explain_call(q, k, v, enable_gqa=True, print_it=False)
    assert choice.path.name == "small_dense"
    assert "small_dense serves it" in dict(choice.skipped)["decode_batch_in_place"]
    out = flexattn.flex_attention(q, k, v, enable_gqa=True)
    want = flexattn.flex_attention(q, k, v, enable_gqa=True, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    window = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 1100 - 256, None, None, 1, 1100)
    assert flexattn.explain_call(q, k, v, block_mask=window, enable_gqa=True, print_it=False).path.name.startswith("decode_")


@pytest.mark.parametrize("S", [80, 8192])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_keys_no_row_reads_are_zeroed_only_where_they_could_spoil_the_result(S, layout):
    """Left padding leaves keys no row reads. K/V are not copied to zero them while they are finite;
    NaN there, or keys whose scores overflow to inf, are zeroed (the reference runs on zeros)."""
    B, Hkv = 2, 2
    q, k, v = torch.randn(B, 4, 1, 16), torch.randn(B, Hkv, S, 16), torch.randn(B, Hkv, S, 16)
    padded = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 30 * (1 - b), B, None, 1, S)
    unread = (torch.arange(S) < 30).view(1, 1, S, 1) & (torch.arange(B) == 0).view(B, 1, 1, 1)
    want = _run("reference", q, k.masked_fill(unread, 0.0), v.masked_fill(unread, 0.0), padded)
    for spoiled in (0.0, float("nan"), float("inf"), 3e38):  # 3e38: finite, but its scores overflow
        k_s, v_s = (k, v) if spoiled == 0.0 else (k.masked_fill(unread, spoiled), v.masked_fill(unread, spoiled))
        if layout == "transposed":  # (B, S, Hkv, D) in memory, as a cache of (B, S, H, D) rows
            k_s, v_s = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k_s, v_s))
        with torch.no_grad():
            got = _run("torch", q, k_s, v_s, padded, PATH="small_dense")
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_a_mask_served_again_by_the_cache_keeps_its_dense_mask(monkeypatch):
    """transformers rebuilds its mask every forward from fresh tensors of equal values: the BlockMask
    comes back from flexattn.mod_cache, and the dense mask small_dense made from its kept positions
    is reused; changed values make a new one."""
    from codegen.torch_backend import small_dense
    from flexattn.integrations import hf_masks

    made = []
    evaluate = small_dense._evaluate
    monkeypatch.setattr(small_dense, "_evaluate", lambda call, kept: made.append(1) or evaluate(call, kept))
    B, S = 2, 80
    q, k, v = torch.randn(B, 4, 1, 16), torch.randn(B, 2, S, 16), torch.randn(B, 2, S, 16)

    def step(pad):
        padding = torch.ones(B, S, dtype=torch.long)
        padding[0, :pad] = 0
        bm = hf_masks.block_mask_interface(B, 1, S, S - 1, 0, None, padding)
        out = flexattn.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
        keep = padding.bool()[:, None, None, :]
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)

    step(16), step(16)
    assert len(made) == 1
    step(20)
    assert len(made) == 2
