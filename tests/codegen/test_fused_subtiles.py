"""PARTIAL tiles cut into rectangles and causal triangles (``codegen.torch_backend.subtiles``) on the
fused tile path: the pieces cover exactly the positions a tile keeps, and the fused plan equals
the dense reference, forward and backward, for window edges at every offset within a tile, spans
smaller than a tile, sink columns, GQA and lengths that are not a multiple of the tile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexattn
from codegen.torch_backend import fused_paths, subtiles
from flexattn import dispatch
from flexattn.api import mask_of
from flexattn.block_mask import LOWER, UPPER


def _painted(found, Q, K):
    """The positions the pieces keep, and whether two pieces overlap."""
    keep, overlap = torch.zeros(Q, K, dtype=torch.bool), False
    for kind, r0, r1, c0, c1 in found:
        n, m = r1 - r0, c1 - c0
        piece = torch.ones(n, m, dtype=torch.bool)
        if kind is not None:
            assert n == m, "a triangle is a square"
            piece = piece.tril() if kind == LOWER else piece.triu()
        overlap |= bool((keep[r0:r1, c0:c1] & piece).any())
        keep[r0:r1, c0:c1] |= piece
    return keep, overlap


def _profile(keep):
    profile, ok = subtiles.profiles(keep[None, None, None])
    return profile[0, 0].tolist(), profile[0, 1].tolist(), bool(ok[0])


# Tile masks: a window edge or causal edge at any offset, a band, sink columns, and their unions.
edges = st.tuples(st.sampled_from(["upper", "lower", "band", "sink", "rect", "random"]),
                  st.integers(-20, 20), st.integers(1, 20), st.integers(0, 2**16))


def _tile(kind, offset, width, seed, Q, K):
    r, c = torch.arange(Q)[:, None], torch.arange(K)[None, :]
    if kind == "upper":
        return c - r >= offset
    if kind == "lower":
        return c - r <= offset
    if kind == "band":
        return (c - r >= offset) & (c - r < offset + width)
    if kind == "sink":
        return (c < width).expand(Q, K)
    if kind == "rect":
        return (r >= abs(offset) % Q) & (r < abs(offset) % Q + width) & (c >= width // 2) & (c < width)
    return torch.rand(Q, K, generator=torch.Generator().manual_seed(seed)) < 0.5


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(edges, min_size=1, max_size=2), intersect=st.booleans(), Q=st.sampled_from([8, 16, 13]),
       K=st.sampled_from([8, 16, 11]))
def test_pieces_cover_exactly_what_a_tile_keeps(parts, intersect, Q, K):
    keep = _tile(*parts[0], Q, K)
    for part in parts[1:]:
        keep = keep & _tile(*part, Q, K) if intersect else keep | _tile(*part, Q, K)
    lo, hi, ok = _profile(keep)
    found = subtiles.pieces(lo, hi) if ok else None
    if found is not None:
        painted, overlap = _painted(found, Q, K)
        assert torch.equal(painted, keep) and not overlap
        assert len(found) <= subtiles.MAX_PIECES
    if parts[0][0] in ("upper", "lower", "sink") and len(parts) == 1:
        assert found is not None, "a single edge or a sink column is always cut"


def test_a_row_with_two_runs_is_not_cut():
    keep = torch.zeros(4, 8, dtype=torch.bool)
    keep[:, :2] = keep[:, 5:] = True
    assert not _profile(keep)[2]


def _call(q, k, v, bm):
    mask = mask_of(bm)
    return dispatch.call_of(q, k, v, score_graph=None, score_buffers=(), mask_graph=mask.graph,
                            mask_buffers=mask.buffers, block_mask=bm, scale=None,
                            enable_gqa=q.shape[1] != k.shape[1], kernel_options={"PATH": "fused_tiles"})


def _moa(span, sink):
    """Per-head windows (``span`` (H,)) or per-(batch row, head) windows (``span`` (B, H)), and a sink."""
    if span.dim() == 2:
        return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & ((q_idx - kv_idx < span[b, h]) | (kv_idx < sink))
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & ((q_idx - kv_idx < span[h]) | (kv_idx < sink))


def _inputs(batch, Hq, Hkv, L, seed, grads=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, Hq, L, 8, generator=g, dtype=torch.float64, requires_grad=grads)
    k, v = (torch.randn(batch, Hkv, L, 8, generator=g, dtype=torch.float64, requires_grad=grads) for _ in range(2))
    return q, k, v


def _check(spans, sink, L, block, batch=1, group=1, seed=0, grads=True, per_batch=False):
    """The forced fused_tiles plan against the dense reference, forward and backward; ``spans`` per
    head, or per (batch row, head) with ``per_batch`` (the BlockMask then has a row per batch row)."""
    span = torch.tensor(spans)
    Hq = span.shape[-1]
    q, k, v = _inputs(batch, Hq, Hq // group, L, seed, grads)
    bm = flexattn.create_block_mask(_moa(span, sink), batch if per_batch else None, Hq, L, L, BLOCK_SIZE=block)
    gqa = group > 1
    aux = flexattn.AuxRequest(lse=True)
    out, got = flexattn.flex_attention(q, k, v, block_mask=bm, backend="torch", enable_gqa=gqa, return_aux=aux,
                                       kernel_options={"PATH": "fused_tiles"})
    ref, want = flexattn.flex_attention(q, k, v, block_mask=bm, backend="reference", enable_gqa=gqa, return_aux=aux)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(got.lse, want.lse)
    if grads:  # through out and the lse both
        g = torch.Generator().manual_seed(seed)
        grad, grad_lse = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(got.lse.shape, generator=g,
                                                                                          dtype=out.dtype)
        mine = torch.autograd.grad((out, got.lse), (q, k, v), (grad, grad_lse))
        for a, b in zip(mine, torch.autograd.grad((ref, want.lse), (q, k, v), (grad, grad_lse))):
            torch.testing.assert_close(a, b)
    return fused_paths.tile_plan(_call(q, k, v, bm), True)[0]


@pytest.mark.parametrize("offset", range(16))
def test_window_edges_at_every_offset_within_a_tile(offset):
    """Spans 3 tiles + offset and offset alone (smaller than a tile), a sink of 5 and of a tile."""
    units = _check([48 + offset, max(offset, 1), 16 + offset, 32], 5, 128, 16)
    assert any(u.subtiles for u in units)
    _check([48 + offset, max(offset, 1)], 16, 128, 16, group=2, grads=False)


def test_the_edges_and_sink_of_a_moa_mask_need_no_additive_mask():
    """Spans that are multiples of the tile, or of half a tile, and a sink of half a tile: every
    PARTIAL tile but the first rows' is cut (the plan keeps PARTIAL batches only there)."""
    units = _check([8, 136, 16, 144, 32, 288], 8, 512, 16)
    left = sum(len(batch) for u in units for batch in u.batches)
    cut = sum(len(batch) for u in units for g in u.subtiles for batch in g.batches)
    assert cut > 20 * left


@settings(max_examples=40, deadline=None)
@given(spans=st.lists(st.integers(1, 70), min_size=1, max_size=3), sink=st.sampled_from([0, 3, 8, 16, 21]),
       L=st.integers(17, 100), block=st.sampled_from([8, 16]), batch=st.integers(1, 2), group=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_per_head_windows_with_sinks_equal_the_reference(spans, sink, L, block, batch, group, seed):
    _check([s for s in spans for _ in range(group)], sink, L, block, batch, group, seed)


@settings(max_examples=20, deadline=None)
@given(spans=st.lists(st.lists(st.integers(1, 70), min_size=2, max_size=2), min_size=2, max_size=2),
       sink=st.sampled_from([0, 5, 16]), L=st.integers(33, 90), group=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_per_batch_row_windows_equal_the_reference(spans, sink, L, group, seed):
    """A span per (batch row, head): a unit per batch row, each cut for its own windows."""
    _check(spans, sink, L, 16, 2, group, seed, per_batch=True)


def _pieces(units):
    return [(g.kind, g.r0, g.r1, g.c0, g.c1, [b.tolist() for b in g.batches]) for u in units for g in u.subtiles]


def test_a_span_changed_in_place_cuts_the_tiles_again():
    """The pieces are kept with the plan per BlockMask, stamped with the mask's buffers: a span
    changed in place, with the BlockMask rebuilt or not, is planned again, never served the old
    pieces. The BlockMask kept from the old span still decides which tiles are visited (FULL tiles
    take no mask), so the reference then evaluates the new span on its PARTIAL tiles only."""
    span = torch.tensor([40, 24])
    mask_mod = _moa(span, 4)
    q, k, v = _inputs(1, 2, 2, 96, seed=3)
    bm = flexattn.create_block_mask(mask_mod, None, 2, 96, 96, BLOCK_SIZE=16)
    seen = []
    for new, rebuild in (([40, 24], False), ([41, 23], False), ([17, 64], True), ([24, 40], False)):
        span.copy_(torch.tensor(new))
        if rebuild:
            bm = flexattn.create_block_mask(mask_mod, None, 2, 96, 96, BLOCK_SIZE=16)
        out = flexattn.flex_attention(q, k, v, block_mask=bm, kernel_options={"PATH": "fused_tiles"})
        ref = flexattn.flex_attention(q, k, v, block_mask=bm, backend="reference")
        torch.testing.assert_close(out, ref)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(len(seen)), dtype=out.dtype)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a, b)
        seen.append(_pieces(fused_paths.tile_plan(_call(q, k, v, bm), True)[0]))
    assert seen[0] != seen[1] and seen[2] != seen[3], "the pieces follow the span"
