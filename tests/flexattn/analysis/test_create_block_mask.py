"""Symbolic block masks: exact (equal to the dense mask's block reduction and to torch's),
and sound with exact=False."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.nn.attention import flex_attention as torch_flex

import flexattn
from flexattn.block_mask import EMPTY, FULL, PARTIAL
from mask_programs import DOC, as_mask_mod, mask_expr

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def _dense_classes(mask_mod, B, H, Q, KV, q_block, kv_block):
    """Tile classes by brute force, the way torch reduces a dense mask (padding counts as False)."""
    mask = flexattn.create_mask(mask_mod, B, H, Q, KV)
    mask = torch.nn.functional.pad(mask, (0, -KV % kv_block, 0, -Q % q_block))
    tiles = mask.view(B, H, mask.shape[2] // q_block, q_block, mask.shape[3] // kv_block, kv_block)
    count = tiles.sum(dim=(3, 5))
    classes = torch.full(count.shape, PARTIAL, dtype=torch.int8)
    classes[count == 0] = EMPTY
    classes[count == q_block * kv_block] = FULL
    return classes


@settings(max_examples=120, deadline=None)
@given(expr=mask_expr(2), B=st.integers(1, 2), H=st.integers(1, 3), Q=st.integers(1, 145),
       KV=st.integers(1, 145), q_block=st.sampled_from([1, 4, 16, 32]), kv_block=st.sampled_from([1, 8, 16, 64]))
# Two "unbounded" ranges added once wrapped around int64 and claimed a FULL tile.
@example(expr="((((kv_idx - 2 * q_idx) & 0) + ((kv_idx - 2 * q_idx) & 0)) < q_idx)",
         B=1, H=1, Q=4, KV=1, q_block=4, kv_block=1)
def test_exact_block_mask_equals_dense_reduction(expr, B, H, Q, KV, q_block, kv_block):
    mask_mod = as_mask_mod(expr)
    expected = _dense_classes(mask_mod, B, H, Q, KV, q_block, kv_block)
    exact = flexattn.create_block_mask(mask_mod, B, H, Q, KV, BLOCK_SIZE=(q_block, kv_block))
    assert torch.equal(exact.tile_classes(), expected)
    loose = flexattn.create_block_mask(mask_mod, B, H, Q, KV, BLOCK_SIZE=(q_block, kv_block), exact=False)
    classes = loose.tile_classes()
    assert torch.all(expected[classes == FULL] == FULL)
    assert torch.all(expected[classes == EMPTY] == EMPTY)


W = 16


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 70)


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < 90) | (q_idx >= kv_idx)


def document(b, h, q_idx, kv_idx):
    return (DOC[q_idx] == DOC[kv_idx]) & (q_idx >= kv_idx)


def dilated_sliding_window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx <= 64) & (q_idx >= kv_idx) & ((q_idx - kv_idx) % 2 == 0)


def natten(b, h, q_idx, kv_idx):
    return (torch.abs(q_idx // W - kv_idx // W) <= 2) & (torch.abs(q_idx % W - kv_idx % W) <= 2)


@pytest.mark.parametrize("mask_mod", [causal, sliding_window, prefix_lm, document, dilated_sliding_window, natten])
@pytest.mark.parametrize("block", [16, (32, 64), 128])
def test_equals_torch_create_block_mask(mask_mod, block):
    ours = flexattn.create_block_mask(mask_mod, 2, 2, 145, 145, BLOCK_SIZE=block)
    theirs = torch_flex.create_block_mask(mask_mod, 2, 2, 145, 145, device="cpu", BLOCK_SIZE=block)
    for field in FIELDS:
        assert torch.equal(getattr(ours, field), getattr(theirs, field)), field


def test_causal_and_sliding_window_need_no_dense_evaluation():
    for mask_mod in (causal, sliding_window):
        stats = flexattn.create_block_mask(mask_mod, None, None, 4096, 4096).stats
        assert stats["refined"] == 0 and stats["decided_symbolically"] == stats["tiles"] == 32 * 32


@pytest.mark.parametrize("sizes", [(1, 1, 0, 4), (1, 1, 4, -2), (0, 1, 4, 4)])
def test_non_positive_sizes_raise(sizes):
    with pytest.raises(flexattn.BlockMaskError, match="must be a positive int"):
        flexattn.create_block_mask(causal, *sizes)


def test_non_positive_block_size_raises():
    with pytest.raises(flexattn.BlockMaskError, match="BLOCK_SIZE"):
        flexattn.create_block_mask(causal, 1, 1, 8, 8, BLOCK_SIZE=0)


def test_mask_mod_not_returning_bool_raises_trace_error():
    with pytest.raises(flexattn.TraceError, match="must return a bool"):
        flexattn.create_block_mask(lambda b, h, q, kv: q - kv, 1, 1, 8, 8)
