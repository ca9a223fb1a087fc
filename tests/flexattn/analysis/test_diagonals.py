"""Diagonal tile kinds (flexattn.analysis.diagonals) against the dense mask, tile by tile."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mask_programs import as_mask_mod, mask_expr

import flexattn
from flexattn.analysis.diagonals import DiagonalKinds
from flexattn.block_mask import LOWER, NEITHER, UPPER


def _dense_kinds(mask_mod, B, H, L, S, block, tiles):
    dense = flexattn.create_mask(mask_mod, B, H, L, S)  # (B, H, L, S)
    lower = torch.ones(block, block, dtype=torch.bool).tril()
    kinds = []
    for i, j in tiles.tolist():
        if (i + 1) * block > L or (j + 1) * block > S:
            kinds.append(NEITHER)
            continue
        tile = dense[:, :, i * block:(i + 1) * block, j * block:(j + 1) * block]
        kinds.append(LOWER if bool((tile == lower).all()) else UPPER if bool((tile == lower.T).all()) else NEITHER)
    return kinds


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.one_of(mask_expr(1), mask_expr(1).map("((q_idx >= kv_idx) & {})".format),
                 mask_expr(0).map("((q_idx <= kv_idx) | {})".format),
                 st.integers(0, 40).map("(q_idx >= kv_idx) & (q_idx - kv_idx <= {})".format)), st.integers(1, 2), st.integers(1, 3), st.integers(20, 90), st.integers(20, 90),
       st.sampled_from([8, 16]))
def test_kinds_equal_the_dense_mask(body, B, H, L, S, block):
    mask_mod = as_mask_mod(body)
    traced = flexattn.trace_mask_mod(mask_mod)
    tiles = torch.cartesian_prod(torch.arange(-(-L // block)), torch.arange(-(-S // block)))
    kinds = DiagonalKinds(traced.graph, traced.buffers, B, H, L, S, block)(tiles)
    assert kinds.tolist() == _dense_kinds(mask_mod, B, H, L, S, block, tiles)



def test_causal_and_window_edges():
    window = 32
    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    traced = flexattn.trace_mask_mod(mask)
    kinds = DiagonalKinds(traced.graph, traced.buffers, 1, 1, 128, 128, 16)
    assert kinds(torch.tensor([[0, 0], [3, 1], [2, 1], [7, 7]])).tolist() == [LOWER, UPPER, NEITHER, LOWER]
