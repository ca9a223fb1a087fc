"""context_parallel_attention across 2 and 4 gloo processes equals single-process flex_attention.

One spawn per world size runs every case (tests/distributed/cp_worker.py) and records each rank's
relative errors; the tests below assert on them. fp32: forward < 1e-5, gradients < 1e-4.
"""

import json
import tempfile
from pathlib import Path

import pytest
import torch.multiprocessing as mp

import cp_worker


def _spawn(world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        # A fresh file:// rendezvous per run: parallel test runs never share a port or a store.
        mp.spawn(cp_worker.main, args=(world, f"{tmp}/init", tmp), nprocs=world, join=True)
        return [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks():
    return _spawn(2)


@pytest.fixture(scope="module")
def four_ranks():
    return _spawn(4)


def _check(results: list[dict], name: str) -> None:
    for rank, per_rank in enumerate(results):
        case = per_rank[name]
        assert "exception" not in case, f"rank {rank}: {case.get('exception')}"
        errors = case["errors"]
        for label in ("out", "lse", "unshard"):
            assert errors[label] < 1e-5, (rank, label, errors)
        for label in ("dq", "dk", "dv", "dbias"):
            if label in errors:
                assert errors[label] < 1e-4, (rank, label, errors)
    # Every rank traced its local mods to the same IR (nothing is specialised per rank).
    assert len({tuple(r[name]["ir_keys"][:1]) for r in results}) == 1


@pytest.mark.parametrize("name", list(cp_worker.CASES))
def test_two_ranks_match_single_process(two_ranks, name):
    _check(two_ranks, name)


@pytest.mark.parametrize("name", cp_worker.FOUR_RANK_CASES)
def test_four_ranks_match_single_process(four_ranks, name):
    _check(four_ranks, name)


def test_bias_table_gradient_is_summed_over_ranks(two_ranks):
    assert "dbias" in two_ranks[0]["bias_table"]["errors"]


def test_errors_are_raised_on_every_rank_before_any_exchange(two_ranks):
    r0, r1 = (r["errors"] for r in two_ranks)
    # The rank with the short shard says what is wrong; its peer says which rank failed.
    assert r1["shard_size"][0] == "InputError" and "rank 1: query has 63 positions" in r1["shard_size"][1]
    assert r0["shard_size"][0] == "DistributedError" and "rank(s) [1] failed" in r0["shard_size"][1]
    for r in (r0, r1):
        assert r["group_size"][0] == "InputError" and "over 3 ranks but the group has 2" in r["group_size"][1]
        assert r["other_length"][0] == "BlockMaskError" and "plan lays out 128 positions" in r["other_length"][1]
        assert r["still_usable"] < 1e-5  # the group still works after errors raised before the exchange
    assert r0["peer_missing"][0] == "DistributedError"
    assert "rank 0: agreement check before the exchange did not complete within 2 s" in r0["peer_missing"][1]
    assert r0["peer_missing_seconds"] < 30
