"""flexattn.compile: a traced, compiled kernel with its source, equal to flex_attention."""

import pytest
import torch

import flexattn
from codegen.cache import KERNELS
from flexattn.api import InputError
from flexattn.compile import compile as compile_attention
from flexattn.errors import LoweringError, TraceError


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _qkv(L=70, S=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 2, L, 16, generator=g), torch.randn(1, 2, S, 16, generator=g),
            torch.randn(1, 2, S, 8, generator=g))


def test_compiled_kernel_has_source_and_matches_flex_attention():
    slopes = torch.tensor([0.5, 0.25])
    alibi = lambda s, b, h, q_idx, kv_idx: s + slopes[h] * (kv_idx - q_idx)  # noqa: E731
    attend = compile_attention(alibi, causal)
    assert "def score_mod(score, b, h, q_idx, kv_idx" in attend.source
    assert "def mask_mod(b, h, q_idx, kv_idx" in attend.source
    q, k, v = _qkv()
    bm = flexattn.create_block_mask(causal, None, None, 70, 90, BLOCK_SIZE=32)
    out, lse = attend(q, k, v, block_mask=bm, scale=0.2, return_lse=True)
    ref, ref_lse = flexattn.flex_attention(q, k, v, score_mod=alibi, block_mask=bm, scale=0.2, return_lse=True,
                                           backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_mask_without_block_mask_applies_the_mask_everywhere():
    attend = compile_attention(mask_mod=causal, BLOCK_SIZE=32)
    q, k, v = _qkv()
    bm = flexattn.create_block_mask(causal, None, None, 70, 90, BLOCK_SIZE=32)
    ref = flexattn.flex_attention(q, k, v, block_mask=bm, backend="reference")
    torch.testing.assert_close(attend(q, k, v), ref, rtol=1e-5, atol=1e-5)


def test_no_mods_is_plain_attention_and_supports_gqa():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 33, 8, generator=g)
    k, v = torch.randn(2, 2, 47, 8, generator=g), torch.randn(2, 2, 47, 8, generator=g)
    out = compile_attention()(q, k, v, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_compiling_the_same_structure_twice_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path))
    KERNELS.clear_memory()
    builds = KERNELS.stats["builds"]
    for window in (8, 24):
        compile_attention(mask_mod=lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= window)
    assert KERNELS.stats["builds"] == builds + 1


def test_errors():
    with pytest.raises(TraceError):
        compile_attention(lambda s, b, h, q_idx, kv_idx: s if q_idx > 0 else -s)
    with pytest.raises(LoweringError, match="unknown backend"):
        compile_attention(backend="no-such-backend")
    q, k, v = _qkv()
    with pytest.raises(InputError):
        compile_attention()(q, k[:, :1], v[:, :1])
    bm = flexattn.create_block_mask(causal, None, None, 70, 90, BLOCK_SIZE=32)
    with pytest.raises(InputError, match="no mask_mod was compiled in"):
        compile_attention()(q, k, v, block_mask=bm)
