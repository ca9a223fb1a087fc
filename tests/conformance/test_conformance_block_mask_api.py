"""The BlockMask and mask helpers against torch's: indexing, _adjust, to_string, as_tuple, ...

Mirrors torch's TestBlockMask (``test_block_mask_attributes``, ``test_getitem``,
``test_block_size_changes``, ``test_from_kv_blocks``, ``test_block_size``,
``test_custom_block_mask_generator``, ``test_block_mask_viz``, ``test_no_q_info``,
``test_mask_mod_combiners``) plus what a torch user does to a BlockMask by hand: negative
indices, ``_adjust`` to shorter lengths, reassigning ``mask_mod``, ``create_mask`` of mods
with defaulted or partial-bound parameters, and ``kernel_options``.
"""

import functools

import pytest
import torch
from torch.nn.attention import flex_attention as tfa

import flexattn
from conformance_helpers import (FWD_TOL, assert_close, assert_same_block_mask, check_create_mask, qkv, run_flex,
                                 run_torch)

OFFSET = torch.tensor([0, 1, 0, 2])


def causal(b, h, q, kv):
    return q >= kv


def offset_causal(b, h, q, kv):
    """torch's test_getitem mask: causal, shifted per batch by a captured tensor."""
    return (q + OFFSET[b] * 32) >= kv


def per_head_window(b, h, q, kv):
    return (q >= kv) & (q - kv <= 24 * (h + 1))


def both(mask_mod, B, H, L, S, block=32):
    """(flexattn's, torch's) BlockMask of the same mask_mod."""
    return (flexattn.create_block_mask(mask_mod, B, H, L, S, BLOCK_SIZE=block),
            tfa.create_block_mask(mask_mod, B, H, L, S, device="cpu", BLOCK_SIZE=block))


def assert_same_lists(got, want):
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), name
        if w is not None:
            assert tuple(g.shape) == tuple(w.shape), f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    assert_same_block_mask(got, want)


def test_block_mask_attributes():
    fx, th = both(offset_causal, 4, 2, 256, 256)
    assert fx.shape == th.shape and fx.numel() == th.numel()
    for index in (0, (0, 0), (1, 0), 1):
        assert fx[index].shape == th[index].shape
        assert fx[index].sparsity() == pytest.approx(th[index].sparsity())
    assert fx.sparsity() == pytest.approx(th.sparsity())


def test_is_a_torch_block_mask():
    """Code written for torch tests ``isinstance(mask, BlockMask)`` (transformers does): a flexattn
    BlockMask passes it, and torch's flex_attention reads it."""
    fx, th = both(offset_causal, 1, 2, 256, 256)
    assert isinstance(fx, tfa.BlockMask) and isinstance(fx[0], tfa.BlockMask)
    q = torch.randn(1, 2, 256, 16)
    torch.testing.assert_close(tfa.flex_attention(q, q, q, block_mask=fx),
                               tfa.flex_attention(q, q, q, block_mask=th))


INDICES = {
    "int": 0, "int_pair": (0, 1), "slices": (slice(0, 2), slice(1, 2)),
    "q_tensor": (slice(0, 2), slice(1, 2), torch.tensor([1], dtype=torch.int32)),
    "q_tensor_only": (slice(None), slice(None), torch.tensor([0, 2])),
    "negative_batch": -1, "negative_head": (slice(None), -1), "negative_pair": (-1, -2),
    "negative_with_q_tensor": (-2, slice(None), torch.tensor([3])), "negative_slice": slice(-2, None),
    "step_slice": (slice(None, None, 2),),
}


@pytest.mark.parametrize("index", INDICES.values(), ids=INDICES.keys())
def test_getitem(index):
    fx, th = both(offset_causal, 4, 2, 128, 128)
    assert_same_lists(fx[index], th[index])


def test_sliced_block_mask_refuses_attention_like_torch():
    fx, _ = both(offset_causal, 4, 2, 128, 128)
    q, k, v = qkv(1, 2, 128, 128, 16)
    with pytest.raises(RuntimeError, match="sliced BlockMask"):
        flexattn.flex_attention(q, k, v, block_mask=fx[0])


@pytest.mark.parametrize("new_lengths", [(64, 64), (96, 128), (70, 33), (128, 128)])
def test_adjust(new_lengths):
    """``_adjust`` crops to the top-left corner, as torch's does, and attention then matches torch."""
    fx, th = both(per_head_window, 2, 2, 128, 128)
    fx_adj, th_adj = fx._adjust(*new_lengths), th._adjust(*new_lengths)
    assert_same_lists(fx_adj, th_adj)
    q, k, v = qkv(2, 2, *new_lengths, 16)
    assert_close(run_flex(q, k, v, block_mask=fx_adj)[0], run_torch(q, k, v, block_mask=th_adj)[0], FWD_TOL, "out")


@pytest.mark.parametrize("mask_mod,B,H", [(causal, 1, 1), (offset_causal, 4, 1), (per_head_window, 2, 3)],
                         ids=["causal", "offset_causal", "per_head"])
@pytest.mark.parametrize("kwargs", [{}, {"grid_size": 3}, {"grid_size": -1}, {"limit": 1}], ids=str)
def test_to_string(mask_mod, B, H, kwargs):
    fx, th = both(mask_mod, B, H, 200, 200, block=16)
    assert fx.to_string(**kwargs) == th.to_string(**kwargs)


def test_str():
    fx, th = both(offset_causal, 4, 1, 128, 128)
    assert str(fx) == str(th)


def test_as_tuple():
    fx, th = both(offset_causal, 4, 2, 128, 128, block=(16, 32))
    got, want = fx.as_tuple(), th.as_tuple()
    assert got[:2] == want[:2] and got[-3:-1] == want[-3:-1] and got[-1] is want[-1]
    for g, w in zip(got[2:10], want[2:10]):
        assert (g is None and w is None) or torch.equal(g, w)
    nested_got, nested_want = fx.as_tuple(flatten=False), th.as_tuple(flatten=False)
    assert nested_got[0] == nested_want[0] and nested_got[-2] == nested_want[-2]


@pytest.mark.parametrize("block", [16, 32, 64, 128, (16, 32), (32, 16)], ids=str)
def test_block_size_changes(block):
    fx, th = both(flexattn.noop_mask, 4, 2, 256, 256, block=block)
    assert fx.BLOCK_SIZE == th.BLOCK_SIZE and fx.shape == th.shape == (4, 2, 256, 256)
    assert_same_block_mask(fx, th)


def from_kv_inputs(full):
    i32 = functools.partial(torch.tensor, dtype=torch.int32)
    if full:
        return (i32([1]).view(1, 1, 1), i32([1, -1]).view(1, 1, 1, 2), i32([1]).view(1, 1, 1),
                i32([0, -1]).view(1, 1, 1, 2))
    return i32([2]).view(1, 1, 1), i32([0, 1]).view(1, 1, 1, 2), None, None


@pytest.mark.parametrize("full", [False, True])
def test_from_kv_blocks(full):
    args = from_kv_inputs(full)
    got, want = flexattn.BlockMask.from_kv_blocks(*args), tfa.BlockMask.from_kv_blocks(*args)
    assert got.BLOCK_SIZE == want.BLOCK_SIZE == (128, 128) and got.shape == want.shape
    for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None and w is None) or torch.equal(g, w), name
    custom = flexattn.BlockMask.from_kv_blocks(*args, BLOCK_SIZE=(64, 64))
    assert custom.BLOCK_SIZE == (64, 64)


def test_custom_block_mask_generator():
    n = 8
    num_blocks = (torch.arange(n) + 1)[None, None, :].int()
    indices = torch.arange(n).expand(n, n)[None, None, :].int()
    manual = flexattn.BlockMask.from_kv_blocks(num_blocks, indices, BLOCK_SIZE=32, mask_mod=causal)
    auto = flexattn.create_block_mask(causal, 1, 1, 256, 256, BLOCK_SIZE=32)
    assert torch.equal(manual.to_dense(), auto.to_dense())
    q, k, v = qkv(1, 2, 256, 256, 16)
    assert_close(run_flex(q, k, v, block_mask=manual)[0], run_flex(q, k, v, block_mask=auto)[0], FWD_TOL, "out")


def test_no_q_info():
    """Attention runs from the kv-major lists alone, as torch's forward does."""
    bm = flexattn.create_block_mask(causal, 1, 1, 128, 128, BLOCK_SIZE=32)
    bm.q_num_blocks = bm.q_indices = bm.full_q_num_blocks = bm.full_q_indices = None
    q, k, v = qkv(2, 2, 128, 128, 16)
    want = run_torch(q, k, v, block_mask=tfa.create_block_mask(causal, 1, 1, 128, 128, device="cpu", BLOCK_SIZE=32))
    assert_close(run_flex(q, k, v, block_mask=bm)[0], want[0], FWD_TOL, "out")


def test_reassigned_mask_mod_is_used():
    """torch applies ``block_mask.mask_mod`` inside partial tiles at call time, so reassigning it counts."""
    fx, th = both(causal, 1, 1, 128, 128)

    def stricter(b, h, q, kv):
        return (q >= kv) & ((q - kv) % 3 == 0)
    fx.mask_mod = th.mask_mod = stricter
    q, k, v = qkv(2, 2, 128, 128, 16)
    assert_close(run_flex(q, k, v, block_mask=fx)[0], run_torch(q, k, v, block_mask=th)[0], FWD_TOL, "out")


def test_mask_mod_combiners():
    def neg_causal(b, h, q, kv):
        return q < kv

    def window(b, h, q, kv):
        return (q - kv) <= 48
    for combined in ((flexattn.and_masks, tfa.and_masks, (causal, window)),
                     (flexattn.and_masks, tfa.and_masks, (causal, neg_causal)),
                     (flexattn.or_masks, tfa.or_masks, (causal, neg_causal))):
        ours, theirs, parts = combined
        fx = flexattn.create_block_mask(ours(*parts), 1, 1, 256, 256, BLOCK_SIZE=32)
        th = tfa.create_block_mask(theirs(*parts), 1, 1, 256, 256, device="cpu", BLOCK_SIZE=32)
        assert_same_block_mask(fx, th)
        check_create_mask(ours(*parts), 1, 1, 100, 90)


def test_noop_mask_matches_torch():
    check_create_mask(flexattn.noop_mask, 2, 3, 17, 29)
    assert_same_block_mask(*both(flexattn.noop_mask, 2, 3, 100, 70))


def windowed(b, h, q_idx, kv_idx, width=5):
    return (q_idx - kv_idx).abs() <= width


def bias_with_default(score, b, h, q_idx, kv_idx, scale=0.5):
    return torch.where(q_idx >= kv_idx, score * scale, float("-inf"))


def banded(b, h, q_idx, kv_idx, low, high):
    return (q_idx - kv_idx >= low) & (q_idx - kv_idx <= high)


MODS_WITH_EXTRA_PARAMS = {
    "mask_with_default": windowed, "score_with_default": bias_with_default,
    "partial_keywords": functools.partial(banded, low=-3, high=9),
    "partial_positional_extra": functools.partial(windowed, width=2),
}


@pytest.mark.parametrize("mod", MODS_WITH_EXTRA_PARAMS.values(), ids=MODS_WITH_EXTRA_PARAMS.keys())
def test_create_mask_counts_only_parameters_without_defaults(mod):
    """torch tells a mask_mod from a score_mod by its parameters that have no default."""
    check_create_mask(mod, 2, 1, 40, 56)


@pytest.mark.parametrize("mod", [windowed, functools.partial(banded, low=0, high=30)], ids=["default", "partial"])
def test_block_mask_of_mods_with_extra_parameters(mod):
    fx, th = both(mod, 1, 1, 128, 96)
    assert_same_block_mask(fx, th)
    q, k, v = qkv(1, 2, 128, 96, 16)
    assert_close(run_flex(q, k, v, block_mask=fx)[0], run_torch(q, k, v, block_mask=th)[0], FWD_TOL, "out")


TORCH_KERNEL_OPTIONS = [{"BLOCK_M": 16, "BLOCK_N": 16}, {"PRESCALE_QK": False, "ROWS_GUARANTEED_SAFE": False},
                        {"FORCE_USE_FLEX_ATTENTION": True}, {"BACKEND": "AUTO"}, {"num_warps": 4, "num_stages": 2},
                        {"BLOCKS_ARE_CONTIGUOUS": False, "WRITE_DQ": True}]


@pytest.mark.parametrize("options", TORCH_KERNEL_OPTIONS, ids=str)
def test_torch_kernel_options_are_accepted(options):
    q, k, v = qkv(2, 2, 64, 64, 16)
    got = run_flex(q, k, v, kernel_options=options)[0]
    assert_close(got, run_torch(q, k, v, kernel_options=options)[0], FWD_TOL, "out")


def test_unknown_kernel_option_is_rejected():
    q, k, v = qkv(1, 2, 32, 32, 16)
    with pytest.raises(ValueError, match="NOT_A_KERNEL_OPTION"):
        flexattn.flex_attention(q, k, v, kernel_options={"NOT_A_KERNEL_OPTION": 1})


def test_to_device_keeps_the_mask():
    fx, th = both(per_head_window, 2, 2, 128, 128)
    assert_same_block_mask(fx.to("cpu"), th.to("cpu"))
