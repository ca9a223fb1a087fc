"""Split-KV decoding for rows that each visit a window of tiles: the whole batch at once.

When every row of the batch visits at most one chunk of KV tiles (a sliding
window, a short cache), per-row work is a handful of tiny tensor ops around two
matmuls, and their per-op cost adds up to a third of the call. Here masking,
the score_mod and the softmax run once over the stacked scores of all rows,
and K/V are read where they lie, never copied. On the CPU this also serves
rows of any length (``rows_fit``): the kernels beat chunks of matmuls on
views and their merges (causal decode about 30% faster on the decode benchmark).

* on the CPU, the cache is seen as a table of rows (``row_table``, a view)
  and the kernels of ``codegen.cpu_gather`` read each row's positions in it,
  consecutive or scattered over a paged pool's pages alike: the keys' scores
  (``gathered_scores``), then the values weighted by the softmax numerators
  (``gathered_values``). A copy of scattered pages would be read twice, once
  to copy and once to multiply (1.3-1.7x the contiguous time);
* caches whose rows are not evenly spaced, and other devices, fall back to
  views and copies of tiles (``read_tiles``) and a matmul per row;
* rows are padded to the longest row's tiles; padding is masked out (its
  values are never read).

Used by ``codegen.split_kv.decode_attention``; see there for shapes.
"""

from __future__ import annotations

import threading

import torch

from codegen.cpu_gather import gathered_scores, gathered_values, kernels_ready
from flexattn.block_mask import EMPTY, FULL, PARTIAL
from flexattn.semantics import evaluate

NEG_INF = float("-inf")
BATCH_SCORES_BUDGET = 1 << 24  # score elements of one batch of long rows (64 MB in fp32); more: chunks
# Runs of consecutive keys shorter than this on average (bytes of one head) get the kernels' prefetch
# hints. Decode benchmark, causal 16k, pages of 64 KB per head (two rotated A/B runs): pages scattered
# one by one 1-3% faster with hints; runs of two pages 1-5%, of four or eight 3-6% slower with them
# (the hardware prefetcher has the run, and the hints cost instructions).
SHORT_RUN_BYTES = 1 << 17

# Copied tiles and batched scores land in per-thread buffers kept between calls: a fresh
# allocation of tens of MB is returned to the OS when freed and page-faulted in again on every
# decode step, which cost 7x the copy itself (21 ms vs 2.9 ms for 42 MB on the 2-core dev machine).
_workspace = threading.local()


def rows_fit(classes: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles_per_chunk: int,
             kv_block: int) -> bool:
    """Whether ``batched_rows`` applies: the mask does not depend on the head, and every row visits
    at most ``tiles_per_chunk`` tiles or, where the CPU kernels read K/V in place, rows of any
    length whose padded scores fit ``BATCH_SCORES_BUDGET`` elements (classes (B or 1, H or 1,
    Q_BLOCKS, KV_BLOCKS); q (B, Hq, L, E); k/v as for ``batched_rows``)."""
    if classes.shape[1] != 1:
        return False
    width = int((classes[:, 0] != EMPTY).any(dim=1).sum(dim=1).max())
    if width <= tiles_per_chunk:
        return True
    B, Hq, L, _ = q.shape
    return _reads_in_place(k) and _reads_in_place(v) and B * Hq * L * width * kv_block <= BATCH_SCORES_BUDGET


def batched_rows(q, k, v, classes, scale, mods, out, lse, max_scores) -> None:
    """Attention of every row over its visited tiles; writes out, lse, max_scores in place.

    q (B, Hq, L, E); k/v (B, Hkv, S, D), or one pool shared by the batch (stride 0);
    ``mods`` a ``split_kv._Mods``; out (B, Hq, L, Ev), lse/max_scores (B, Hq, L).
    """
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    kv_block, group = mods.kv_block, Hq // Hkv
    visits = (classes[:, 0] != EMPTY).any(dim=1).expand(B, -1)  # (B, T)
    count = visits.sum(dim=1)
    width = int(count.max())
    if width == 0:  # every row fully masked: out stays 0, lse -inf
        return
    # Row b's j-th slot holds its j-th visited tile; spare slots tile 0 (masked below).
    row, tile = visits.nonzero(as_tuple=True)
    tiles = torch.zeros(B, width, dtype=torch.int64, device=q.device)
    tiles[row, visits.cumsum(dim=1)[row, tile] - 1] = tile
    used = torch.arange(width, device=q.device).view(1, -1) < count.view(-1, 1)  # (B, width)
    kv_idx = tiles.view(B, width, 1) * kv_block + torch.arange(kv_block, device=q.device)  # (B, width, kv_block)
    positions = kv_idx.view(B, -1).clamp(max=S - 1)  # past the cache only in a ragged last tile: masked below
    # Row b reads its first `reads[b]` positions: its visited tiles, without what lies past the cache.
    last_tile = tiles.gather(1, (count - 1).clamp(min=0).view(B, 1)).view(B)
    reads = torch.where(count > 0, count * kv_block - ((last_tile + 1) * kv_block - S).clamp(min=0), 0)
    # K/V read where they lie, by the CPU gathering kernels; rows that jump often (a pool's pages
    # scattered one by one) are prefetched by the kernels, long runs left to the hardware prefetcher.
    in_place = _reads_in_place(k) and _reads_in_place(v)
    runs = int(((tiles[:, 1:] != tiles[:, :-1] + 1) & used[:, 1:]).sum()) + int((count > 0).sum())
    scattered = int(reads.sum()) * k.shape[-1] * k.element_size() < SHORT_RUN_BYTES * runs
    shared = k.stride(0) == 0
    sources = None if in_place else \
        [tile_source(tiles[b, :int(count[b])], kv_block, S)[0] if count[b] else None for b in range(B)]

    q_rows = q.view(B, Hkv, group * L, E) * scale  # scaling the few queries, not the many scores
    # A fresh buffer of scores would be page-faulted in on every call (the 33 MB of a 32k causal
    # batch: 192 ms a call against 108 ms with the kept buffer, 2-core dev machine).
    s = _reused_buffer(2, B * Hkv * group * L * width * kv_block, q.dtype, q.device).view(B, Hkv, group * L, -1)
    if in_place:
        gathered_scores(*row_table(k), positions, q_rows, reads, scattered, out=s)
    else:
        s.fill_(NEG_INF)
        for b, source in enumerate(sources):
            if source is not None:
                keys = read_tiles(k[0] if shared else k[b], source, kv_block, slot=0)
                s[b, :, :, :keys.shape[1]] = keys_major_scores(keys, q_rows[b])
    s = s.view(B, Hkv, group, L, width * kv_block)
    env = {"b": torch.arange(B, device=q.device).view(B, 1, 1, 1, 1),
           "h": torch.arange(Hq, device=q.device).view(1, Hkv, group, 1, 1),
           "q_idx": mods.q_idx.view(1, 1, 1, L, 1), "kv_idx": kv_idx.view(B, 1, 1, 1, -1)}
    if mods.score_graph is not None:
        s = torch.broadcast_to(evaluate(mods.score_graph, {**env, "score": s}, mods.score_buffers), s.shape)
        s = s.to(q.dtype).contiguous()
    # Each element's class: its tile's class for its query row; spare slots are EMPTY.
    b_index = torch.arange(classes.shape[0], device=q.device).view(-1, 1, 1)
    per_slot = classes[b_index, 0, (mods.q_idx.view(1, L, 1) // mods.q_block), tiles.view(B, 1, width)]
    per_slot = torch.where(used.view(B, 1, width), per_slot, EMPTY)  # (B, L, width)
    per_element = per_slot.repeat_interleave(kv_block, dim=2).view(B, 1, 1, L, -1)
    keep = per_element == FULL
    if mods.mask_graph is not None and bool((per_slot == PARTIAL).any()):
        keep = keep | ((per_element == PARTIAL) & evaluate(mods.mask_graph, env, mods.mask_buffers).bool())
    keep = keep & (env["kv_idx"] < S)
    if not bool(keep.all()):  # windows of FULL tiles only: nothing to mask, no pass over the scores
        s.masked_fill_(~keep, NEG_INF)
    m = s.amax(dim=-1)  # (B, Hkv, G, L)
    shift = torch.where(m == NEG_INF, 0.0, m)
    p = s.sub_(shift.unsqueeze(-1)).exp_().view(B, Hkv, group * L, width * kv_block)
    total = p.sum(dim=-1).view(B, Hkv, group, L)
    if in_place:
        o = gathered_values(*row_table(v), positions, p, reads, scattered)
    else:
        o = q.new_zeros(B, Hkv, group * L, v.shape[-1])
        for b, source in enumerate(sources):
            if source is not None:
                values = read_tiles(v[0] if shared else v[b], source, kv_block, slot=1)
                o[b] = torch.bmm(p[b, :, :, :values.shape[1]], values)
    o = o.view(B, Hkv, group, L, -1) / torch.where(total == 0, 1.0, total).unsqueeze(-1)
    out.copy_(o.view(B, Hq, L, -1))
    lse.copy_((shift + torch.log(total)).view(B, Hq, L))
    max_scores.copy_(m.view(B, Hq, L))


def keys_major_scores(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Scores (batch, M, N) of queries (batch, M, E), already scaled, against keys (batch, N, E),
    stored keys-major.

    With M a handful of rows (G * L), the tall (N x E) @ (E x M) matmul runs about
    twice as fast on CPU as (M x E) @ (E x N); the result is its transposed view,
    which elementwise ops and the later matmul with V take as it is. Callers
    scale the few queries, not the many scores.
    """
    return torch.bmm(keys, queries.transpose(1, 2)).transpose(1, 2)


def _reads_in_place(x: torch.Tensor) -> bool:
    """Whether the CPU kernels read x (B, Hkv, S, D): a CPU tensor of float32/float64 whose rows are
    contiguous and evenly spaced, so that ``row_table`` is a view (else a gather would copy), once
    the kernels are loaded (``cpu_gather.kernels_ready``; until then the torch path serves)."""
    return _table_layout(x) and x.device.type == "cpu" and kernels_ready()


def _table_layout(x: torch.Tensor) -> bool:
    row = x.stride(2)
    return (x.dtype in (torch.float32, torch.float64) and x.stride(3) == 1 and row == x.shape[3]
            and x.stride(0) % row == 0 and x.stride(1) % row == 0)


def row_table(x: torch.Tensor):
    """x (B, Hkv, S, D) (a shared pool: batch stride 0) as one table of rows: ``(table (R, D), base (B, Hkv))``,
    position n of (b, h) being row ``base[b, h] + n``; a view of x's memory. None where x's rows are not
    contiguous, evenly spaced rows of float32/float64 (then a gather would copy)."""
    B, Hkv, S, D = x.shape
    row = x.stride(2)
    if not _table_layout(x):
        return None
    base = (torch.arange(B, device=x.device).view(B, 1) * (x.stride(0) // row)
            + torch.arange(Hkv, device=x.device).view(1, Hkv) * (x.stride(1) // row))
    table = torch.as_strided(x, (int(base.max()) + S, D), (row, 1), x.storage_offset())
    return table, base


def tile_source(tiles: torch.Tensor, kv_block: int, S: int):
    """Where the keys of ``tiles`` (ascending, not empty) are, and their positions (N,): a slice of
    the cache when the tiles are consecutive, else the tiles and positions to copy."""
    first, last = int(tiles[0]), int(tiles[-1])
    if last - first + 1 == tiles.numel():
        rows = slice(first * kv_block, min((last + 1) * kv_block, S))
        return rows, torch.arange(rows.start, rows.stop, device=tiles.device)
    kv_idx = (tiles.view(-1, 1) * kv_block + torch.arange(kv_block, device=tiles.device)).flatten()
    kv_idx = kv_idx[kv_idx < S]
    return (tiles, kv_idx), kv_idx


def read_tiles(x: torch.Tensor, source, kv_block: int, slot: int) -> torch.Tensor:
    """Keys or values (H, N, D) from x (H, S, D) at a ``tile_source``: a view, or a copy into buffer ``slot``."""
    if isinstance(source, slice):
        return x[:, source]
    return gather(x, *source, kv_block, slot)


def gather(x: torch.Tensor, tiles: torch.Tensor, kv_idx: torch.Tensor, kv_block: int, slot: int) -> torch.Tensor:
    """Rows ``kv_idx`` (the positions of ``tiles``) of x (H, S, D), copying whole tiles when the layout allows
    (into this thread's reused buffer ``slot``, valid until the next gather into it)."""
    H, S, D = x.shape
    if S % kv_block == 0 and x.stride(2) == 1 and x.stride(1) == D:
        # Each tile is one contiguous run of kv_block * D values: copy runs, not rows (much faster).
        out = _reused_buffer(slot, H * len(tiles) * kv_block * D, x.dtype, x.device).view(H, len(tiles), kv_block * D)
        return torch.index_select(x.view(H, S // kv_block, kv_block * D), 1, tiles, out=out).view(H, -1, D)
    return x.index_select(1, kv_idx)


def _reused_buffer(slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``numel`` elements of ``dtype`` on ``device``, reused by this thread's later calls.

    Grows to the largest size asked for and is kept for the thread's lifetime
    (at most the K or V tiles one row of one decode step reads, or a batch's
    scores: ``BATCH_SCORES_BUDGET`` elements).
    """
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (slot, dtype, device)
    if key not in buffers or buffers[key].numel() < numel:
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key][:numel]
