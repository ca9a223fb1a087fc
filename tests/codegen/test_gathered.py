"""The fused path's gathered rows (codegen.torch_backend.gathered): scattered FULL tiles of a row in
one call, GQA heads stacked as rows, against the dense reference, forward and backward."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexattn
from codegen.torch_backend import fused_paths, gathered
from flexattn import api


def test_rows_of_several_short_runs_are_gathered_and_tall_rectangles_stay():
    rectangles = [(0, 8, 0, 1), (2, 3, 3, 4), (2, 3, 6, 8), (3, 4, 5, 6), (4, 5, 1, 2), (4, 5, 7, 9)]
    kept, batches = gathered.gather_scattered(rectangles, whole_kv_tiles=8)
    # Rows 2 and 4 are crossed by two short rectangles each: gathered. Row 4's run into the ragged
    # tile 8 stays a rectangle, row 3 (one run) and the tall rectangle over rows 0-7 stay too.
    assert (0, 8, 0, 1) in kept and (3, 4, 5, 6) in kept and (4, 5, 7, 9) in kept
    by_row = {int(row): cols.tolist() for batch in batches for row, cols in zip(batch.rows, batch.columns)}
    assert by_row == {2: [3, 6, 7], 4: [1]}
    assert all(len(set(b.rows.tolist())) == len(b.rows) for b in batches)


def test_a_tall_rectangle_moves_when_all_its_rows_are_gathered():
    rectangles = [(0, 2, 0, 1), (0, 1, 3, 4), (0, 1, 5, 6), (1, 2, 2, 3), (1, 2, 4, 5)]
    kept, batches = gathered.gather_scattered(rectangles, whole_kv_tiles=8)
    assert kept == []
    by_row = {int(row): cols.tolist() for batch in batches for row, cols in zip(batch.rows, batch.columns)}
    assert by_row == {0: [0, 3, 5], 1: [0, 2, 4]}


def _selection_mask(n_blocks: int, heads: int, seed: int, per_group: int, density: float = 0.35):
    """A block selection (NSA-like): per head, random earlier blocks plus the diagonal and the blocks 2
    and 4 before it (rows of scattered FULL tiles), causal inside."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(1, heads // per_group, n_blocks, n_blocks, generator=g) < density
    rows, cols = torch.arange(n_blocks)[:, None], torch.arange(n_blocks)[None, :]
    chosen |= (rows == cols) | (rows - cols == 2) | (rows - cols == 4)
    chosen = chosen.tril().repeat_interleave(per_group, dim=1)

    def mask(b, h, q_idx, kv_idx):
        return chosen[b, h, q_idx // 16, kv_idx // 16] & (q_idx >= kv_idx)

    return mask


def _check_against_reference(blocks, ragged, kv_heads, group, shared, seed, density):
    L = blocks * 16 - ragged
    Hq = kv_heads * group
    mask = _selection_mask(blocks, Hq, seed, group if shared else 1, density)
    bm = flexattn.create_block_mask(mask, 1, Hq, L, L, BLOCK_SIZE=16)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, L, 8, generator=g, dtype=torch.float64).requires_grad_()
               for h in (Hq, kv_heads, kv_heads))
    options = {"PATH": "fused_tiles"}
    out, lse = flexattn.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=options,
                                       return_lse=True)
    want, want_lse = flexattn.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend="reference",
                                             return_lse=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * grad_out).sum() + (lse * grad_lse).sum(), (q, k, v))
    expected = torch.autograd.grad((want * grad_out).sum() + (want_lse * grad_lse).sum(), (q, k, v))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    _, call = api._prepare(q, k, v, None, bm, None, True, options, False, "auto")
    return fused_paths.tile_plan(call, True)[0]


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(3, 9), ragged=st.integers(0, 15), kv_heads=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2, 3]), shared=st.booleans(), seed=st.integers(0, 2**16))
def test_gathered_rows_equal_the_reference_forward_and_backward(blocks, ragged, kv_heads, group, shared, seed):
    _check_against_reference(blocks, ragged, kv_heads, group, shared, seed, density=0.35)


@pytest.mark.parametrize("ragged", [0, 5])
@pytest.mark.parametrize("group, shared", [(1, False), (2, False), (2, True), (3, True)])
def test_a_fixed_selection_with_scattered_rows_equals_the_reference(ragged, group, shared):
    """Only the diagonal and the blocks 2 and 4 before it: from row 4 on, two separate FULL tiles a row."""
    units = _check_against_reference(7, ragged, 2, group, shared, 0, density=0.0)
    assert all(u.gathered for u in units)


def test_a_block_selection_takes_the_fused_path_with_stacked_heads():
    """8 query heads, 2 KV heads sharing each group's selection: one unit per group, its rows gathered,
    and the unit's keys read per KV head (not expanded)."""
    n, Hq, Hkv = 2048, 8, 2
    mask = _selection_mask(n // 16, Hq, 0, Hq // Hkv)
    bm = flexattn.create_block_mask(mask, 1, Hq, n, n, BLOCK_SIZE=16)
    q = torch.randn(1, Hq, n, 16)
    k, v = torch.randn(1, Hkv, n, 16), torch.randn(1, Hkv, n, 16)
    choice = flexattn.explain_call(q, k, v, block_mask=bm, enable_gqa=True, print_it=False)
    assert choice.path.name == "fused_tiles", str(choice)
    _, call = api._prepare(q, k, v, None, bm, None, True, None, False, "auto")
    units, _ = fused_paths.tile_plan(call, False)
    assert all(u.gathered for u in units)
    keys = gathered.UnitKeys(None, None, k, v, units[0].b, units[0].h, Hq // Hkv)
    assert keys.group == Hq // Hkv and keys.k.shape[1] == units[0].h.stop // 4 - units[0].h.start // 4


@pytest.mark.parametrize("score", [None, "softcap"])
def test_no_rows_are_gathered_with_a_score_mod(score):
    n, H = 256, 2
    bm = flexattn.create_block_mask(_selection_mask(n // 16, H, 1, 1), 1, H, n, n, BLOCK_SIZE=16)
    q = k = v = torch.randn(1, H, n, 16)
    score_mod = (lambda s, b, h, q_idx, kv_idx: s + 0.5 * (q_idx - kv_idx)) if score else None
    _, call = api._prepare(q, k, v, score_mod, bm, None, False, {"PATH": "fused_tiles"}, False, "auto")
    units, _ = fused_paths.tile_plan(call, True)
    assert any(u.gathered for u in units) == (score is None)


def test_a_block_selection_equals_torch_flex_attention():
    """The same selection through torch's own flex_attention: out and lse match flexattn's gathered plan."""
    from torch.nn.attention import flex_attention as tfa

    n, Hq, Hkv = 512, 4, 2
    mask = _selection_mask(n // 16, Hq, 5, Hq // Hkv)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, Hq, n, 16, generator=g)
    k, v = torch.randn(1, Hkv, n, 16, generator=g), torch.randn(1, Hkv, n, 16, generator=g)
    ours = flexattn.create_block_mask(mask, 1, Hq, n, n, BLOCK_SIZE=16)
    out, lse = flexattn.flex_attention(q, k, v, block_mask=ours, enable_gqa=True, return_lse=True,
                                       kernel_options={"PATH": "fused_tiles"})
    torch._dynamo.reset()  # torch's eager flex runs through dynamo, whose cache can mix closures
    theirs = tfa.create_block_mask(mask, 1, Hq, n, n, device="cpu", BLOCK_SIZE=16)
    with torch.no_grad():
        want, aux = tfa.flex_attention(q, k, v, block_mask=theirs, enable_gqa=True, return_aux=tfa.AuxRequest(lse=True))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, aux.lse, rtol=1e-5, atol=1e-5)
