"""Split-KV decoding equals the dense reference and the general (torch back end) path."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import flexattn
from codegen.decoding import MAX_Q_LEN
from codegen.torch_backend.decode import reads
from codegen.torch_backend.decode.cpu_kernels import kernels_ready, load_kernels
from flexattn import dispatch
from flexattn.errors import InputError
from flexattn.paged import PagedKVCache
from flexattn.trace import trace_mask_mod, trace_score_mod
from mods import MODS, ModCase, Mods


load_kernels()  # else the first tests would run on the torch path while the kernels load


def _stripes(L, S, H):
    """Every other run of 40 keys: a row's tiles are scattered (chunks gather them)."""
    return Mods(None, lambda b, h, q_idx, kv_idx: (kv_idx // 40) % 2 == b % 2)


DECODE_MODS = MODS + [ModCase("stripes", _stripes)]


DECODE_PATHS = ("decode_batch_in_place", "decode_batch_copied", "decode_pool", "decode_chunks")
# small_dense serves decoding shapes on short caches too (tests/codegen/test_small_dense.py)
SHORT_CALL_PATHS = DECODE_PATHS + ("small_dense",)


def _args(q, k, v, score_mod, block_mask, options):
    score = trace_score_mod(score_mod) if score_mod is not None else None
    mask = trace_mask_mod(block_mask.mask_mod) if block_mask is not None else None
    return dict(query=q, key=k, value=v, score_graph=score.graph if score else None,
                score_buffers=score.buffers if score else (), mask_graph=mask.graph if mask else None,
                mask_buffers=mask.buffers if mask else (), block_mask=block_mask, scale=q.shape[-1] ** -0.5,
                enable_gqa=True, kernel_options=options)


def _run(backend, q, k, v, score_mod, block_mask, **options):
    return dispatch.run(backend, dispatch.call_of(**_args(q, k, v, score_mod, block_mask, options)))


def _choice(q, k, v, score_mod, block_mask, **options):
    return dispatch.choose("torch", dispatch.call_of(**_args(q, k, v, score_mod, block_mask, options)))


def _split_kv_results(q, k, v, score_mod, block_mask, **options):
    """{path: result} of every decode path that can serve the call, forced by PATH (at least decode_chunks)."""
    results = {}
    for path in SHORT_CALL_PATHS:
        try:
            results[path] = _run("torch", q, k, v, score_mod, block_mask, PATH=path, **options)
        except InputError as error:
            assert "cannot serve this call" in str(error)
    assert "decode_chunks" in results
    return results


def _assert_equal_results(got, want):
    out, lse, max_scores = got
    torch.testing.assert_close(out, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want[1], rtol=1e-5, atol=1e-5)
    if max_scores is not None:  # None: a path on torch's fused kernel, which gives none (not requested here)
        torch.testing.assert_close(max_scores, want[2], rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(DECODE_MODS), L=st.integers(1, MAX_Q_LEN), S=st.integers(1, 400),
       kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]), B=st.integers(1, 2),
       per_head=st.booleans(), q_block=st.sampled_from([1, 4, 16, 128]), kv_block=st.sampled_from([16, 32]),
       chunk=st.sampled_from([1, 40, 128, 2048]), offset=st.booleans(), heads_inner=st.booleans())
def test_split_kv_matches_reference_and_general_path(case, L, S, kv_heads, group, B, per_head, q_block, kv_block,
                                                     chunk, offset, heads_inner):
    """``heads_inner``: K/V stored (B, S, H, D), whose rows no table view covers when H > 1, so
    windows are read by views and copies of tiles instead of the CPU kernels."""
    Hq = kv_heads * group
    mods = case.build(L, S, Hq)
    torch.manual_seed(0)
    q, k, v = torch.randn(B, Hq, L, 16), torch.randn(B, kv_heads, S, 16), torch.randn(B, kv_heads, S, 8)
    if heads_inner:
        k, v = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    mask_mod = mods.mask_mod
    if offset and mask_mod is not None:  # decode: the queries are the last L positions
        shift = max(S - L, 0)
        inner = mask_mod
        mask_mod = lambda b, h, q_idx, kv_idx: inner(b, h, q_idx + shift, kv_idx)  # noqa: E731
    block_mask = None
    if mask_mod is not None:
        block_mask = flexattn.create_block_mask(mask_mod, B, Hq if per_head else None, L, S,
                                                BLOCK_SIZE=(q_block, kv_block))
    want = _run("reference", q, k, v, mods.score_mod, block_mask)
    for got in _split_kv_results(q, k, v, mods.score_mod, block_mask, SPLIT_KV_CHUNK=chunk).values():
        _assert_equal_results(got, want)
    _assert_equal_results(_run("torch", q, k, v, mods.score_mod, block_mask), want)


@pytest.mark.parametrize("B", [1, 2])
def test_scattered_tiles(B):
    """Tiles that are not one run: read in place as a pool (B=1) or gathered per chunk (B=2)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(B, 4, 2, 16), torch.randn(B, 2, 320, 16), torch.randn(B, 2, 320, 16)
    block_mask = flexattn.create_block_mask(_stripes(2, 320, 4).mask_mod, B, None, 2, 320, BLOCK_SIZE=(2, 16))
    want = _run("reference", q, k, v, None, block_mask)
    results = _split_kv_results(q, k, v, None, block_mask, SPLIT_KV_CHUNK=256)
    assert ("decode_pool" in results) == (B == 1)
    for got in results.values():
        _assert_equal_results(got, want)


@pytest.mark.parametrize("window, q_len", [(None, 1), (40, 1), (40, 3)])
def test_paged_cache(window, q_len):
    """Scattered pages, all rows as one batch read by the CPU kernels (the path chosen), or
    tile-major over the pool in place, or per-row chunks (forced); the last ``q_len`` tokens of
    each sequence as queries; same result as contiguous attention."""
    torch.manual_seed(0)
    lengths, Hq, Hkv, D = [300, 77, 160], 8, 2, 16
    cache = PagedKVCache(n_pages=18, page_size=32, max_batch_size=3)
    k_cache, v_cache = torch.zeros(1, Hkv, cache.n_positions, D), torch.zeros(1, Hkv, cache.n_positions, D)
    k, v = torch.randn(3, Hkv, 300, D), torch.randn(3, Hkv, 300, D)
    for pages in range(1, 11):  # grow round-robin so the pages of the sequences interleave
        for b, n in enumerate(lengths):
            cache.reserve(b, min(n, 32 * pages))
    for b, n in enumerate(lengths):
        cache.assign(torch.tensor([b]), torch.arange(n)[None], k[b:b + 1, :, :n], v[b:b + 1, :, :n], k_cache, v_cache)
    last = torch.tensor(lengths) - 1
    def mask(b, h, q_idx, kv_idx):
        position = last[b] - (q_len - 1) + q_idx
        causal = kv_idx <= position
        return causal if window is None else causal & (position - kv_idx < window)

    logical = flexattn.create_block_mask(mask, 3, None, q_len, 300, BLOCK_SIZE=(1, 32))
    q = torch.randn(3, Hq, q_len, D)
    alibi = lambda score, b, h, q_idx, kv_idx: score - 0.1 * h * (last[b] + q_idx - kv_idx)  # noqa: E731
    want = _run("reference", q, k, v, alibi, logical)
    paged = cache.convert_logical_block_mask(logical)
    args = (q, *cache.expand_kv(k_cache, v_cache, 3), cache.get_score_mod(alibi), paged)
    assert _choice(*args, SPLIT_KV_CHUNK=64).path.name == "decode_batch_in_place"
    results = _split_kv_results(*args, SPLIT_KV_CHUNK=64)
    assert {"decode_batch_in_place", "decode_chunks"} <= set(results)
    assert ("decode_pool" in results) == (window is None)  # a window's pages are one run per row
    for got in results.values():
        _assert_equal_results(got, want)


def test_long_queries_and_gradients_are_refused_by_the_split_kv_paths():
    q, k = torch.randn(1, 1, MAX_Q_LEN + 1, 8), torch.randn(1, 1, 32, 8)
    for path in DECODE_PATHS:
        with pytest.raises(InputError, match="Q_LEN=17 > 16: not a decoding shape"):
            _run("torch", q, k, k, None, None, PATH=path)
    q = torch.randn(1, 1, 1, 8, requires_grad=True)
    with pytest.raises(InputError, match="forward only"):
        _run("torch", q, k, k, None, None, PATH="decode_chunks")


def test_flex_attention_takes_the_split_kv_path_for_decode_shapes():
    """backend="torch" serves Q_LEN <= 16 without gradients by split-KV, with the same result;
    short caches and inputs that need gradients take the general paths."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 300, 16, generator=g), torch.randn(2, 2, 300, 16, generator=g)
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= 250 + q_idx, None, None, 1, 300, BLOCK_SIZE=32)
    choice = flexattn.explain_call(q, k, v, block_mask=bm, enable_gqa=True, backend="torch", print_it=False)
    assert choice.path.name in DECODE_PATHS
    out = flexattn.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend="torch")
    ref = flexattn.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    q.requires_grad_(True)
    choice = flexattn.explain_call(q, k, v, block_mask=bm, enable_gqa=True, backend="torch", print_it=False)
    assert choice.path.name not in DECODE_PATHS, "inputs that need gradients take the general path"
    assert dict(choice.skipped)["decode_chunks"] == "an input needs gradients and split-KV decoding is forward only"
    short = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + 50, None, None, 1, 64,
                                       BLOCK_SIZE=32)
    q = q.detach()
    choice = flexattn.explain_call(q, k[:, :, :64], v[:, :, :64], block_mask=short, enable_gqa=True, print_it=False)
    assert "fewer than 8 KV tiles" in dict(choice.skipped)["decode_chunks"]


def test_shared_cache_with_a_full_row_and_a_scattered_row():
    """One cache for the batch (stride 0), a ragged last tile: row 0 reads every tile (more slot
    positions than the cache has rows), row 1 scattered tiles; same result as the reference."""
    torch.manual_seed(0)
    k, v = torch.randn(1, 1, 100, 16).expand(2, -1, -1, -1), torch.randn(1, 1, 100, 16).expand(2, -1, -1, -1)
    q = torch.randn(2, 2, 1, 16)
    block_mask = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (b == 0) | ((kv_idx // 40) % 2 == 0), 2, None,
                                            1, 100, BLOCK_SIZE=(1, 16))
    want = _run("reference", q, k.contiguous(), v.contiguous(), None, block_mask)
    for got in _split_kv_results(q, k, v, None, block_mask).values():
        _assert_equal_results(got, want)


def test_paged_pool_with_free_pages_holding_nan():
    """Free pages between the rows' pages (a finished sequence's, erased) lie in the range the
    tile-major pass reads in place, and page 0, which the batch's padding slots point at, is one
    of them; whatever they still hold (NaN here) must not reach the result of any path."""
    torch.manual_seed(0)
    lengths, Hq, Hkv, D = [200, 150], 4, 2, 16
    cache = PagedKVCache(n_pages=16, page_size=32, max_batch_size=3)
    k_cache, v_cache = torch.zeros(1, Hkv, cache.n_positions, D), torch.zeros(1, Hkv, cache.n_positions, D)
    k, v = torch.randn(2, Hkv, 200, D), torch.randn(2, Hkv, 200, D)
    for pages in range(1, 8):  # three sequences grow round-robin; the third (first to get pages) is erased
        for b, n in [(2, 64), (0, lengths[0]), (1, lengths[1])]:
            cache.reserve(b, min(n, 32 * pages))
    cache.erase(2)
    for b, n in enumerate(lengths):
        cache.assign(torch.tensor([b]), torch.arange(n)[None], k[b:b + 1, :, :n], v[b:b + 1, :, :n], k_cache, v_cache)
    owned = set(cache.page_table[:2].flatten().tolist()) - {-1}
    free = [page for page in range(cache.n_pages) if page not in owned]
    assert 0 in free and any(min(owned) < page < max(owned) for page in free)
    for page in free:
        k_cache[:, :, page * 32:(page + 1) * 32] = v_cache[:, :, page * 32:(page + 1) * 32] = float("nan")
    last = torch.tensor(lengths) - 1
    logical = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= last[b], 2, None, 1, 200,
                                         BLOCK_SIZE=(1, 32))
    q = torch.randn(2, Hq, 1, D)
    want = _run("reference", q, k, v, None, logical)
    results = _split_kv_results(q, *cache.expand_kv(k_cache, v_cache, 2), None,
                                cache.convert_logical_block_mask(logical), SPLIT_KV_CHUNK=64)
    assert "decode_pool" in results
    for got in results.values():
        _assert_equal_results(got, want)


def test_views_and_copies_serve_until_the_kernels_are_loaded(monkeypatch):
    """Before the CPU kernels are in (they load in the background), the in-place path says so and
    decode reads K/V by views and copies of tiles, with the same result; once loaded, kernels_ready
    says so."""
    assert kernels_ready()
    monkeypatch.setattr(reads, "kernels_ready", lambda: False)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    mask = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= 250 - 40 * b, 2, None, 1, 300,
                                      BLOCK_SIZE=(1, 32))
    choice = _choice(q, k, v, None, mask)
    assert choice.path.name == "decode_batch_copied"
    assert dict(choice.skipped)["decode_batch_in_place"] == "the CPU kernels are still loading (in a background thread)"
    _assert_equal_results(_run("torch", q, k, v, None, mask), _run("reference", q, k, v, None, mask))
