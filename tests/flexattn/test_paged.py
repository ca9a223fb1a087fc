"""Paged KV cache: paged attention equals contiguous attention through any sequence of
reserve/assign/erase, bad input leaves the cache untouched, and page changes never
change the traced IR."""

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import flexattn
from codegen.reference import block_mask_to_dense
from flexattn import FlexAttnError, create_block_mask, flex_attention
from flexattn.errors import PagedCacheError
from flexattn.paged import PagedKVCache
from flexattn.trace import trace_mask_mod, trace_score_mod

N_PAGES, PAGE_SIZE, SLOTS, MAX_LEN = 6, 8, 3, 40
H_Q, H_KV, D = 4, 2, 8


def _mods(query_pos: torch.Tensor, doc: torch.Tensor):
    """(mask_mod, score_mod) pairs over logical positions; row b's queries sit at query_pos[b] + q_idx."""
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= query_pos[b] + q_idx

    def sliding_window(b, h, q_idx, kv_idx):
        q = query_pos[b] + q_idx
        return (kv_idx <= q) & (q - kv_idx < 5)

    def document(b, h, q_idx, kv_idx):
        q = query_pos[b] + q_idx
        return (kv_idx <= q) & (doc[b, kv_idx] == doc[b, q])

    def alibi(score, b, h, q_idx, kv_idx):
        return score - 0.25 * (h + 1) * (query_pos[b] + q_idx - kv_idx)

    return {"causal": (causal, None), "sliding_window": (sliding_window, None),
            "document": (document, None), "alibi": (causal, alibi), "everything": (flexattn.noop_mask, alibi)}


def _snapshot(cache: PagedKVCache, *tensors):
    return (cache.page_table.clone(), cache.physical_to_logical.clone(), cache.free_pages,
            [cache.capacity(s) for s in range(cache.max_batch_size)], [t.clone() for t in tensors])


def _assert_unchanged(before, cache, *tensors):
    after = _snapshot(cache, *tensors)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert before[2:4] == after[2:4]
    assert all(torch.equal(a, b) for a, b in zip(before[4], after[4]))


class PagedVsContiguous(RuleBasedStateMachine):
    """A model of per-slot contiguous K/V next to the paged cache."""

    def __init__(self):
        super().__init__()
        self.cache = PagedKVCache(N_PAGES, PAGE_SIZE, SLOTS)
        self.k_cache = torch.zeros(1, H_KV, self.cache.n_positions, D)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.k = torch.zeros(SLOTS, H_KV, MAX_LEN, D)
        self.v = torch.zeros_like(self.k)
        self.doc = torch.zeros(SLOTS, MAX_LEN, dtype=torch.int64)
        self.length = [0] * SLOTS

    @rule(slot=st.integers(0, SLOTS - 1), extra=st.integers(0, 20))
    def reserve(self, slot, extra):
        target = self.length[slot] + extra
        missing = -(-target // PAGE_SIZE) - self.cache.capacity(slot) // PAGE_SIZE
        if missing > self.cache.free_pages:
            before = _snapshot(self.cache)
            with pytest.raises(PagedCacheError, match="pool is full"):
                self.cache.reserve(slot, target)
            _assert_unchanged(before, self.cache)
        else:
            self.cache.reserve(slot, target)
            assert self.cache.capacity(slot) >= target

    @rule(slot=st.integers(0, SLOTS - 1), n=st.integers(1, 6), data=st.data())
    def grow(self, slot, n, data):
        """Reserve room for n new tokens and write them at the slot's next positions, in a random order."""
        start = self.length[slot]
        if start + n > MAX_LEN:
            return
        self.reserve(slot, n)
        if self.cache.capacity(slot) < start + n:  # the pool was full
            return
        positions = torch.tensor(data.draw(st.permutations(range(start, start + n))))
        k, v = torch.randn(1, H_KV, n, D), torch.randn(1, H_KV, n, D)
        self.cache.assign(torch.tensor([slot]), positions[None], k, v, self.k_cache, self.v_cache)
        self.k[slot, :, positions], self.v[slot, :, positions] = k[0], v[0]
        self.doc[slot, start:start + n] = data.draw(st.integers(0, 2))
        self.length[slot] = start + n

    @rule(slot=st.integers(0, SLOTS - 1), past=st.integers(0, 3))
    def assign_past_reservation(self, slot, past):
        position = self.cache.capacity(slot) + past
        if position >= self.cache.n_positions:
            return
        before = _snapshot(self.cache, self.k_cache, self.v_cache)
        with pytest.raises(PagedCacheError, match="outside slot"):
            self.cache.assign(torch.tensor([slot]), torch.tensor([[position]]), torch.randn(1, H_KV, 1, D),
                              torch.randn(1, H_KV, 1, D), self.k_cache, self.v_cache)
        _assert_unchanged(before, self.cache, self.k_cache, self.v_cache)

    @rule(slot=st.integers(0, SLOTS - 1))
    def erase(self, slot):
        self.cache.erase(slot)
        self.length[slot] = 0

    @precondition(lambda self: any(self.length))
    @rule(data=st.data(), mod=st.sampled_from(["causal", "sliding_window", "document", "alibi", "everything"]),
          q_len=st.integers(1, 2), block=st.sampled_from([(1, 4), (2, 8), (1, 8)]))
    def attention_matches_contiguous(self, data, mod, q_len, block):
        slots = data.draw(st.permutations(range(SLOTS)))[:data.draw(st.integers(1, SLOTS))]
        if mod == "everything":  # no causal bound: attend to exactly the first kv_len positions
            slots = [s for s in slots if self.length[s]] or [self.length.index(max(self.length))]
            kv_len = min(self.length[s] for s in slots)
        else:  # KV_LEN past the data, often not a multiple of the block: the mods bound it
            kv_len = data.draw(st.integers(max(self.length), MAX_LEN))
        rows = torch.tensor(slots)
        query_pos = torch.tensor([self.length[s] for s in slots]) - q_len
        mask_mod, score_mod = _mods(query_pos, self.doc[rows])[mod]
        B = rows.numel()
        q = torch.randn(B, H_Q, q_len, D)
        logical = create_block_mask(mask_mod, B, None, q_len, kv_len, BLOCK_SIZE=block)
        expected = flex_attention(q, self.k[rows, :, :kv_len], self.v[rows, :, :kv_len], score_mod=score_mod,
                                  block_mask=logical, enable_gqa=True)
        paged_score = self.cache.get_score_mod(score_mod, batch_idx=rows) if score_mod else None
        k_cache, v_cache = self.cache.expand_kv(self.k_cache, self.v_cache, B)
        paged = self.cache.convert_logical_block_mask(logical, rows)
        out = flex_attention(q, k_cache, v_cache, score_mod=paged_score, block_mask=paged, enable_gqa=True)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        self._check_element_masks(logical, paged, rows, kv_len)
        # The paged mask_mod alone (its block mask built over physical positions) means the same.
        direct = create_block_mask(self.cache.get_mask_mod(mask_mod, kv_len, batch_idx=rows), B, None, q_len,
                                   self.cache.n_positions, BLOCK_SIZE=block)
        out = flex_attention(q, k_cache, v_cache, score_mod=paged_score, block_mask=direct, enable_gqa=True)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    def _check_element_masks(self, logical, paged, rows, kv_len):
        """The physical element mask is the logical one moved to each position's page."""
        B = rows.numel()
        want = block_mask_to_dense(logical, trace_mask_mod(logical.mask_mod).graph,
                                   trace_mask_mod(logical.mask_mod).buffers, B, 1)
        got = block_mask_to_dense(paged, trace_mask_mod(paged.mask_mod).graph,
                                  trace_mask_mod(paged.mask_mod).buffers, B, 1)
        for row, slot in enumerate(rows.tolist()):
            owned = min(self.cache.capacity(slot), kv_len)
            pos = torch.arange(owned)
            address = self.cache.page_table[slot, pos // PAGE_SIZE].long() * PAGE_SIZE + pos % PAGE_SIZE
            assert torch.equal(got[row][..., address], want[row][..., :owned])
            assert got[row].sum() == want[row].sum()

    @invariant()
    def pages_are_accounted_for(self):
        owned = sum(self.cache.capacity(s) for s in range(SLOTS)) // PAGE_SIZE
        assert owned + self.cache.free_pages == N_PAGES
        table, inverse = self.cache.page_table, self.cache.physical_to_logical
        for slot in range(SLOTS):
            pages = table[slot][table[slot] >= 0].long()
            assert torch.equal(inverse[slot, pages].long(), torch.arange(pages.numel()))
            assert int((inverse[slot] >= 0).sum()) == pages.numel()
        assert int((inverse >= 0).sum(0).max()) <= 1  # a physical page has at most one owner


PagedVsContiguous.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestPagedVsContiguous = PagedVsContiguous.TestCase


# ----- bad input: clear errors, cache unchanged ----------------------------------

def _filled_cache():
    cache = PagedKVCache(4, 8, 2)
    k_cache, v_cache = torch.zeros(1, H_KV, 32, D), torch.zeros(1, H_KV, 32, D)
    cache.reserve(0, 10)
    return cache, k_cache, v_cache


def test_error_class():
    assert issubclass(PagedCacheError, FlexAttnError) and issubclass(PagedCacheError, ValueError)


@pytest.mark.parametrize("sizes", [(0, 8, 2), (4, -1, 2), (4, 8, 0), (4, 8.0, 2)])
def test_sizes_must_be_positive_ints(sizes):
    with pytest.raises(PagedCacheError, match="must be a positive int"):
        PagedKVCache(*sizes)


@pytest.mark.parametrize("call,message", [
    (lambda c, k, v: c.reserve(1, 24), "slot 1 needs 3 more page"),
    (lambda c, k, v: c.reserve(0, 33), r"seq_len must be in \[0, 32\]"),
    (lambda c, k, v: c.reserve(0, -1), "seq_len must be in"),
    (lambda c, k, v: c.reserve(2, 4), "batch_idx 2 is out of range"),
    (lambda c, k, v: c.erase(-1), "batch_idx -1 is out of range"),
    (lambda c, k, v: c.assign(torch.tensor([0]), torch.tensor([[16]]), torch.ones(1, H_KV, 1, D),
                              torch.ones(1, H_KV, 1, D), k, v), "position 16 of row 0 is outside slot 0"),
    (lambda c, k, v: c.assign(torch.tensor([0, 1]), torch.tensor([[3], [0]]), torch.ones(2, H_KV, 1, D),
                              torch.ones(2, H_KV, 1, D), k, v), "outside slot 1's reservation of 0"),
    (lambda c, k, v: c.assign(torch.tensor([5]), torch.tensor([[0]]), torch.ones(1, H_KV, 1, D),
                              torch.ones(1, H_KV, 1, D), k, v), "batch_idx 5 is out of range"),
    (lambda c, k, v: c.assign(torch.tensor([0]), torch.tensor([[0]]), torch.ones(1, H_KV, 2, D),
                              torch.ones(1, H_KV, 2, D), k, v), "k must have shape"),
    (lambda c, k, v: c.assign(torch.tensor([0]), torch.tensor([[0]]), torch.ones(1, H_KV, 1, D).double(),
                              torch.ones(1, H_KV, 1, D), k, v), "does not fit"),
    (lambda c, k, v: c.assign(torch.tensor([0]), torch.tensor([[0]]), torch.ones(1, H_KV, 1, D),
                              torch.ones(1, H_KV, 1, D), k[:, :, :16], v), "k_cache must have shape"),
    (lambda c, k, v: c.assign(torch.tensor([0]), torch.tensor([[0]]), torch.ones(1, H_KV, 1, D, requires_grad=True),
                              torch.ones(1, H_KV, 1, D), k, v), "must not require grad"),
    (lambda c, k, v: c.assign(torch.tensor([0]), torch.tensor([0.5]), torch.ones(1, H_KV, 1, D),
                              torch.ones(1, H_KV, 1, D), k, v), "input_pos must be"),
    (lambda c, k, v: c.get_mask_mod(None, batch_idx=torch.tensor([0, 3])), "batch_idx 3 is out of range"),
    (lambda c, k, v: c.get_mask_mod(None, kv_len=1.5), "kv_len must be"),
])
def test_bad_input_raises_and_leaves_the_cache_unchanged(call, message):
    cache, k_cache, v_cache = _filled_cache()
    before = _snapshot(cache, k_cache, v_cache)
    with pytest.raises(PagedCacheError, match=message):
        call(cache, k_cache, v_cache)
    _assert_unchanged(before, cache, k_cache, v_cache)


def test_page_size_must_be_a_multiple_of_the_kv_block():
    cache, _, _ = _filled_cache()
    logical = create_block_mask(lambda b, h, q, kv: q >= kv, 1, None, 4, 24, BLOCK_SIZE=(4, 6))
    with pytest.raises(PagedCacheError, match="page_size 8 is not a multiple of the block mask's kv block size 6"):
        cache.convert_logical_block_mask(logical)


def test_block_mask_longer_than_a_slot_or_of_another_batch_is_rejected():
    cache, _, _ = _filled_cache()
    too_long = create_block_mask(lambda b, h, q, kv: q >= kv, 1, None, 4, 40, BLOCK_SIZE=4)
    with pytest.raises(PagedCacheError, match="KV_LEN=40"):
        cache.convert_logical_block_mask(too_long)
    batch_of_two = create_block_mask(lambda b, h, q, kv: q >= kv, 2, None, 4, 16, BLOCK_SIZE=4)
    with pytest.raises(PagedCacheError, match="batch 2 but batch_idx names 1"):
        cache.convert_logical_block_mask(batch_of_two, torch.tensor([1]))


def test_erased_pages_serve_other_slots():
    cache = PagedKVCache(4, 8, 2)
    cache.reserve(0, 16)
    cache.reserve(1, 8)
    cache.erase(0)
    assert cache.free_pages == 3 and cache.capacity(0) == 0
    cache.reserve(1, 32)  # all four pages: slot 0's two among them
    assert sorted(cache.page_table[1, :4].tolist()) == [0, 1, 2, 3] and cache.free_pages == 0
    assert cache.physical_to_logical[0].eq(-1).all()


# ----- page changes never change the traced IR ---------------------------------------

def test_paging_changes_buffers_not_structure():
    cache = PagedKVCache(8, 8, 2)
    offset = torch.tensor([3, 5])

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= offset[b] + q_idx

    def alibi(score, b, h, q_idx, kv_idx):
        return score - (h + 1) * (offset[b] + q_idx - kv_idx)

    logical = create_block_mask(causal, 2, None, 1, 24, BLOCK_SIZE=(1, 8))
    paged_alibi = cache.get_score_mod(alibi)

    def traced():
        mask = trace_mask_mod(cache.convert_logical_block_mask(logical).mask_mod)
        return mask, trace_score_mod(paged_alibi)

    keys = set()
    for step in range(4):  # grow, reshuffle, shrink: each changes the page tables' contents
        if step == 1:
            cache.reserve(0, 20)
            cache.reserve(1, 9)
        if step == 2:
            cache.erase(0)
            cache.reserve(1, 24)
            cache.reserve(0, 16)
        if step == 3:
            cache.erase(1)
        mask, score = traced()
        keys.add((mask.graph.structural_key(), score.graph.structural_key()))
        # The page table the IR reads is the cache's own tensor, updated in place.
        assert any(b is cache.physical_to_logical for b in mask.buffers)
        assert any(b is cache.physical_to_logical for b in score.buffers)
    assert len(keys) == 1
    # Another batch of slots: only buffer lengths change.
    other_batch = create_block_mask(causal, 1, None, 1, 24, BLOCK_SIZE=(1, 8))
    mask = trace_mask_mod(cache.convert_logical_block_mask(other_batch, torch.tensor([1])).mask_mod)
    first_mask = traced()[0]
    assert mask.graph.structural_key() != first_mask.graph.structural_key()
    assert (mask.graph.structural_key(constants=False, shapes=False)
            == first_mask.graph.structural_key(constants=False, shapes=False))


def test_decoding_through_changing_pages_compiles_one_kernel():
    """Growing, erasing and reusing pages reuses the generated kernel (buffers are run-time data)."""
    from codegen.cache import KERNELS

    cache = PagedKVCache(6, 8, 2)
    k_cache, v_cache = torch.randn(1, H_KV, 48, D), torch.randn(1, H_KV, 48, D)
    last = torch.zeros(2, dtype=torch.int64)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= last[b] + q_idx

    paged_alibi = cache.get_score_mod(_mods(last, None)["alibi"][1])
    q = torch.randn(2, H_Q, 1, D)
    first_builds = None
    for step, (slot, length) in enumerate([(0, 5), (1, 9), (0, 17), (1, 20), (0, 0), (0, 12), (1, 24)]):
        if length == 0:
            cache.erase(slot)
            continue
        cache.reserve(slot, length)
        last[slot] = length - 1
        logical = create_block_mask(causal, 2, None, 1, 24, BLOCK_SIZE=(1, 8))
        flex_attention(q, *cache.expand_kv(k_cache, v_cache, 2), score_mod=paged_alibi,
                       block_mask=cache.convert_logical_block_mask(logical), enable_gqa=True, backend="torch")
        builds = KERNELS.stats["builds"] + KERNELS.stats["disk_hits"]
        first_builds = builds if first_builds is None else first_builds
        assert builds == first_builds, f"step {step} compiled a new kernel"


def test_paged_mask_drops_tiles_on_unreserved_pages():
    cache = PagedKVCache(4, 8, 1)
    cache.reserve(0, 8)  # only the first logical page exists
    logical = create_block_mask(lambda b, h, q, kv: kv >= 0, 1, None, 1, 32, BLOCK_SIZE=(1, 8))
    paged = cache.convert_logical_block_mask(logical)
    assert paged.seq_lengths == (1, 32)
    listed = paged.to_dense()
    assert int(listed.sum()) == 1 and bool(listed[0, 0, 0, int(cache.page_table[0, 0])])


def test_top_level_alias_is_torch_name():
    from flexattn.paged import PagedAttention

    assert PagedAttention is PagedKVCache and flexattn.FlexAttnError is FlexAttnError
