"""The fused tile plan on per-head tile matrices: heads with equal tile classes share one unit (one
fused call serves them together), and each unit's aligned squares of exact causal triangles run in
the kernel's causal mode, decided for that unit's heads. Every plan must equal the dense reference,
forward and backward, and a plan kept by tile classes must never serve a mask whose diagonal tiles
differ under the same classes."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexattn
from codegen.torch_backend import fused_paths, fused_plan
from flexattn import dispatch
from flexattn.api import mask_of
from flexattn.block_mask import LOWER


def _call(q, k, v, bm, options):
    mask = mask_of(bm)
    return dispatch.call_of(q, k, v, score_graph=None, score_buffers=(), mask_graph=mask.graph,
                            mask_buffers=mask.buffers, block_mask=bm, scale=None, enable_gqa=False,
                            kernel_options=options)


def _check(q, k, v, bm, seed):
    out = flexattn.flex_attention(q, k, v, block_mask=bm, backend="torch",
                                  kernel_options={"PATH": "fused_tiles"})
    ref = flexattn.flex_attention(q, k, v, block_mask=bm, backend="reference")
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b)


@settings(max_examples=30, deadline=None)
@given(spans=st.lists(st.sampled_from([1, 8, 16, 17, 32, 40, 64, 200]), min_size=1, max_size=4),
       shifts=st.lists(st.sampled_from([0, 16, 24]), min_size=4, max_size=4), sink=st.sampled_from([0, 8]),
       batch=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_per_head_windows_and_shifted_groups_equal_the_reference(spans, shifts, sink, batch, seed):
    """MoA-like per-head windows with a sink, and S2-like per-head shifted causal groups."""
    H, L = len(spans), 128
    span, shift = torch.tensor(spans), torch.tensor(shifts[:H])

    def mask_mod(b, h, q_idx, kv_idx):
        window = (q_idx >= kv_idx) & ((q_idx - kv_idx < span[h]) | (kv_idx < sink))
        q_pos, kv_pos = (q_idx - shift[h]) % L, (kv_idx - shift[h]) % L
        return window | ((q_pos // 64 == kv_pos // 64) & (q_pos >= kv_pos) & (span[h] > 100))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, H, L, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bm = flexattn.create_block_mask(mask_mod, None, H, L, L, BLOCK_SIZE=8)
    _check(q, k, v, bm, seed)


def test_heads_with_equal_tiles_share_a_unit_with_causal_squares():
    H, L, group = 8, 1024, 256
    shift = (torch.arange(H) >= H // 2) * (group // 2)

    def s2(b, h, q_idx, kv_idx):
        q_pos, kv_pos = (q_idx - shift[h]) % L, (kv_idx - shift[h]) % L
        return (q_pos // group == kv_pos // group) & (q_pos >= kv_pos)
    bm = flexattn.create_block_mask(s2, None, H, L, L, BLOCK_SIZE=64)
    q, k, v = (torch.randn(1, H, L, 16, generator=torch.Generator().manual_seed(i), dtype=torch.float64,
                           requires_grad=True) for i in range(3))
    units, _ = fused_paths.tile_plan(_call(q, k, v, bm, {}), True)
    assert [(u.h.start, u.h.stop) for u in units] == [(0, 4), (4, 8)]
    assert all(kind == LOWER for u in units for *_, kind in u.squares) and all(u.squares for u in units)
    _check(q, k, v, bm, 0)


def test_a_plan_kept_by_tile_classes_does_not_serve_other_diagonal_tiles():
    """Two per-head masks with the same tile classes: causal per head, and one head whose diagonal
    tiles keep q > kv (strictly): the second must not reuse the first's causal squares."""
    L, H = 512, 2
    strict = torch.tensor([0, 1])
    first = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (strict[h] >= 0), None, H, L, L,
                                       BLOCK_SIZE=64)
    second = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & ((q_idx > kv_idx) |
                                        (strict[h] == 0) | (q_idx == 0)), None, H, L, L, BLOCK_SIZE=64)
    assert first.tile_classes().shape[:2] == (1, H) and torch.equal(first.tile_classes(), second.tile_classes())
    for bm in (first, second):
        q, k, v = (torch.randn(1, H, L, 16, generator=torch.Generator().manual_seed(i), dtype=torch.float64,
                               requires_grad=True) for i in range(3))
        _check(q, k, v, bm, 1)


def test_merged_heads_count_their_calls_per_head_in_the_cost_estimate():
    """Scattered 64 x 64 tiles selected alike for a group of heads (NSA's selection is shared by its
    GQA group): one unit serves the heads, but the estimate counts a call per head, as for heads
    planned one by one (measured: a call over several heads of small rectangles costs about what
    the calls per head did, and the loop stays faster on NSA)."""
    g = torch.Generator().manual_seed(0)
    n_blocks, causal_tiles = 128, torch.ones(128, 128, dtype=torch.bool).tril()
    scores = torch.rand(1, 1, n_blocks, n_blocks, generator=g).masked_fill(~causal_tiles, -1.0)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(4, dim=-1).indices, True)
    chosen = ((chosen | torch.eye(n_blocks, dtype=torch.bool)) & causal_tiles).expand(1, 4, -1, -1)
    lists = lambda sel: (sel.sum(-1).int(), torch.argsort(~sel, dim=-1, stable=True).int())  # noqa: E731
    diagonal = torch.eye(n_blocks, dtype=torch.bool)
    bm = flexattn.BlockMask.from_kv_blocks(*lists(chosen & diagonal), *lists(chosen & ~diagonal), BLOCK_SIZE=64,
                                           mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    classes = bm.tile_classes()
    merged = fused_plan.plan_units(classes, 1, 4)
    one_head = fused_plan.plan_units(classes[:, :1], 1, 1)
    assert len(merged) == 1 and merged[0].h == slice(0, 4)
    full, cut, partial, calls = fused_plan.fused_cost(merged, (64, 64), 8192, 8192)
    full_1, cut_1, partial_1, calls_1 = fused_plan.fused_cost(one_head, (64, 64), 8192, 8192)
    assert (full, cut, partial, calls) == (4 * full_1, 4 * cut_1, 4 * partial_1, 4 * calls_1)
