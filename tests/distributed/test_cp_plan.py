"""The context-parallel planner alone (no processes): balance, ownership and the K/V each rank receives."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexattn
from flexattn.distributed import plan_context_parallel
from flexattn.errors import BlockMaskError, InputError

N = 16384  # 128 tiles of 128: 16 per rank at 8 ranks
DOC_LENGTHS = [8192, 2048, 2048, 1024, 1024, 512, 512, 1024]  # one long document, then short ones


def causal(b, h, q, kv):
    return q >= kv


def documents(lengths, n, causal_within=True):
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:n]
    doc = torch.cat([doc, torch.full((n - doc.numel(),), len(lengths))])

    def document_mask(b, h, q, kv):
        same = doc[q] == doc[kv]
        return same & (q >= kv) if causal_within else same
    return document_mask


@pytest.mark.parametrize("name, mask_mod", [("causal", causal), ("documents", documents(DOC_LENGTHS, N))])
def test_eight_ranks_within_five_percent_where_contiguous_is_not(name, mask_mod):
    bm = flexattn.create_block_mask(mask_mod, None, None, N, N)
    plan = plan_context_parallel(bm, 8)
    contiguous = plan_context_parallel(bm, 8, strategy="contiguous")
    mean = sum(plan.work) / 8
    assert all(abs(w - mean) <= 0.05 * mean for w in plan.work), (plan.strategy, plan.work)
    # Contiguous causal at R ranks tends to 2 - 1/R = 1.875 at 8 ranks (1.868 with 16 tiles a rank);
    # the long first document of DOC_LENGTHS makes it 2.9.
    assert contiguous.balance >= (1.86 if name == "causal" else 1.9), contiguous.balance
    total = int((bm.tile_classes() != 0).sum())
    assert sum(plan.work) == total  # work counts non-empty tiles (partial_weight=1)


def test_causal_picks_zigzag_and_sliding_window_stays_contiguous():
    assert plan_context_parallel(flexattn.create_block_mask(causal, None, None, N, N), 8).strategy == "zigzag"
    window = flexattn.create_block_mask(lambda b, h, q, kv: (q - kv).abs() <= 256, None, None, N, N)
    plan = plan_context_parallel(window, 8)
    # Every layout balances a band to within the edge rows; contiguous moves the least K/V.
    assert plan.strategy == "contiguous" and plan.balance < 1.05
    assert plan.pairs() == {(r, j) for r in range(8) for j in (r - 1, r + 1) if 0 <= j < 8}


def test_plan_is_cached_per_block_mask_and_frozen():
    bm = flexattn.create_block_mask(causal, None, None, 1024, 1024, BLOCK_SIZE=64)
    plan = plan_context_parallel(bm, 4)
    assert plan_context_parallel(bm, 4) is plan
    assert plan_context_parallel(bm, 4, strategy="lpt") is not plan
    with pytest.raises(AttributeError):
        plan.units = ()


def _check_plan(plan, bm, world):
    n = bm.seq_lengths[0]
    n_units = -(-n // plan.unit)
    owned = sorted(u for units in plan.units for u in units)
    assert owned == list(range(n_units))  # a partition of the units
    assert max(map(len, plan.units)) - min(map(len, plan.units)) <= 1  # equal memory per rank
    assert torch.equal(torch.cat([plan.positions(r) for r in range(world)]).sort().values, torch.arange(n))
    assert sum(plan.shard_length(r) for r in range(world)) == n
    dense = flexattn.create_mask(bm.mask_mod, None, None, n, n)[0, 0]
    for r in range(world):
        assert list(plan.units[r]) == sorted(plan.units[r])  # the short last unit comes last
        rows = plan.positions(r)
        wanted = dense[rows].any(0).nonzero().flatten() // plan.unit
        wanted = set(wanted.tolist()) - set(plan.units[r])
        got = [u for j, units in enumerate(plan.recv[r]) for u in units]
        assert all(u in plan.units[j] for j, units in enumerate(plan.recv[r]) for u in units)
        # Every unit a row attends is received (or owned); a unit received without an attended
        # position sits in a PARTIAL tile (the BlockMask is conservative, never the plan).
        assert wanted <= set(got) and len(got) == len(set(got))


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=6), window=st.integers(0, 200),
       kind=st.sampled_from(["documents", "window", "prefix"]), world=st.integers(1, 5), tail=st.integers(0, 31))
def test_plans_partition_the_sequence_and_receive_what_rows_attend(lengths, window, kind, world, tail):
    n = max(32 * world, sum(lengths)) + tail
    mask_mod = {"documents": documents(lengths, n, causal_within=window % 2 == 0),
                "window": lambda b, h, q, kv: (q - kv).abs() <= window,
                "prefix": lambda b, h, q, kv: (kv <= window) | (q >= kv)}[kind]
    bm = flexattn.create_block_mask(mask_mod, None, None, n, n, BLOCK_SIZE=32)
    plans = {s: plan_context_parallel(bm, world, strategy=s) for s in ("auto", "contiguous", "zigzag", "lpt")}
    for plan in plans.values():
        _check_plan(plan, bm, world)
    assert plans["auto"].balance <= min(p.balance for p in plans.values()) + 0.05 + 1e-9


def test_uneven_block_sizes_use_the_larger_as_unit():
    bm = flexattn.create_block_mask(causal, None, None, 1000, 1000, BLOCK_SIZE=(64, 32))
    plan = plan_context_parallel(bm, 3)
    assert plan.unit == 64
    _check_plan(plan, bm, 3)


def test_planner_errors_name_the_fix():
    bm = flexattn.create_block_mask(causal, None, None, 256, 256, BLOCK_SIZE=64)
    with pytest.raises(InputError, match="fewer than world_size=8.*smaller BLOCK_SIZE"):
        plan_context_parallel(bm, 8)
    with pytest.raises(InputError, match="strategy"):
        plan_context_parallel(bm, 2, strategy="ring")
    with pytest.raises(InputError, match="world_size"):
        plan_context_parallel(bm, 0)
    with pytest.raises(BlockMaskError, match="Q_LEN == KV_LEN"):
        plan_context_parallel(flexattn.create_block_mask(causal, None, None, 256, 512, BLOCK_SIZE=64), 2)
    with pytest.raises(BlockMaskError, match="divide"):
        plan_context_parallel(flexattn.create_block_mask(causal, None, None, 256, 256, BLOCK_SIZE=(48, 32)), 2)
