"""Split-KV decoding for rows that each visit a window of tiles: the whole batch at once.

When every row of the batch visits at most one chunk of KV tiles (a sliding
window, a short cache), per-row work is a handful of tiny tensor ops around two
matmuls, and their per-op cost adds up to a third of the call. Here masking,
the score_mod and the softmax run once over the stacked scores of all rows,
and K/V are read where they lie, never copied:

* values: one ``embedding_bag`` over the cache seen as a table of rows
  (``row_table``), a bag per (row, head, query) weighted by the softmax
  numerators (``bagged_values``); with G * L a handful of query rows it is
  faster than a matmul even on a view of consecutive tiles;
* keys of a row whose tiles are consecutive: the tall (N x E) @ (E x G*L)
  matmul on a view of the cache, which with G * L a handful of query rows runs
  about twice as fast on CPU as (G*L x E) @ (E x N);
* keys where some row's tiles are scattered (a paged pool): one sampled
  matmul whose sparsity pattern is the rows' positions (``sampled_scores``). A
  copy of the pages would be read twice, once to copy and once to multiply:
  1.3-1.7x the contiguous time, against 1.0-1.15x read in place;
* caches whose rows are not evenly spaced fall back to views and copies of
  tiles (``read_tiles``);
* rows are padded to the longest row's tiles; padding is masked out (its
  values are never read).

Used by ``codegen.split_kv.decode_attention``; see there for shapes.
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F

from flexattn.block_mask import EMPTY, FULL, PARTIAL
from flexattn.semantics import evaluate

NEG_INF = float("-inf")

# Copied tiles land in a per-thread buffer kept between calls: a fresh allocation of tens of
# MB is returned to the OS when freed and page-faulted in again on every decode step, which
# cost 7x the copy itself (21 ms vs 2.9 ms for 42 MB on the 2-core dev machine).
_workspace = threading.local()


def rows_fit(classes: torch.Tensor, tiles_per_chunk: int) -> bool:
    """Whether ``batched_rows`` applies: the mask does not depend on the head and every row
    visits at most ``tiles_per_chunk`` tiles (classes (B or 1, H or 1, Q_BLOCKS, KV_BLOCKS))."""
    if classes.shape[1] != 1:
        return False
    return int((classes[:, 0] != EMPTY).any(dim=1).sum(dim=1).max()) <= tiles_per_chunk


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
    # Row b's j-th slot holds its j-th visited tile (a stable sort puts visited tiles first).
    slots = (~visits).to(torch.int8).argsort(dim=1, stable=True)[:, :width]
    used = torch.arange(width, device=q.device).view(1, -1) < count.view(-1, 1)  # (B, width)
    tiles = torch.where(used, slots, 0)
    kv_idx = tiles.view(B, width, 1) * kv_block + torch.arange(kv_block, device=q.device)  # (B, width, kv_block)
    positions = kv_idx.view(B, -1).clamp(max=S - 1)  # past the cache only in a ragged last tile: masked below
    # Row b reads its first `reads[b]` positions: its visited tiles, without what lies past the cache.
    last_tile = tiles.gather(1, (count - 1).clamp(min=0).view(B, 1)).view(B)
    reads = torch.where(count > 0, count * kv_block - ((last_tile + 1) * kv_block - S).clamp(min=0), 0)
    # Keys are read in place by a sampled matmul only where some row's tiles are scattered (a paged
    # pool): on a view of consecutive tiles a matmul is faster. Values are always read in place.
    scattered = not bool(((last_tile - tiles[:, 0] + 1 == count) | (count == 0)).all())
    key_rows, value_rows = row_table(k) if scattered else None, row_table(v)
    if key_rows and width * kv_block > key_rows[0].shape[0]:  # see sampled_scores
        key_rows = None
    shared = k.stride(0) == 0
    sources = None if key_rows and value_rows else \
        [tile_source(tiles[b, :int(count[b])], kv_block, S)[0] if count[b] else None for b in range(B)]

    q_rows = q.view(B, Hkv, group * L, E) * scale  # scaling the few queries, not the many scores
    index = None
    if key_rows:
        index = table_index(key_rows[1], positions, group * L, slot=2)
        s = sampled_scores(key_rows[0], index, q_rows)
    else:
        s = q.new_full((B, Hkv, group * L, width * kv_block), NEG_INF)
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
    s.masked_fill_(~(keep & (env["kv_idx"] < S)), NEG_INF)
    m = s.amax(dim=-1)  # (B, Hkv, G, L)
    shift = torch.where(m == NEG_INF, 0.0, m)
    p = s.sub_(shift.unsqueeze(-1)).exp_().view(B, Hkv, group * L, width * kv_block)
    total = p.sum(dim=-1).view(B, Hkv, group, L)
    if value_rows:
        if index is None or not torch.equal(value_rows[1], key_rows[1]):
            index = table_index(value_rows[1], positions, group * L, slot=2)
        o = bagged_values(value_rows[0], index, p, reads)
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


def row_table(x: torch.Tensor):
    """x (B, Hkv, S, D) (a shared pool: batch stride 0) as one table of rows: ``(table (R, D), base (B, Hkv))``,
    position n of (b, h) being row ``base[b, h] + n``; a view of x's memory. None where x's rows are not
    contiguous, evenly spaced rows (then a gather would copy), or x's dtype is not one both table ops take."""
    B, Hkv, S, D = x.shape
    row = x.stride(2)
    if x.dtype not in (torch.float32, torch.float64) or x.stride(3) != 1 or row != D \
            or x.stride(0) % row or x.stride(1) % row:
        return None
    base = (torch.arange(B, device=x.device).view(B, 1) * (x.stride(0) // row)
            + torch.arange(Hkv, device=x.device).view(1, Hkv) * (x.stride(1) // row))
    table = torch.as_strided(x, (int(base.max()) + S, D), (row, 1), x.storage_offset())
    return table, base


def table_index(base: torch.Tensor, positions: torch.Tensor, M: int, slot: int) -> torch.Tensor:
    """Rows of a ``row_table`` to read, (B * Hkv * M * N,), (b, h, query, n)-major: position n of
    row b for each of head h's M queries; in this thread's reused buffer ``slot``."""
    (B, Hkv), N = base.shape, positions.shape[1]
    dtype = torch.int32 if int(base.max()) + int(positions.max()) < 2**31 else torch.int64
    index = _reused_buffer(slot, B * Hkv * M * N, dtype, positions.device).view(B, Hkv, M, N)
    torch.add(base.view(B, Hkv, 1), positions.view(B, 1, N), out=index[:, :, 0])
    index[:, :, 1:] = index[:, :, :1]
    return index


def sampled_scores(keys: torch.Tensor, index: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
    """Scores (B, Hkv, M, N) of each row's queries q_rows (B, Hkv, M, E) against the keys at
    ``index`` (``table_index``), read where they lie in the table ``keys`` (R, E) (``row_table``).

    A gathered copy of the keys would be read twice (once to copy, once by the
    matmul): here each (query, key) product is one entry of a sampled matmul
    whose sparsity pattern is the rows' positions. Needs N <= R: torch caps a
    sparse tensor's entries at its dense size, and a row's N positions may
    repeat (a ragged last tile, padding).
    """
    B, Hkv, M, E = q_rows.shape
    N = index.numel() // (B * Hkv * M)
    starts = torch.arange(0, index.numel() + 1, N, dtype=index.dtype, device=index.device)
    scores = _reused_buffer(3, index.numel(), q_rows.dtype, q_rows.device).zero_()  # beta=0 keeps NaN: start at 0
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is what is used of it
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(starts, index.flatten(), scores, size=(B * Hkv * M, keys.shape[0]),
                                          check_invariants=False)
        torch.sparse.sampled_addmm(pattern, q_rows.reshape(B * Hkv * M, E), keys.t(), beta=0.0, out=pattern)
    return scores.view(B, Hkv, M, N)


def bagged_values(values: torch.Tensor, index: torch.Tensor, p: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
    """Each row's sum of its values at ``index`` (``table_index``) weighted by p (B, Hkv, M, N), read where
    they lie in the table ``values`` (R, Ev) (``row_table``); row b reads its first ``reads[b]`` positions.

    Returns (B, Hkv, M, Ev): one ``embedding_bag``, a bag per (row, head,
    query); with M a handful of query rows it runs faster than a matmul on a
    view (2.5 vs 3.3 ms for 8 x 8 heads of 1024 values on the 2-core dev
    machine). The bags must be adjacent, so each is followed by a discarded
    one over the row's padding (weight 0, but a value that may be anything,
    NaN included).
    """
    B, Hkv, M, N = p.shape
    bag_starts = N * torch.arange(B * Hkv * M, device=p.device, dtype=index.dtype).view(B, Hkv * M)
    offsets = torch.stack([bag_starts, bag_starts + reads.to(index.dtype).view(B, 1)], dim=-1).flatten()
    out = F.embedding_bag(index.flatten(), values, offsets, mode="sum", per_sample_weights=p.reshape(-1))
    return out.view(B, Hkv, M, 2, -1)[:, :, :, 0]


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
    (at most the K or V tiles one row of one decode step reads).
    """
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (slot, dtype, device)
    if key not in buffers or buffers[key].numel() < numel:
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key][:numel]
