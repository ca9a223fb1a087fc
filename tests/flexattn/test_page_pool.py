"""Page placement: the pool hands out each free page once, grows sequences in place, and starts
new runs where there is the most room."""

from hypothesis import given, strategies as st

from flexattn.page_pool import PagePool
from flexattn.paged import PagedKVCache


def _runs(pages: list[int]) -> int:
    return 1 + sum(1 for a, b in zip(pages, pages[1:]) if b != a + 1)


@given(st.integers(1, 40), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 6), st.booleans()), max_size=30))
def test_every_free_page_is_handed_out_once(n_pages, steps):
    """Random growth and release of four sequences: pages handed out are free, distinct, and all of
    them can be handed out (a full pool refuses nothing it has)."""
    pool, owned = PagePool(n_pages), {s: [] for s in range(4)}
    for seq, count, release in steps:
        if release:
            pool.give_back(owned[seq])
            owned[seq] = []
            continue
        count = min(count, pool.free_count)
        tails = {pages[-1] for other, pages in owned.items() if pages and other != seq}
        new = pool.take(count, owned[seq][-1] if owned[seq] else None, tails)
        in_use = [p for pages in owned.values() for p in pages]
        assert len(new) == count and len(set(new)) == count and not set(new) & set(in_use)
        assert all(0 <= p < n_pages for p in new)
        owned[seq] += new
        assert pool.free_count == n_pages - len(in_use) - count
    rest = pool.take(pool.free_count, None, set())
    assert sorted(rest + [p for pages in owned.values() for p in pages]) == list(range(n_pages))


def test_a_sequence_grows_in_place_while_the_next_page_is_free():
    pool = PagePool(10)
    assert pool.take(3, None, set()) == [0, 1, 2]
    assert pool.take(2, 2, set()) == [3, 4]


def test_a_new_run_starts_in_the_largest_free_run_leaving_a_growing_neighbour_room():
    pool = PagePool(20)
    first = pool.take(2, None, set())                # pages 0, 1
    assert pool.take(2, None, {first[-1]}) == [10, 11]  # the middle of 2..19: 8 spare pages each side
    pool.give_back(first)
    assert pool.take(1, None, {11}) == [0]           # 0..9 beats 12..19, and no sequence grows into it


def test_sequences_growing_side_by_side_own_long_runs():
    """Eight sequences grow page by page in turn, as a serving batch does, in a pool that just fits
    them: torch's free-page stack gives each every eighth page (one run per page); here most own one
    run, the longest a handful."""
    lengths = [128 - 8 * b for b in range(8)]
    cache = PagedKVCache(sum(lengths), 1, 8)
    for step in range(1, max(lengths) + 1):
        for slot, n in enumerate(lengths):
            cache.reserve(slot, min(n, step))
    runs = [_runs(cache.page_table[slot, :n].tolist()) for slot, n in enumerate(lengths)]
    assert max(runs) <= 12 and sum(runs) <= 30
