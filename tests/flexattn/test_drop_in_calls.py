"""Calls written for torch's flex_attention run unchanged in flexattn, with torch's result.

torch's eager flex_attention (CPU) is the oracle; its performance warning is silenced.
"""

import functools
import inspect
import typing

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

import flexattn
from flexattn import InputError
from flexattn.kernel_options import OPTIONS, normalize

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def causal(b, h, q, kv):
    return q >= kv


def window(b, h, q, kv):
    return (q >= kv) & (q - kv < 40)


def _qkv(B=1, H=2, L=200, S=200, E=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, E, generator=g).to(dtype) for n in (L, S, S))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("new_mask", [window, lambda b, h, q, kv: (q >= kv) & (kv % 3 != 0)])
def test_reassigned_mask_mod_is_applied_like_torch(backend, new_mask):
    q, k, v = _qkv()
    ours = flexattn.create_block_mask(causal, None, None, 200, 200, BLOCK_SIZE=64)
    flexattn.flex_attention(q, k, v, block_mask=ours, backend=backend)  # the causal trace is kept
    theirs = torch_flex.create_block_mask(causal, None, None, 200, 200, device="cpu", BLOCK_SIZE=64)
    ours.mask_mod = theirs.mask_mod = new_mask
    expected = torch_flex.flex_attention(q, k, v, block_mask=theirs)
    torch.testing.assert_close(flexattn.flex_attention(q, k, v, block_mask=ours, backend=backend), expected)
    ours.mask_mod = causal  # back to the mask the tiles were made for
    torch.testing.assert_close(flexattn.flex_attention(q, k, v, block_mask=ours, backend=backend),
                               torch_flex.flex_attention(q, k, v, block_mask=torch_flex.create_block_mask(
                                   causal, None, None, 200, 200, device="cpu", BLOCK_SIZE=64)))


def test_reassigned_mask_mod_keeps_empty_tiles_skipped():
    """Tiles the block mask lists as EMPTY stay skipped whatever the new mask_mod keeps."""
    q, k, v = _qkv(L=128, S=128)
    bm = flexattn.create_block_mask(causal, None, None, 128, 128, BLOCK_SIZE=64)
    bm.mask_mod = lambda b, h, q_, kv: kv >= 0  # keeps everything, but the upper-right tile is EMPTY
    expected = flexattn.flex_attention(q, k, v, block_mask=flexattn.create_block_mask(
        lambda b, h, q_, kv: (q_ // 64) >= (kv // 64), None, None, 128, 128, BLOCK_SIZE=64))
    torch.testing.assert_close(flexattn.flex_attention(q, k, v, block_mask=bm), expected)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_key_value_dtype_may_differ_from_query(kv_dtype):
    q, k, v = _qkv(L=64, S=64)
    k, v = k.to(kv_dtype), v.to(kv_dtype)
    out = flexattn.flex_attention(q, k, v)
    expected = torch_flex.flex_attention(q, k, v)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_key_value_batch_one_broadcasts_with_a_block_mask_of_the_query_batch():
    q = _qkv(B=3, L=64, S=64)[0]
    k, v = _qkv(B=1, L=64, S=64, seed=1)[1:]
    ours = flexattn.create_block_mask(causal, 3, None, 64, 64)
    theirs = torch_flex.create_block_mask(causal, 3, None, 64, 64, device="cpu")
    torch.testing.assert_close(flexattn.flex_attention(q, k, v, block_mask=ours),
                               torch_flex.flex_attention(q, k, v, block_mask=theirs))
    with pytest.raises(InputError, match="broadcasts only with a block_mask"):
        flexattn.flex_attention(q, k, v)


def test_return_lse_warns_of_its_deprecation_like_torch():
    q, k, v = _qkv(L=16, S=16)
    flexattn.api._warned.clear()
    with pytest.warns(FutureWarning, match="return_aux=AuxRequest"):
        out, lse = flexattn.flex_attention(q, k, v, return_lse=True)
    assert lse.shape == (1, 2, 16)


@pytest.mark.parametrize("options,message", [
    ({"BACKEND": "FOO"}, "BACKEND.*one of 'AUTO'"),
    ({"NOT_A_KEY": 1}, "unknown key 'NOT_A_KEY'; valid keys: .*BLOCK_M"),
    ({"max_tiles": 0}, "max_tiles.*positive int"),
    ({"SPLIT_KV_CHUNK": -4}, "SPLIT_KV_CHUNK.*positive int"),
    ({"BLOCK_SIZE": 64.0}, "BLOCK_SIZE.*positive int"),
    ({"BACKEND": "FLASH"}, "FLASH.*not available"),
    ({"BACKEND": "TRITON", "FORCE_USE_FLEX_ATTENTION": True}, "cannot be combined"),
])
def test_bad_kernel_options_raise_input_error(options, message):
    q, k, v = _qkv(L=16, S=16)
    with pytest.raises(InputError, match=message):
        flexattn.flex_attention(q, k, v, kernel_options=options)


def test_every_torch_kernel_option_is_accepted():
    """Each key of torch's FlexKernelOptions runs here (with a value of its type) and gives torch's result."""
    q, k, v = _qkv(L=40, S=40)
    expected = torch_flex.flex_attention(q, k, v)
    hints = typing.get_type_hints(torch_flex.FlexKernelOptions)
    for key, hint in hints.items():
        if key == "BACKEND":
            continue
        value = True if hint is bool else 16
        assert key in OPTIONS, key
        torch.testing.assert_close(flexattn.flex_attention(q, k, v, kernel_options={key: value}), expected)
    for backend in ("AUTO", "TRITON", "TRITON_DECODE"):
        torch.testing.assert_close(flexattn.flex_attention(q, k, v, kernel_options={"BACKEND": backend}), expected)


def test_torch_backend_names_choose_the_split_kv_path():
    assert normalize({"BACKEND": "TRITON"}) == {"SPLIT_KV": False}
    assert normalize({"BACKEND": "TRITON_DECODE"}) == {"SPLIT_KV": True}
    assert normalize({"BLOCK_M": 32, "num_warps": 4}) == {"FWD_BLOCK_M": 32}


@pytest.mark.parametrize("mod", [
    lambda b, h, q, kv, w=3: (q - kv).abs() < w,  # a defaulted parameter: still a mask_mod
    functools.partial(lambda b, h, q, kv, w: (q - kv).abs() < w, w=3),
    lambda score, b, h, q, kv, cap=2.0: torch.where(q >= kv, score, -float("inf")),  # a score_mod
])
def test_create_mask_tells_mask_mods_from_score_mods_like_torch(mod):
    torch.testing.assert_close(flexattn.create_mask(mod, 2, 2, 9, 11), torch_flex.create_mask(mod, 2, 2, 9, 11, "cpu"))


def test_a_mod_needing_other_argument_counts_is_rejected_with_the_fix():
    with pytest.raises(flexattn.TraceError, match="4 positional arguments.*functools.partial"):
        flexattn.create_mask(lambda q, kv: q >= kv, 1, 1, 4, 4)


def test_create_mask_too_large_for_memory_is_rejected_before_allocating():
    with pytest.raises(InputError, match="create_block_mask"):
        flexattn.create_mask(causal, 64, 32, 10**6, 10**6)


@pytest.mark.parametrize("method", ["get_mask_mod", "get_score_mod", "convert_logical_block_mask", "reserve",
                                    "erase", "assign"])
def test_paged_cache_methods_take_torch_positional_arguments(method):
    from torch.nn.attention.experimental._paged_attention import PagedAttention as TorchPaged

    def positional(fn):
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]

    theirs, ours = positional(getattr(TorchPaged, method)), positional(getattr(flexattn.PagedAttention, method))
    assert len(ours) == len(theirs)
    meaning = {"k_val": "k", "v_val": "v"}  # torch's names of the same arguments
    assert ours == [meaning.get(name, name) for name in theirs]


def test_paged_score_mod_drops_positions_past_kv_len():
    cache = flexattn.PagedAttention(n_pages=4, page_size=16, max_batch_size=1)
    cache.reserve(torch.tensor([0]), torch.tensor([64]))
    scores = flexattn.create_mask(cache.get_score_mod(None, torch.tensor([20])), 1, 1, 1, 64)
    logical = flexattn.create_mask(cache.get_mask_mod(None, torch.tensor([20])), 1, 1, 1, 64)
    assert scores.sum() == logical.sum() == 20
    assert torch.equal(scores, logical)
