"""Box decisions are sound: what the range evaluation claims about a box holds at its positions."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mask_programs import as_mask_mod, mask_expr

from flexattn.analysis.boxes import Boxes, decide, evaluate_positions, refine_tiles
from flexattn.analysis.buffer_ranges import BufferRanges
from flexattn.block_mask import EMPTY, FULL, PARTIAL
from flexattn.semantics import evaluate
from flexattn.trace import trace_mask_mod


def _boxes(corners):
    fields = zip(*[(b, h, q, q + dq, kv, kv + dkv) for b, h, q, dq, kv, dkv in corners])
    return Boxes(*(torch.tensor(f, dtype=torch.int64) for f in fields))


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
    flags = torch.full((len(tiles),), ragged)
    classes, _ = refine_tiles(traced.graph, traced.buffers, BufferRanges(traced.buffers), tiles, flags)
    for i in range(len(tiles)):
        values = _values(traced, *(int(getattr(tiles, f)[i]) for f in tiles.__dataclass_fields__))
        expected = EMPTY if not values.any() else (FULL if values.all() and not ragged else PARTIAL)
        assert int(classes[i]) == expected
