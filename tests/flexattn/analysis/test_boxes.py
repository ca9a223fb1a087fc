"""Box decisions are sound: what the range evaluation claims about a box holds at its positions."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mask_programs import as_mask_mod, mask_expr

import flexattn
from flexattn.analysis.boxes import Boxes, decide, evaluate_positions, refine_tiles
from flexattn.analysis.buffer_ranges import BufferRanges
from flexattn.analysis.intervals import Range
from flexattn.block_mask import EMPTY, FULL, PARTIAL
from flexattn.semantics import evaluate
from flexattn.trace import trace_mask_mod


def _boxes(corners):
    fields = zip(*[(b, h, q, q + dq, kv, kv + dkv) for b, h, q, dq, kv, dkv in corners])
    return Boxes(*(np.array(f, dtype=np.int64) for f in fields))


def _values(traced, b, h, q_lo, q_hi, kv_lo, kv_hi):
    q = torch.arange(q_lo, q_hi + 1).view(-1, 1)
    kv = torch.arange(kv_lo, kv_hi + 1).view(1, -1)
    env = {"b": torch.tensor(b), "h": torch.tensor(h), "q_idx": q, "kv_idx": kv}
    return evaluate(traced.graph, env, traced.buffers).to(torch.bool).expand(len(q), kv.shape[1])


box = st.tuples(st.integers(0, 1), st.integers(0, 2), st.integers(0, 140), st.integers(0, 40),
                st.integers(0, 140), st.integers(0, 40))


@settings(max_examples=300, deadline=None)
@given(expr=mask_expr(2), corners=st.lists(box, min_size=1, max_size=6))
def test_decisions_hold_at_every_position(expr, corners):
    traced = trace_mask_mod(as_mask_mod(expr))
    boxes = _boxes(corners)
    always_true, always_false, both, _, _ = decide(traced.graph, BufferRanges(traced.buffers), boxes)
    some_true, some_false = evaluate_positions(traced.graph, traced.buffers, boxes)
    for i, corner in enumerate(corners):
        values = _values(traced, *(int(getattr(boxes, f)[i]) for f in boxes.__dataclass_fields__))
        assert bool(some_true[i]) == bool(values.any()) and bool(some_false[i]) == bool((~values).any())
        if always_true[i]:
            assert values.all(), corner
        if always_false[i]:
            assert not values.any(), corner
        if both[i]:
            assert values.any() and not values.all(), corner


@settings(max_examples=150, deadline=None)
@given(expr=mask_expr(2), corners=st.lists(box, min_size=1, max_size=4), ragged=st.booleans())
def test_refined_classes_are_exact(expr, corners, ragged):
    traced = trace_mask_mod(as_mask_mod(expr))
    tiles = _boxes(corners)
    flags = np.full(len(tiles), ragged)
    classes, _ = refine_tiles(traced.graph, traced.buffers, BufferRanges(traced.buffers), tiles, flags)
    for i in range(len(tiles)):
        values = _values(traced, *(int(getattr(tiles, f)[i]) for f in tiles.__dataclass_fields__))
        expected = EMPTY if not values.any() else (FULL if values.all() and not ragged else PARTIAL)
        assert int(classes[i]) == expected


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(0, 3), min_size=1, max_size=30), lo=st.integers(-5, 35), width=st.integers(0, 40))
def test_first_change_is_the_first_index_where_a_clamped_load_changes(values, lo, width):
    buf = torch.tensor(values)
    hi = lo + width
    got = int(BufferRanges([buf]).first_change(0, np.array([lo]), np.array([hi]))[0])
    at = [int(buf[min(max(i, 0), len(values) - 1)]) for i in range(lo, hi + 1)]
    expected = next((lo + i for i in range(1, len(at)) if at[i] != at[i - 1]), -1)
    assert got == expected
    summary = BufferRanges([buf])(0, [Range(np.array([lo]), np.array([hi]))])
    assert int(summary.lo[0]) == min(at) and int(summary.hi[0]) == max(at)


@settings(max_examples=200, deadline=None)
@given(corners=st.lists(box, min_size=1, max_size=5), cut_at=st.lists(st.integers(-1, 45), min_size=2, max_size=2))
def test_split_partitions_each_box(corners, cut_at):
    boxes = _boxes(corners)
    q_cut = boxes.q_lo + cut_at[0] if cut_at[0] >= 0 else np.full_like(boxes.q_lo, -1)
    kv_cut = boxes.kv_lo + cut_at[1] if cut_at[1] >= 0 else np.full_like(boxes.kv_lo, -1)
    children, parent = boxes.split(q_cut, kv_cut)
    for i in range(len(boxes)):
        cover = np.zeros((int(boxes.q_hi[i] - boxes.q_lo[i]) + 1, int(boxes.kv_hi[i] - boxes.kv_lo[i]) + 1),
                         dtype=np.int64)
        for j in np.flatnonzero(parent == i).tolist():
            assert children.q_lo[j] <= children.q_hi[j] and children.kv_lo[j] <= children.kv_hi[j]
            cover[int(children.q_lo[j] - boxes.q_lo[i]):int(children.q_hi[j] - boxes.q_lo[i]) + 1,
                  int(children.kv_lo[j] - boxes.kv_lo[i]):int(children.kv_hi[j] - boxes.kv_lo[i]) + 1] += 1
        assert np.all(cover == 1)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 3), min_size=6, max_size=6), min_size=1, max_size=3),
       row=st.integers(-1, 4), lo=st.integers(-3, 8), width=st.integers(0, 9), sort=st.booleans())
def test_rows_of_a_buffer_are_summarised_exactly_when_the_leading_index_is_one_value(rows, row, lo, width, sort):
    buf = torch.tensor([sorted(r) for r in rows] if sort else rows)
    hi, point = lo + width, Range(np.array([row]), np.array([row]))
    read = buf[min(max(row, 0), len(rows) - 1)]
    at = [int(read[min(max(i, 0), buf.shape[1] - 1)]) for i in range(lo, hi + 1)]
    summary = BufferRanges([buf])(0, [point, Range(np.array([lo]), np.array([hi]))])
    assert int(summary.lo[0]) == min(at) and int(summary.hi[0]) == max(at)
    got = int(BufferRanges([buf]).first_change(0, np.array([lo]), np.array([hi]), [point])[0])
    assert got == next((lo + i for i in range(1, len(at)) if at[i] != at[i - 1]), -1)
    # Two rows read at once: their values combined, exactly.
    spread = BufferRanges([buf])(0, [Range(np.array([0]), np.array([1])), Range(np.array([lo]), np.array([hi]))])
    both = [int(buf[min(r, len(rows) - 1), min(max(i, 0), buf.shape[1] - 1)]) for r in (0, 1) for i in range(lo, hi + 1)]
    assert int(spread.lo[0]) == min(both) and int(spread.hi[0]) == max(both)


def test_per_batch_document_ids_decide_tiles_without_positions():
    doc = torch.tensor([[0] * 300 + [1] * 212, [0] * 100 + [1] * 412])
    block_mask = flexattn.create_block_mask(lambda b, h, q, kv: doc[b, q] == doc[b, kv], 2, 1, 512, 512)
    assert block_mask.stats["refined"] == 0  # decided from the rows' ranges and cuts, none position by position
    dense = doc[:, :, None] == doc[:, None, :]
    torch.testing.assert_close(block_mask.to_dense()[:, 0].bool(), dense.view(2, 4, 128, 4, 128).any(-1).any(2))


def test_block_tables_read_over_a_tile_decide_it_without_positions():
    table = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) < 0.3  # 64-position blocks, as BigBird's
    block_mask = flexattn.create_block_mask(lambda b, h, q, kv: table[q // 64, kv // 64], 1, 1, 512, 512)
    assert block_mask.stats["refined"] == 0  # tiles mixing blocks are cut at the blocks, never evaluated
    dense = table.repeat_interleave(64, 0).repeat_interleave(64, 1)
    torch.testing.assert_close(block_mask.to_dense()[0, 0].bool(), dense.view(4, 128, 4, 128).any(-1).any(1))
