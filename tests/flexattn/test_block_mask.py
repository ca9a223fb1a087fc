"""BlockMask: conversion to and from torch's, explain(), plot()."""

import struct
import warnings

import torch
from torch.nn.attention import flex_attention as torch_flex

import flexattn
from flexattn import BlockMask


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def test_round_trip_through_torch_and_use_in_both_apis():
    ours = flexattn.create_block_mask(causal, 1, 2, 100, 100, BLOCK_SIZE=32)
    theirs = ours.to_torch()
    assert torch.equal(theirs.to_dense(), ours.to_dense()) and theirs.BLOCK_SIZE == (32, 32)
    back = BlockMask.from_torch(torch_flex.create_block_mask(causal, 1, 2, 100, 100, device="cpu", BLOCK_SIZE=32))
    assert torch.equal(back.tile_classes(), ours.tile_classes())
    q = k = v = torch.randn(1, 2, 100, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_out = torch_flex.flex_attention(q, k, v, block_mask=theirs)
    ours_out = flexattn.flex_attention(q, k, v, block_mask=torch_flex.create_block_mask(
        causal, 1, 2, 100, 100, device="cpu", BLOCK_SIZE=32))
    torch.testing.assert_close(ours_out, torch_out, rtol=1e-5, atol=1e-5)


def test_from_torch_rejects_other_objects():
    import pytest

    with pytest.raises(flexattn.BlockMaskError, match="expected a BlockMask"):
        BlockMask.from_torch("causal")


def test_explain_reports_tiles_and_how_they_were_decided():
    text = flexattn.create_block_mask(causal, None, None, 256, 256, BLOCK_SIZE=64).explain()
    assert "6 full, 4 partial, 6 empty tiles of 64x64" in text
    assert "16 of 16 distinct tiles decided symbolically (0 of them from pieces of the tile), 0 refined densely" \
        in text
    assert "depends on kv_idx, q_idx" in text


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "mask.png"
    flexattn.create_block_mask(causal, None, None, 256, 256, BLOCK_SIZE=32).plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_slicing_keeps_rows_like_torch():
    ours = flexattn.create_block_mask(causal, 2, 3, 128, 128, BLOCK_SIZE=16)
    theirs = torch_flex.create_block_mask(causal, 2, 3, 128, 128, device="cpu", BLOCK_SIZE=16)
    for index in (1, (1, 2), (slice(None), slice(None), slice(2, 5))):
        a, b = ours[index], theirs[index]
        assert torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.full_kv_indices, b.full_kv_indices)
        assert torch.equal(a.to_dense(), b.to_dense())


def test_symbolic_form_of_a_mask():
    from flexattn.analysis.symbolic import to_sympy

    doc = torch.zeros(8, dtype=torch.long)
    expr = to_sympy(flexattn.trace_mask_mod(lambda b, h, q, kv: (q >= kv) & (q - kv <= 8) & (doc[q] == doc[kv])).graph)
    text = str(expr)
    assert "q_idx >= kv_idx" in text and "-kv_idx + q_idx <= 8" in text and "Eq(doc(q_idx), doc(kv_idx))" in text
