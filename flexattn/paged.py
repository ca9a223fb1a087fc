"""Paged attention: a pool of fixed-size KV pages shared by a batch of sequences.

A serving batch holds sequences of different, growing lengths. Instead of one
contiguous (max_len) K/V buffer per sequence, ``PagedKVCache`` keeps one
*physical* cache of ``n_pages * page_size`` positions, shape
(1, H_kv, n_pages * page_size, D), and hands pages to sequences (batch slots)
as they grow:

* ``page_table[slot, logical_page] -> physical_page`` (-1: not reserved)
* ``physical_to_logical[slot, physical_page] -> logical_page`` (-1: not this slot's)

Attention then runs on the physical cache. The user's mods and logical
BlockMask are reused unchanged: ``get_mask_mod`` / ``get_score_mod`` wrap a mod
so that its ``kv_idx`` is a *physical* position, translated back to the
logical one through ``physical_to_logical`` (a captured tensor, i.e. an IR
buffer) before the user's mod runs; positions on pages the slot does not own
are masked out. The wrapper traces into one IR graph whose page tables are
run-time buffers, mutated in place: growing a sequence or reshuffling pages
changes buffer contents only, never the traced structure, so nothing
recompiles. ``convert_logical_block_mask`` maps a logical BlockMask's tiles
onto physical pages the same way. Which free page a slot gets is up to
``flexattn.page_pool``: a slot grows in place while the next page is free, so
sequences that grow side by side still own long runs (CPU reads favour them).

Example (one decode step for the sequences in ``slots``)::

    >>> cache = PagedKVCache(n_pages=64, page_size=128, max_batch_size=8)
    >>> k_cache = torch.zeros(1, H_kv, cache.n_positions, D)   # and v_cache alike
    >>> cache.reserve(slot, new_len)                            # per sequence
    >>> cache.assign(slots, input_pos, k_new, v_new, k_cache, v_cache)
    >>> paged_mask = cache.convert_logical_block_mask(logical_mask, slots)
    >>> out = flex_attention(q, *cache.expand_kv(k_cache, v_cache, len(slots)),
    ...                      score_mod=cache.get_score_mod(score_mod, slots), block_mask=paged_mask)
"""

from __future__ import annotations

import torch

from flexattn.block_mask import BlockMask
from flexattn.errors import PagedCacheError
from flexattn.masks import noop_mask
from flexattn.page_pool import PagePool

_UNASSIGNED = -1  # page-table entry of a page no sequence owns


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


class PagedKVCache:
    """Bookkeeping for a paged KV cache: which physical pages each batch slot owns.

    Args:
        n_pages: number of physical pages in the pool.
        page_size: positions per page; must be a multiple of the BlockMask's kv
            block size when converting block masks.
        max_batch_size: number of batch slots (sequences served at once).
        device: where the page tables live (the device of the K/V cache).

    The caches themselves belong to the caller: ``k_cache`` (1, H_kv,
    ``n_positions``, D) and ``v_cache`` (1, H_kv, ``n_positions``, Dv). A slot
    may hold up to ``n_positions`` logical positions.

    Raises ``PagedCacheError`` for non-positive sizes.

    Example::

        >>> cache = PagedKVCache(n_pages=4, page_size=16, max_batch_size=2)
        >>> cache.reserve(0, 20)       # slot 0 now owns 2 pages
        >>> cache.capacity(0), cache.free_pages
        (32, 2)
    """

    def __init__(self, n_pages: int, page_size: int, max_batch_size: int, device="cpu"):
        for name, n in (("n_pages", n_pages), ("page_size", page_size), ("max_batch_size", max_batch_size)):
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise PagedCacheError(f"{name} must be a positive int, got {n!r}")
        self.n_pages = n_pages
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.device = torch.device(device)
        # Both tables are mutated in place only: traced mods hold them as buffers.
        self.page_table = torch.full((max_batch_size, n_pages), _UNASSIGNED, dtype=torch.int32, device=device)
        self.physical_to_logical = torch.full((max_batch_size, n_pages), _UNASSIGNED, dtype=torch.int32,
                                              device=device)
        self._pages_owned = [0] * max_batch_size
        self._last_page: list[int | None] = [None] * max_batch_size  # each slot's last physical page
        self._pool = PagePool(n_pages)  # free pages, and where a slot's next pages go

    @property
    def n_positions(self) -> int:
        """Length of the physical cache: ``n_pages * page_size``."""
        return self.n_pages * self.page_size

    @property
    def free_pages(self) -> int:
        """Number of pages no slot owns."""
        return self._pool.free_count

    def capacity(self, batch_idx) -> int:
        """Positions reserved for slot ``batch_idx`` (a multiple of ``page_size``)."""
        return self._pages_owned[self._slot(batch_idx)] * self.page_size

    # ----- page pool ---------------------------------------------------------

    def reserve(self, batch_idx, seq_len) -> None:
        """Make slot ``batch_idx`` own enough pages for ``seq_len`` positions.

        Never shrinks a reservation. ``batch_idx`` and ``seq_len`` are ints (or
        one-element integer tensors).

        Raises ``PagedCacheError`` (leaving the cache unchanged) for a slot out of
        range, a negative ``seq_len`` or one over ``n_positions``, or a pool
        without enough free pages.

        Example::

            >>> cache.reserve(1, 40)   # 3 pages of 16
        """
        slot = self._slot(batch_idx)
        seq_len = _as_int(seq_len, "seq_len")
        if not 0 <= seq_len <= self.n_positions:
            raise PagedCacheError(f"seq_len must be in [0, {self.n_positions}] (n_pages * page_size), "
                                  f"got {seq_len}")
        owned = self._pages_owned[slot]
        missing = -(-seq_len // self.page_size) - owned
        if missing <= 0:
            return
        if missing > self.free_pages:
            raise PagedCacheError(
                f"the page pool is full: slot {slot} needs {missing} more page(s) for {seq_len} positions "
                f"but only {self.free_pages} of {self.n_pages} are free; erase finished sequences first")
        tails = {page for page in self._last_page if page is not None}
        pages = self._pool.take(missing, self._last_page[slot], tails)
        self._last_page[slot] = pages[-1]
        physical = torch.tensor(pages, dtype=torch.int64, device=self.device)
        logical = torch.arange(owned, owned + missing, dtype=torch.int32, device=self.device)
        self.page_table[slot, owned:owned + missing] = physical.to(torch.int32)
        self.physical_to_logical[slot, physical] = logical
        self._pages_owned[slot] = owned + missing

    def erase(self, batch_idx) -> None:
        """Give every page of slot ``batch_idx`` back to the pool (the K/V data stays, unowned).

        Raises ``PagedCacheError`` for a slot out of range. Erasing an empty slot does nothing.
        """
        slot = self._slot(batch_idx)
        owned = self._pages_owned[slot]
        pages = self.page_table[slot, :owned].tolist()
        self.physical_to_logical[slot, self.page_table[slot, :owned].long()] = _UNASSIGNED
        self.page_table[slot] = _UNASSIGNED
        self._pages_owned[slot] = 0
        self._last_page[slot] = None
        self._pool.give_back(pages)

    def assign(self, batch_idx, input_pos, k, v, k_cache, v_cache) -> None:
        """Write new keys/values of logical positions ``input_pos`` into the physical caches.

        Shapes: ``batch_idx`` (B,) slots; ``input_pos`` (B, S) logical positions;
        ``k`` (B, H_kv, S, D), ``v`` (B, H_kv, S, Dv); ``k_cache`` (1, H_kv,
        n_positions, D), ``v_cache`` (1, H_kv, n_positions, Dv), written in place.

        Raises ``PagedCacheError`` (writing nothing) for mismatched shapes, dtypes
        or devices, a slot out of range, or a position outside the slot's
        reservation (call ``reserve`` first).

        Example::

            >>> cache.assign(torch.tensor([0]), torch.tensor([[5]]), k1, v1, k_cache, v_cache)
        """
        slots = self._slots(batch_idx)
        B = slots.numel()
        input_pos = self._positions(input_pos, B)
        S = input_pos.shape[1]
        for name, new, cache in (("k", k, k_cache), ("v", v, v_cache)):
            self._check_cache(name, cache)
            if not isinstance(new, torch.Tensor) or new.dim() != 4 or tuple(new.shape[:3]) != (B, cache.shape[1], S):
                raise PagedCacheError(f"{name} must have shape (B={B}, H_kv={cache.shape[1]}, S={S}, D), "
                                      f"got {list(getattr(new, 'shape', []))}")
            if new.shape[3] != cache.shape[3] or new.dtype != cache.dtype or new.device != cache.device:
                raise PagedCacheError(f"{name} {list(new.shape)} {new.dtype} on {new.device} does not fit "
                                      f"{name}_cache {list(cache.shape)} {cache.dtype} on {cache.device}")
            if new.requires_grad:
                raise PagedCacheError(f"{name} must not require grad: the cache is inference-only storage")
        capacity = torch.tensor(self._pages_owned, device=self.device)[slots] * self.page_size
        outside = (input_pos < 0) | (input_pos >= capacity.unsqueeze(1))
        if bool(outside.any()):
            row, col = (int(i) for i in outside.nonzero()[0])
            raise PagedCacheError(
                f"position {int(input_pos[row, col])} of row {row} is outside slot {int(slots[row])}'s "
                f"reservation of {int(capacity[row])} positions; call reserve(slot, seq_len) first")
        physical_page = self.page_table[slots].long().gather(1, input_pos // self.page_size)
        address = (physical_page * self.page_size + input_pos % self.page_size).reshape(-1)  # (B*S,)
        for new, cache in ((k, k_cache), (v, v_cache)):
            # (B, H, S, D) -> (H, B*S, D), matching address's row-major (b, s) order.
            cache[0, :, address] = new.transpose(0, 1).reshape(new.shape[1], B * S, new.shape[3])

    # ----- mods and block masks through the page table -----------------------

    def get_mask_mod(self, mask_mod=None, kv_len=None, *, batch_idx=None):
        """A mask_mod over *physical* kv positions that calls ``mask_mod`` on logical ones.

        The signature is torch's (``PagedAttention.get_mask_mod(mask_mod, kv_len)``), plus
        ``batch_idx`` by keyword.

        Row ``b`` of the query batch is slot ``batch_idx[b]`` (default: slot
        ``b``). A physical position is kept when its page belongs to that slot,
        its logical position is below ``kv_len[b]`` (default: ``n_positions``;
        an int or a (B,) tensor) and ``mask_mod(b, h, q_idx, logical_kv_idx)``
        keeps it. The page tables are read at run time, so the returned mod
        stays valid (and traces to the same IR) as pages are reserved and erased.

        Raises ``PagedCacheError`` for a slot out of range or a bad ``kv_len``.

        Example::

            >>> paged_causal = cache.get_mask_mod(lambda b, h, q, kv: q >= kv)
        """
        mask_mod = noop_mask if mask_mod is None else mask_mod
        slots = self._slots(batch_idx) if batch_idx is not None else torch.arange(
            self.max_batch_size, device=self.device)
        kv_len = self._kv_len(kv_len, slots.numel())
        to_logical = self._translator(slots)

        def paged_mask_mod(b, h, q_idx, physical_kv_idx):
            logical_kv_idx, owned = to_logical(b, physical_kv_idx)
            return owned & (logical_kv_idx < kv_len[b]) & mask_mod(b, h, q_idx, logical_kv_idx)

        paged_mask_mod.__name__ = f"paged_{getattr(mask_mod, '__name__', 'mask_mod')}"
        return paged_mask_mod

    def get_score_mod(self, score_mod=None, kv_len=None, *, batch_idx=None):
        """A score_mod over *physical* kv positions that calls ``score_mod`` on logical ones.

        Positions on pages the row's slot does not own, or at logical positions from
        ``kv_len[b]`` on, score ``-inf``. See ``get_mask_mod`` for ``batch_idx`` and ``kv_len``
        (the signature is torch's, plus ``batch_idx`` by keyword). Raises ``PagedCacheError``
        for a slot out of range or a bad ``kv_len``.

        Example::

            >>> paged_alibi = cache.get_score_mod(alibi, batch_idx=slots)
        """
        score_mod = _identity_score if score_mod is None else score_mod
        slots = self._slots(batch_idx) if batch_idx is not None else torch.arange(
            self.max_batch_size, device=self.device)
        lengths = None if kv_len is None else self._kv_len(kv_len, slots.numel())
        to_logical = self._translator(slots)

        def paged_score_mod(score, b, h, q_idx, physical_kv_idx):
            logical_kv_idx, owned = to_logical(b, physical_kv_idx)
            kept = owned if lengths is None else owned & (logical_kv_idx < lengths[b])
            return torch.where(kept, score_mod(score, b, h, q_idx, logical_kv_idx), float("-inf"))

        paged_score_mod.__name__ = f"paged_{getattr(score_mod, '__name__', 'score_mod')}"
        return paged_score_mod

    def convert_logical_block_mask(self, block_mask: BlockMask, batch_idx=None, kv_len=None) -> BlockMask:
        """Map a BlockMask over logical positions onto the physical cache.

        ``block_mask`` has kv_indices (B or 1, H, Q_BLOCKS, KV_BLOCKS) over a
        logical KV_LEN <= ``n_positions``; its row ``b`` is slot ``batch_idx[b]``
        (default ``arange(B)``; a mask built with B=None is broadcast to every
        slot of ``batch_idx``). Returns a BlockMask over (Q_LEN, ``n_positions``)
        with each listed tile moved to the physical block holding it (tiles on
        unreserved pages are dropped: nothing there belongs to the sequence),
        listed in logical order, and the mask_mod ``get_mask_mod(mask_mod,
        kv_len, batch_idx=batch_idx)`` (``kv_len`` defaults to the mask's KV_LEN).

        Raises ``PagedCacheError`` if ``page_size`` is not a multiple of the kv
        block size, KV_LEN exceeds ``n_positions``, a slot is out of range, or
        the mask's batch does not match ``batch_idx``.

        Example::

            >>> logical = create_block_mask(causal, B, None, 1, 4096, BLOCK_SIZE=(1, 128))
            >>> physical = cache.convert_logical_block_mask(logical, slots)
        """
        q_len, kv_len_of_mask = block_mask.seq_lengths
        kv_block = block_mask.BLOCK_SIZE[1]
        if self.page_size % kv_block != 0:
            raise PagedCacheError(f"page_size {self.page_size} is not a multiple of the block mask's kv block "
                                  f"size {kv_block}; build the mask with BLOCK_SIZE=(q, {kv_block}) dividing it")
        if kv_len_of_mask > self.n_positions:
            raise PagedCacheError(f"the block mask covers KV_LEN={kv_len_of_mask} logical positions but a slot "
                                  f"holds at most {self.n_positions} (n_pages * page_size)")
        mask_batch = block_mask.kv_indices.shape[0]
        slots = self._slots(batch_idx) if batch_idx is not None else torch.arange(mask_batch, device=self.device)
        if mask_batch not in (1, slots.numel()):
            raise PagedCacheError(f"the block mask has batch {mask_batch} but batch_idx names {slots.numel()} slots")
        page_table = self.page_table[slots].long()
        physical = {}
        for name in ("kv", "full_kv"):
            num, indices = getattr(block_mask, f"{name}_num_blocks"), getattr(block_mask, f"{name}_indices")
            physical[name] = (None, None) if num is None else self._physical_blocks(num, indices, page_table,
                                                                                     kv_block)
        return BlockMask.from_kv_blocks(
            *physical["kv"], *physical["full_kv"], BLOCK_SIZE=block_mask.BLOCK_SIZE,
            mask_mod=self.get_mask_mod(block_mask.mask_mod, kv_len_of_mask if kv_len is None else kv_len,
                                       batch_idx=slots),
            seq_lengths=(q_len, self.n_positions), compute_q_blocks=block_mask.q_indices is not None)

    def expand_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, batch_size: int):
        """Views of the (1, H_kv, n_positions, D) caches as (batch_size, ...) for flex_attention (no copy)."""
        return k_cache.expand(batch_size, -1, -1, -1), v_cache.expand(batch_size, -1, -1, -1)

    # ----- helpers -------------------------------------------------------------

    def _translator(self, slots: torch.Tensor):
        """``(b, physical_kv_idx) -> (logical_kv_idx, owned)`` for traced mods, reading the live tables."""
        physical_to_logical, page_size = self.physical_to_logical, self.page_size

        def to_logical(b, physical_kv_idx):
            logical_page = physical_to_logical[slots[b], physical_kv_idx // page_size]
            return logical_page * page_size + physical_kv_idx % page_size, logical_page >= 0

        return to_logical

    def _physical_blocks(self, num: torch.Tensor, indices: torch.Tensor, page_table: torch.Tensor, kv_block: int):
        """Logical (num (b, H, R), indices (b, H, R, C)) -> physical ones of width n_positions / kv_block."""
        B = page_table.shape[0]
        num, indices = num.expand(B, *num.shape[1:]), indices.expand(B, *indices.shape[1:]).long()
        blocks_per_page = self.page_size // kv_block
        logical_page = indices.clamp(0, self.n_positions // kv_block - 1) // blocks_per_page
        page = page_table.gather(1, logical_page.reshape(B, -1)).view(indices.shape)
        block = page * blocks_per_page + indices % blocks_per_page
        columns = torch.arange(indices.shape[-1], device=indices.device)
        keep = (columns < num.unsqueeze(-1)) & (page >= 0)
        # Kept tiles first, in their logical order (a stable sort of the 0/1 "dropped" flags).
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
        new_num = keep.sum(-1).to(torch.int32)
        block = torch.where(columns < new_num.unsqueeze(-1).long(), block.gather(-1, order), 0)
        out = torch.zeros(*indices.shape[:-1], self.n_positions // kv_block, dtype=torch.int32, device=indices.device)
        out[..., :indices.shape[-1]] = block
        return new_num.contiguous(), out

    def _slot(self, batch_idx) -> int:
        slot = _as_int(batch_idx, "batch_idx")
        if not 0 <= slot < self.max_batch_size:
            raise PagedCacheError(f"batch_idx {slot} is out of range for max_batch_size={self.max_batch_size}")
        return slot

    def _slots(self, batch_idx) -> torch.Tensor:
        slots = torch.as_tensor(batch_idx, device=self.device)
        if slots.dim() > 1 or slots.is_floating_point() or slots.dtype == torch.bool:
            raise PagedCacheError(f"batch_idx must be an int or a 1-D integer tensor of slots, got "
                                  f"{slots.dtype} of shape {list(slots.shape)}")
        slots = slots.reshape(-1).long()
        bad = (slots < 0) | (slots >= self.max_batch_size)
        if bool(bad.any()):
            raise PagedCacheError(f"batch_idx {int(slots[bad][0])} is out of range for "
                                  f"max_batch_size={self.max_batch_size}")
        return slots

    def _positions(self, input_pos, B: int) -> torch.Tensor:
        pos = torch.as_tensor(input_pos, device=self.device)
        if pos.dim() != 2 or pos.shape[0] != B or pos.is_floating_point() or pos.dtype == torch.bool:
            raise PagedCacheError(f"input_pos must be a (B={B}, S) integer tensor, got {pos.dtype} "
                                  f"of shape {list(pos.shape)}")
        return pos.long()

    def _check_cache(self, name: str, cache) -> None:
        if not isinstance(cache, torch.Tensor) or cache.dim() != 4 or cache.shape[0] != 1 \
                or cache.shape[2] != self.n_positions:
            raise PagedCacheError(f"{name}_cache must have shape (1, H_kv, {self.n_positions}, D), "
                                  f"got {list(getattr(cache, 'shape', []))}")

    def _kv_len(self, kv_len, B: int) -> torch.Tensor:
        if kv_len is None:
            kv_len = self.n_positions
        lengths = torch.as_tensor(kv_len, device=self.device)
        if lengths.is_floating_point() or lengths.dtype == torch.bool or lengths.dim() > 1 \
                or lengths.numel() not in (1, B):
            raise PagedCacheError(f"kv_len must be an int or a ({B},) integer tensor, got {kv_len!r}")
        return lengths.long().reshape(-1).expand(B).contiguous()

    def __repr__(self) -> str:
        return (f"PagedKVCache(n_pages={self.n_pages}, page_size={self.page_size}, "
                f"max_batch_size={self.max_batch_size}, free_pages={self.free_pages})")


PagedAttention = PagedKVCache  # torch's name (torch.nn.attention.experimental._paged_attention)


def _as_int(value, name: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise PagedCacheError(f"{name} must be an int or a one-element integer tensor, got {value!r}")
        return int(value.item())
    if not isinstance(value, int) or isinstance(value, bool):
        raise PagedCacheError(f"{name} must be an int, got {value!r}")
    return value


__all__ = ["PagedAttention", "PagedKVCache"]
