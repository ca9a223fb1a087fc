"""The plans kept between calls (flexattn.memo, BlockMask.derived) are never served stale: a
BlockMask changed in place, a score_mod buffer changed in place and a new closure value each give
the result of a fresh computation (the dense reference)."""

import copy

import torch

import flexattn
from flexattn.memo import Memo


def _qkv(L=200, S=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, n, 16, generator=g) for n in (L, S, S))


def _check(q, k, v, kernel_options=None, **kwargs):
    out = flexattn.flex_attention(q, k, v, kernel_options=kernel_options, **kwargs)
    ref = flexattn.flex_attention(q, k, v, backend="reference", **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_memo_detects_replaced_and_mutated_tensors():
    memo, t = Memo(), torch.zeros(3)
    calls = []
    value = lambda: memo.get("x", (1,), [t], lambda: calls.append(1) or len(calls))  # noqa: E731
    assert value() == 1 and value() == 1
    t.add_(1)  # in place: recomputed
    assert value() == 2
    t = torch.zeros(3)  # another tensor: recomputed
    assert value() == 3
    assert memo.get("x", (2,), [t], lambda: 9) == 9  # another key
    assert copy.deepcopy(memo).get("x", (2,), [t], lambda: 10) == 10  # a copy keeps no stamps


def test_block_mask_changed_in_place_plans_again():
    q, k, v = _qkv()
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 200, 200, BLOCK_SIZE=32)
    _check(q, k, v, block_mask=bm)
    # Drop every FULL tile of the first rows: the rows kept for the first call no longer hold.
    bm.full_kv_num_blocks[..., :3] = 0
    assert flexattn.flex_attention(q, k, v, block_mask=bm).isfinite().all()
    _check(q, k, v, block_mask=bm)


def test_score_buffer_changed_in_place_and_new_closure_value():
    q, k, v = _qkv(64, 64)
    slopes = torch.tensor([0.5, 0.25])
    alibi = lambda s, b, h, q_idx, kv_idx: s + slopes[h] * (kv_idx - q_idx)  # noqa: E731
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 64, 64, BLOCK_SIZE=16)
    for _ in range(2):
        _check(q, k, v, score_mod=alibi, block_mask=bm, kernel_options={"PATH": "fused_tiles"})  # reads the features
        slopes.mul_(4)  # the bias features kept for the previous call are stale now
    for slope in (0.5, 2.0):
        _check(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s + slope * (q_idx - kv_idx))


def test_fused_plan_by_tile_classes_follows_the_classes():
    """A per-batch mask's fused plan is kept by its tile classes' values: a mask changed in place
    gets the plan of its new classes."""
    q, k, v = (x.expand(2, -1, -1, -1).contiguous() for x in _qkv(128, 128))
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 16 * b, 2, None, 128, 128, BLOCK_SIZE=32)
    forced = {"PATH": "fused_tiles"}
    _check(q, k, v, block_mask=bm, kernel_options=forced)
    bm.full_kv_num_blocks[1] = 0  # the second sequence's FULL tiles now skipped
    _check(q, k, v, block_mask=bm, kernel_options=forced)


def test_documents_plan_of_a_mask_then_a_score_mod_on_it():
    """A documents mask's plan (fused, no score_mod) is not served to a call that adds a score_mod."""
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([150, 100, 134]))
    q, k, v = _qkv(384, 384)
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx),
                                    None, None, 384, 384, BLOCK_SIZE=64)
    assert flexattn.explain_call(q, k, v, block_mask=bm, print_it=False).path.name == "fused_documents"
    _check(q, k, v, block_mask=bm)
    _check(q, k, v, block_mask=bm, score_mod=lambda s, b, h, q_idx, kv_idx: s + 0.5 * (kv_idx - q_idx))


def test_full_tiles_are_attended_whole_in_rows_shared_by_the_batch():
    """A row whose (b, h) visit the same tiles runs as shared pieces; a tile FULL for one sequence
    and PARTIAL for another keeps FULL's meaning (attended whole, as torch's kernels do) even where
    the mask_mod now says otherwise (its captured tensor changed after the build)."""
    q, k, v = (x.expand(2, -1, -1, -1).contiguous() for x in _qkv(96, 96))
    lengths = torch.tensor([96, 70])
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < lengths[b], 2, None, 96, 96,
                                    BLOCK_SIZE=32)
    _check(q, k, v, block_mask=bm, kernel_options={"PATH": "generated_loop"})
    lengths[0] = 40  # sequence 0's last tiles are still FULL in the BlockMask
    _check(q, k, v, block_mask=bm, kernel_options={"PATH": "generated_loop"})


def test_documents_changed_after_the_build_run_on_the_tiles():
    """A captured tensor changed after the build changes the mask_mod, not the tiles: the BlockMask
    is no longer exact, so the documents plan (which reads the document ids, not the tiles) must
    not serve it."""
    docs = (torch.arange(512) >= 256).long()
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (docs[q_idx] == docs[kv_idx]) & (q_idx >= kv_idx),
                                    None, None, 512, 512, BLOCK_SIZE=64)
    q, k, v = _qkv(512, 512)
    assert flexattn.explain_call(q, k, v, block_mask=bm, print_it=False).path.name == "fused_documents"
    docs.copy_((torch.arange(512) >= 300).long())
    _check(q, k, v, block_mask=bm)


def test_a_cached_block_mask_written_in_place_is_not_served_again():
    """create_block_mask hands out copies of a cached mask that share its tile lists: lists a caller
    writes in place are neither served to the next create_block_mask nor taken as exact."""
    q, k, v = _qkv(256, 256)
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx  # noqa: E731
    first = flexattn.create_block_mask(causal, None, None, 256, 256, BLOCK_SIZE=64)
    assert first.decided_for(())
    first.full_kv_num_blocks[..., -1] = 0
    assert not first.decided_for(())
    _check(q, k, v, block_mask=first)
    again = flexattn.create_block_mask(causal, None, None, 256, 256, BLOCK_SIZE=64)
    assert int(again.full_kv_num_blocks[..., -1]) == 3 and again.decided_for(())
