"""Drop-in fidelity of BlockMask and create_block_mask, with torch's BlockMask as the oracle.

Indexing (negative indices, slices, index tensors), ``_adjust``, ``to``, ``as_tuple``,
``to_string``/``str``, the attributes torch has, ``and_masks()``/``or_masks()``, every
keyword of torch's ``create_block_mask``, our BlockMask inside torch's own
``flex_attention`` (eager and compiled), bad sizes, and the memory ceiling of the
index lists (with a builder whose own memory follows the boxes, not the tiles).
"""

import math
import time
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import flex_attention as torch_flex

import flexattn
from flexattn import BlockMask, BlockMaskError
from flexattn.analysis import build

FIELDS = BlockMask._TENSOR_ATTRS


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def per_head_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 16 * (b + 2 * h + 1))


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 1024)


def both(mask_mod, B, H, Q, KV, **kw):
    """(ours, torch's) BlockMask of one mask_mod."""
    return (flexattn.create_block_mask(mask_mod, B, H, Q, KV, **kw),
            torch_flex.create_block_mask(mask_mod, B, H, Q, KV, device="cpu", **kw))


def assert_same(ours, theirs):
    """Same lists, lengths, block sizes and dense tiles as torch's BlockMask."""
    for name in FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and torch.equal(a, b), name
    assert tuple(ours.seq_lengths) == tuple(theirs.seq_lengths) and tuple(ours.BLOCK_SIZE) == tuple(theirs.BLOCK_SIZE)
    assert ours.shape == theirs.shape and torch.equal(ours.to_dense(), theirs.to_dense())


OURS, THEIRS = both(per_head_window, 3, 2, 320, 256, BLOCK_SIZE=32)


def index_entries(n):
    ints = st.integers(-n - 1, n)
    bound = st.none() | st.integers(-n - 1, n + 1)
    slices = st.builds(slice, bound, bound, st.sampled_from([None, 1, 2]))
    tensors = st.lists(st.integers(-n, n - 1), min_size=1, max_size=3).map(torch.tensor)
    return ints | slices | tensors


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_indexing_matches_torch(data):
    sizes = OURS.kv_num_blocks.shape
    entries = tuple(data.draw(index_entries(n)) for n in sizes[:data.draw(st.integers(1, 3))])
    index = entries[0] if len(entries) == 1 and data.draw(st.booleans()) else entries
    try:
        theirs = THEIRS[index]
    except (IndexError, ValueError, RuntimeError):
        with pytest.raises((IndexError, ValueError, RuntimeError)):
            OURS[index]
        return
    ours = OURS[index]
    assert_same(ours, theirs)
    with pytest.raises(BlockMaskError, match="sliced"):
        ours.mask_mod(*(torch.tensor(0),) * 4)


def test_negative_indices_select_the_last_batch_and_head():
    assert_same(OURS[-1], THEIRS[-1])
    assert torch.equal(OURS[-1].to_dense(), OURS[2].to_dense()) and OURS[-1].sparsity() < 100
    assert torch.equal(OURS[:, -1].kv_indices, OURS[:, 1].kv_indices)
    assert torch.equal(OURS[-2:].kv_num_blocks, OURS[1:].kv_num_blocks)
    assert_same(OURS[-1, -2, 1:-1], THEIRS[-1, -2, 1:-1])


def test_fields_attributes_and_methods_match_torch():
    assert OURS._TENSOR_ATTRS == THEIRS._TENSOR_ATTRS and OURS._CONTEXT_ATTRS == THEIRS._CONTEXT_ATTRS
    assert OURS.shape == THEIRS.shape == (3, 2, 320, 256) and OURS.numel() == THEIRS.numel()
    assert OURS.sparsity() == pytest.approx(THEIRS.sparsity())
    assert OURS.mask_mod is per_head_window and OURS.seq_lengths == (320, 256)
    assert str(OURS).splitlines()[0] == str(THEIRS).splitlines()[0]  # BlockMask(shape=..., sparsity=..%,
    for flatten in (True, False):
        ours, theirs = OURS.as_tuple(flatten), THEIRS.as_tuple(flatten)
        assert len(ours) == len(theirs) == (17 if flatten else 15)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("mask_mod, q_len, kv_len", [(causal, 1000, 1000), (per_head_window, 300, 700)])
@pytest.mark.parametrize("separate_full_blocks", [True, False])
def test_adjust_matches_torch(mask_mod, q_len, kv_len, separate_full_blocks):
    ours, theirs = both(mask_mod, 2, 2, q_len, kv_len, BLOCK_SIZE=64, separate_full_blocks=separate_full_blocks)
    for new_q, new_kv in ((1, kv_len), (1, 65), (q_len // 2, kv_len // 3), (64, 64), (q_len, kv_len), (200, 100)):
        try:
            expected = theirs._adjust(new_q, new_kv)
        except IndexError:  # a kept row lists a block past the new last one
            with pytest.raises(BlockMaskError, match="past the last one"):
                ours._adjust(new_q, new_kv)
            continue
        adjusted = ours._adjust(new_q, new_kv)
        assert_same(adjusted, expected)
        assert adjusted.mask_mod is mask_mod and adjusted.seq_lengths == (new_q, new_kv)
    with pytest.raises(BlockMaskError, match="new_kv_len"):
        ours._adjust(1, 0)


def test_adjust_serves_a_growing_decode_cache():
    """As in torch's decoding recipe: one mask for the longest cache, cropped to each step's length."""
    ours = flexattn.create_block_mask(causal, 1, 1, 512, 512, BLOCK_SIZE=(1, 64))
    q = torch.randn(1, 1, 1, 16)
    for step in (1, 64, 65, 300, 512):
        k = v = torch.randn(1, 1, step, 16)
        mask = ours[:, :, step - 1:step]._adjust(1, step)
        mask.mask_mod = lambda b, h, q_idx, kv_idx: kv_idx <= step - 1
        reference = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v
        torch.testing.assert_close(flexattn.flex_attention(q, k, v, block_mask=mask), reference)


def test_to_moves_every_tensor_and_keeps_the_rest():
    ours, theirs = both(causal, 1, 2, 128, 128, BLOCK_SIZE=32, compute_dq_write_order=True)
    for device in ("cpu", torch.device("cpu"), "meta"):
        moved, expected = ours.to(device), theirs.to(device)
        for name in FIELDS:
            a, b = getattr(moved, name), getattr(expected, name)
            assert (a is None) == (b is None) and (a is None or (a.device == b.device and a.shape == b.shape))
        assert moved.mask_mod is causal and moved.BLOCK_SIZE == (32, 32) and moved.dq_kv_order_spt is True
    assert_same(ours.to("cpu"), theirs)


def test_tile_string_takes_to_strings_arguments():
    ours = flexattn.create_block_mask(causal, 3, 2, 256, 256, BLOCK_SIZE=32)
    first = ours.tile_string().split("\n")
    assert first[0] == "b=0, h=0" and first[1:9] == ["░░" + "  " * 7] + [
        "██" * i + "░░" + "  " * (7 - i) for i in range(1, 8)]
    assert ours.tile_string(limit=4).count("b=") == 4 and "to_string(limit=N)" in ours.tile_string(limit=4)
    assert ours.tile_string(limit=10).count("b=") == 6 and "..." not in ours.tile_string(limit=10)
    assert ours.tile_string(grid_size=(2, 3), limit=1).split("\n")[:3] == [
        "b=0, h=0 (first 2x3 of 8x8 tiles)", "░░    ", "██░░  "]
    assert ours.tile_string(grid_size=4) == ours.tile_string(grid_size=(4, 4))
    assert ours.tile_string(grid_size=-1, limit=1).split("\n")[0] == "b=0, h=0"
    assert ours.tile_string(grid_size=(2, 3)) == ours.tile_string((2, 3), 4)  # torch's positional order
    with pytest.raises(BlockMaskError, match="grid_size"):
        ours.tile_string(grid_size="big")


def test_empty_combinators_keep_everything_or_nothing_like_torch():
    for ours, theirs in ((flexattn.and_masks(), torch_flex.and_masks()), (flexattn.or_masks(), torch_flex.or_masks())):
        assert_same(flexattn.create_block_mask(ours, 2, 1, 100, 90, BLOCK_SIZE=32),
                    torch_flex.create_block_mask(theirs, 2, 1, 100, 90, device="cpu", BLOCK_SIZE=32))
        assert torch.equal(flexattn.create_mask(ours, 1, 1, 5, 7), torch_flex.create_mask(theirs, 1, 1, 5, 7, "cpu"))
    assert flexattn.create_block_mask(flexattn.and_masks(), None, None, 64, 64, BLOCK_SIZE=32).sparsity() == 0
    assert flexattn.create_block_mask(flexattn.or_masks(), None, None, 64, 64, BLOCK_SIZE=32).sparsity() == 100


@pytest.mark.parametrize("separate_full_blocks", [True, False])
@pytest.mark.parametrize("compute_dq_write_order, dq_kv_order", [(False, True), (True, True), (True, False)])
def test_every_create_block_mask_keyword_of_torch(separate_full_blocks, compute_dq_write_order, dq_kv_order):
    kw = dict(separate_full_blocks=separate_full_blocks, compute_dq_write_order=compute_dq_write_order,
              dq_kv_order=dq_kv_order)
    ours, theirs = both(per_head_window, 2, 2, 200, 160, BLOCK_SIZE=(32, 16), **kw)
    assert_same(ours, theirs)
    assert (ours.full_kv_indices is None) == (not separate_full_blocks)
    assert ours.dq_kv_order_spt == theirs.dq_kv_order_spt
    assert_same(BlockMask.from_torch(theirs), ours.to_torch())
    # All of torch's parameters, positionally in its order; _compile is accepted and ignored.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        positional = flexattn.create_block_mask(per_head_window, 2, 2, 200, 160, "cpu", (32, 16), True,
                                                separate_full_blocks, compute_dq_write_order, dq_kv_order)
    assert_same(positional, theirs)


def test_create_block_mask_device_none_is_torchs_default():
    expected = torch.accelerator.current_accelerator() or torch.device("cpu")
    assert flexattn.create_block_mask(causal, None, None, 64, 64, device=None).kv_indices.device.type == expected.type


def test_torch_flex_attention_takes_our_block_mask_eager_and_compiled():
    ours = flexattn.create_block_mask(per_head_window, 2, 2, 200, 200, BLOCK_SIZE=64)
    q, k, v = (torch.randn(2, 2, 200, 16) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch_flex.flex_attention(q, k, v, block_mask=ours.to_torch())
        torch.testing.assert_close(torch_flex.flex_attention(q, k, v, block_mask=ours), expected)
        traced = torch.compile(torch_flex.flex_attention, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(traced(q, k, v, block_mask=ours), expected)
        small = flexattn.create_block_mask(causal, 1, 1, 128, 128, BLOCK_SIZE=64)
        q, k, v = (torch.randn(1, 1, 128, 16) for _ in range(3))
        compiled = torch.compile(torch_flex.flex_attention)(q, k, v, block_mask=small)  # inductor
        torch.testing.assert_close(compiled, torch_flex.flex_attention(q, k, v, block_mask=small.to_torch()))


@pytest.mark.parametrize("kw, name", [
    (dict(BLOCK_SIZE=64.0), "BLOCK_SIZE"), (dict(BLOCK_SIZE=0), "BLOCK_SIZE"), (dict(BLOCK_SIZE=(64, -1)), "BLOCK_SIZE"),
    (dict(BLOCK_SIZE=(64,)), "BLOCK_SIZE"), (dict(BLOCK_SIZE=True), "BLOCK_SIZE"), (dict(BLOCK_SIZE="64"), "BLOCK_SIZE"),
    (dict(Q_LEN=0), "Q_LEN"), (dict(KV_LEN=-3), "KV_LEN"), (dict(B=0), "B"), (dict(H=2.0), "H"),
    (dict(dq_kv_order=1), "dq_kv_order")])
def test_bad_sizes_raise_block_mask_error_naming_the_argument(kw, name):
    args = dict(B=1, H=1, Q_LEN=64, KV_LEN=64) | kw
    with pytest.raises(BlockMaskError, match=f"{name} must be"):
        flexattn.create_block_mask(causal, **args)


def test_numpy_integers_are_sizes():
    ours = flexattn.create_block_mask(causal, np.int64(2), None, np.int32(96), 96, BLOCK_SIZE=np.int64(32))
    assert ours.shape == (2, 1, 96, 96) and ours.BLOCK_SIZE == (32, 32)


def test_index_list_bytes_is_what_the_lists_hold():
    for separate in (True, False):
        ours = flexattn.create_block_mask(per_head_window, 2, 3, 300, 170, BLOCK_SIZE=(64, 32),
                                          separate_full_blocks=separate)
        held = sum(t.nbytes for t in (getattr(ours, name) for name in FIELDS[:8]) if t is not None)
        assert held == build.index_list_bytes(2, 3, 300, 170, (64, 32), separate)


def test_lists_over_the_free_memory_raise_before_building(monkeypatch):
    monkeypatch.setattr(build, "_available_bytes", lambda device: 16 * 2**30)
    start = time.perf_counter()
    with pytest.raises(BlockMaskError) as error:
        flexattn.create_block_mask(sliding_window, None, None, 10**7, 10**7)
    assert time.perf_counter() - start < 0.5
    message = str(error.value)
    for part in ("Q_LEN=10000000", "KV_LEN=10000000", "BLOCK_SIZE=(128, 128)", "97,657,500,000 bytes",
                 "78125 x 78125", "17,179,869,184 bytes available", "BLOCK_SIZE=(512, 512)", "separate_full_blocks"):
        assert part in message, part
    assert build.index_list_bytes(1, 1, 10**7, 10**7, 512) <= 16 * 2**30


def test_ten_million_tokens_of_a_sliding_window():
    """The analysis at 10^7 tokens, BLOCK_SIZE 128 (78125^2 tiles): boxes, not a 6 GB tile plane."""
    n, nq = 10**7, math.ceil(10**7 / 128)
    traced = flexattn.trace_mask_mod(sliding_window)
    tracemalloc.start()
    try:
        tiles = build._Tiles(1, 1, nq, nq, 128, 128, n, n)
        undecided, _ = build._classify_tiles(traced.graph, build.BufferRanges([]), tiles)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(undecided[0]) == 0 and peak < 400e6  # a dense int8 plane alone: 6.1e9 bytes
    # The whole build where the lists fit: every row lists its diagonal tile and the one before it.
    ours = flexattn.create_block_mask(sliding_window, None, None, n, n, BLOCK_SIZE=2048)
    rows = ours.kv_num_blocks.shape[-1]
    assert torch.equal(ours.kv_num_blocks[0, 0], torch.tensor([1] + [2] * (rows - 1), dtype=torch.int32))
    assert int(ours.full_kv_num_blocks.sum()) == 0
    assert torch.equal(ours.kv_indices[0, 0, 1:, :2], torch.stack([torch.arange(rows - 1), torch.arange(1, rows)], 1)
                       .to(torch.int32))
