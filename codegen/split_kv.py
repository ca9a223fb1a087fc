"""Split-KV decoding: a few query tokens against a long KV cache.

When Q_LEN is small (decode: 1 token, speculative decode: a few) the general
block-sparse loop has almost no work per KV tile on the query side, and its
cost is reading K/V. This path is organised around that read:

* **Query heads that share a KV head go together.** The G = Hq / Hkv query
  heads of a KV head (GQA) and all Q_LEN rows form one (G * Q_LEN, E) matrix,
  so each KV tile is read once per KV head, by one matmul, not G times.
* **KV is split into chunks** of ``SPLIT_KV_CHUNK`` positions (whole tiles).
  Each chunk yields a partial result independently (its row max ``m``, its
  sum of ``exp(s - m)`` and its unnormalised output); the partials are merged
  by their log-sum-exp at the end. Chunks need no running state from each
  other, so they can run in parallel; a chunk of consecutive tiles is a view
  of the cache (no copy), a chunk of scattered tiles is gathered once.
* **Rows run as one batch** (``codegen.split_kv_rows``) when the mask does
  not depend on the head and every row visits at most one chunk of tiles (a
  sliding window) or, on the CPU, where ``codegen.cpu_gather``'s kernels read
  K/V in place (a contiguous cache or a paged pool), rows of any length whose
  padded scores fit a budget: masks, score_mod and softmax run once over the
  stacked scores, and the kernels read each row's positions where they lie
  (a paged pool's scattered pages too, asking for rows ahead of time).
* **A paged pool** (K/V shared by the batch with stride 0) whose rows visit
  many tiles, filling most of the range they span, and that the batch does
  not take (other devices, a layout the kernels cannot read, scores past the
  batch's budget), is processed tile-major:
  every tile is a chunk, matched with its owner row's queries, all tiles of a
  KV head in one batched matmul on views of the pool; every tile's exponents
  are shifted by its row's max over all the row's tiles, so the tiles'
  partials add up per row without rescaling. Free pages in the range are
  read but dropped.
* Scores are computed keys-major (``split_kv_rows.keys_major_scores``).
* Only tiles the BlockMask visits are read; the mask_mod is evaluated only
  where a tile is PARTIAL for some row.

The mods are evaluated by ``flexattn.semantics.evaluate`` on the chunk's
index tensors, so any IR graph works. Entry point ``decode_attention`` has the
back-end signature of ``codegen.BACKENDS``; it is forward only (no autograd).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from codegen.split_kv_rows import batched_rows, keys_major_scores, read_tiles, rows_fit, tile_source
from flexattn.block_mask import EMPTY, FULL, PARTIAL
from flexattn.errors import LoweringError
from flexattn.semantics import evaluate

MAX_Q_LEN = 16  # longer queries have enough rows per tile for the general path
DEFAULT_CHUNK = 2048  # KV positions per chunk: big enough that per-chunk overhead is small
POOL_MIN_FILL = 0.5  # a paged pool is read in place when rows visit at least this share of the tiles in range
NEG_INF = float("-inf")


def decode_attention(query, key, value, *, score_graph, score_buffers, mask_graph, mask_buffers, block_mask,
                     scale, enable_gqa, kernel_options):
    """Attention for Q_LEN <= ``MAX_Q_LEN`` by split-KV (see the module docstring).

    Shapes: query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev),
    Hq a multiple of Hkv; ``block_mask`` a BlockMask over (L, S) or None
    (attend everywhere). ``kernel_options["SPLIT_KV_CHUNK"]`` sets the chunk
    length (rounded up to whole tiles) where the rows do not run as one batch.
    Returns ``(out, lse, max_scores)``: out (B, Hq, L, Ev) in query's dtype,
    lse/max_scores (B, Hq, L) in the compute float (float32; float64 for
    float64 inputs); a fully masked row gives 0 and -inf.

    Raises ``LoweringError`` for Q_LEN > ``MAX_Q_LEN`` or inputs that need gradients.

    Example::

        >>> out, lse, _ = decode_attention(q, k, v, score_graph=None, score_buffers=(),
        ...     mask_graph=traced.graph, mask_buffers=traced.buffers, block_mask=bm,
        ...     scale=0.125, enable_gqa=True, kernel_options={})
    """
    B, Hq, L, E = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    if L > MAX_Q_LEN:
        raise LoweringError(f"split-KV decoding handles Q_LEN <= {MAX_Q_LEN}, got {L}")
    if _needs_grad(query, key, value, score_buffers):
        raise LoweringError("split-KV decoding is forward only; use the general path when gradients are needed")
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = query.to(compute), _to_compute(key, compute), _to_compute(value, compute)
    q_block, kv_block = block_mask.BLOCK_SIZE if block_mask is not None else (L, 128)
    tiles_per_chunk = max(1, -(-int(kernel_options.get("SPLIT_KV_CHUNK", DEFAULT_CHUNK)) // kv_block))
    n_tiles = -(-S // kv_block)
    if block_mask is not None:
        classes = block_mask.tile_classes().to(q.device)  # (B or 1, H or 1, Q_BLOCKS, KV_BLOCKS)
    else:
        classes = torch.full((1, 1, 1, n_tiles), FULL, dtype=torch.int8, device=q.device)
    group = Hq // Hkv
    mods = _Mods(score_graph, score_buffers, mask_graph, mask_buffers, q_block, kv_block, L, q.device)

    out = q.new_zeros(B, Hq, L, v.shape[-1])
    lse = q.new_full((B, Hq, L), NEG_INF)
    max_scores = q.new_full((B, Hq, L), NEG_INF)
    if rows_fit(classes, q, k, v, tiles_per_chunk, kv_block):
        batched_rows(q, k, v, classes, scale, mods, out, lse, max_scores)
        return out.to(query.dtype), lse, max_scores
    owner = _page_owners(k, v, classes, B, kv_block)
    span = _filled_span(owner) if owner is not None else None
    if span is not None:
        _pool_major(q, k[0], v[0], classes, owner, span, scale, mods, out, lse, max_scores)
        return out.to(query.dtype), lse, max_scores
    # A unit: one batch row and the KV heads that visit the same tiles (all of them when
    # the mask does not depend on the head, else one KV head with its query-head group).
    per_head = classes.shape[1] > 1
    for b in range(B):
        unit_classes = classes[b if classes.shape[0] > 1 else 0]
        for kv_heads in ([slice(h, h + 1) for h in range(Hkv)] if per_head else [slice(0, Hkv)]):
            q_heads = slice(kv_heads.start * group, kv_heads.stop * group)
            tile_classes = unit_classes[q_heads] if per_head else unit_classes  # (H_u, Q_BLOCKS, KV_BLOCKS)
            tiles = (tile_classes != EMPTY).flatten(0, 1).any(0).nonzero().flatten()
            partials = [
                _chunk(q[b, q_heads], k[b, kv_heads], v[b, kv_heads], tiles[i:i + tiles_per_chunk], b, q_heads,
                       tile_classes, scale, mods)
                for i in range(0, tiles.numel(), tiles_per_chunk)
            ]
            if partials:
                out[b, q_heads], lse[b, q_heads], max_scores[b, q_heads] = _merge(partials)
    return out.to(query.dtype), lse, max_scores


def applies(query, key, value, score_buffers, kernel_options) -> bool:
    """Whether a back end should take its split-KV path: Q_LEN <= ``MAX_Q_LEN``, nothing needs a
    gradient and ``kernel_options["SPLIT_KV"]`` is not False (back ends may add conditions)."""
    return (kernel_options.get("SPLIT_KV", True) and query.shape[2] <= MAX_Q_LEN
            and not _needs_grad(query, key, value, score_buffers))


def _needs_grad(query, key, value, score_buffers) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, *score_buffers))


def _to_compute(x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """x in the compute float; a batch-broadcast pool (stride 0) is converted once, not per row."""
    if x.stride(0) == 0 and x.dtype != compute:
        return x[:1].to(compute).expand_as(x)
    return x.to(compute)


def _page_owners(k, v, classes, B: int, kv_block: int) -> torch.Tensor | None:
    """For a KV pool shared by the batch (a paged cache), the row that visits each tile.

    Returns (T,) int64 row indices (-1: no row visits the tile) when every row
    reads the same K/V memory, no tile is visited by two rows and some row's
    tiles are scattered (else None: per-row chunks are views of the cache).
    """
    shared = B == 1 or (k.stride(0) == 0 and v.stride(0) == 0)
    if not shared or classes.shape[1] != 1 or k.shape[2] % kv_block or (classes.shape[0] != B and B > 1):
        return None
    visits = (classes[:, 0] != EMPTY).any(dim=1)  # (B, T)
    count = visits.sum(dim=0)
    per_row = visits.sum(dim=1)
    first = visits.to(torch.int8).argmax(dim=1)
    last = visits.shape[1] - 1 - visits.flip(1).to(torch.int8).argmax(dim=1)
    scattered = (per_row > 0) & (last - first + 1 != per_row)
    if bool((count > 1).any()) or not bool(scattered.any()):
        return None
    return torch.where(count == 1, visits.to(torch.int8).argmax(dim=0), -1)


def _filled_span(owner: torch.Tensor) -> slice | None:
    """The range of tiles holding the visited ones, where they fill most of it (read it in place)."""
    visited = (owner >= 0).nonzero().flatten()
    if visited.numel() == 0:
        return None
    span = slice(int(visited[0]), int(visited[-1]) + 1)
    return span if visited.numel() >= POOL_MIN_FILL * (span.stop - span.start) else None


class _PoolTiles(NamedTuple):
    """What every KV head's pass over a pool's span shares (see ``_pool_major``); n tiles."""

    row: torch.Tensor  # (n,) each tile's owner row (0 for free tiles)
    env: dict  # the mods' b, q_idx, kv_idx over (tile, group, query row, position)
    empty: torch.Tensor  # (n, 1, L, 1) EMPTY for the owner's query rows (free tiles: all)
    partial: torch.Tensor  # tiles PARTIAL for some query row of their owner
    partial_rows: torch.Tensor  # (P, 1, L, 1) where those tiles are PARTIAL for the owner's query rows
    free: torch.Tensor  # tiles no row owns: their outputs are dropped (0 * NaN is NaN)


def _pool_major(q, k, v, classes, owner, span: slice, scale, mods, out, lse, max_scores):
    """Split-KV over a paged pool (k/v (Hkv, S, D)) whose rows visit most tiles of ``span``.

    Every tile is a chunk, matched with its owner row's queries (``owner`` (T,)
    from ``_page_owners``); the span is read in place, a view of the pool, one
    KV head per batched matmul, and the tiles' partials are summed per owner
    row. Writes out (B, Hq, L, Ev), lse and max_scores (B, Hq, L).
    """
    Hkv, S, E = k.shape
    tiles = torch.arange(span.start, span.stop, device=q.device)
    L, kv_block = q.shape[2], mods.kv_block
    row = owner[tiles].clamp(min=0)
    # Each tile's class for its owner's query rows (n, L); unvisited tiles are EMPTY.
    per_row = classes[row.view(-1, 1), 0, (mods.q_idx.view(1, L) // mods.q_block), tiles.view(-1, 1)]
    per_row = torch.where((owner[tiles] >= 0).view(-1, 1), per_row, EMPTY)
    kv_idx = tiles.view(-1, 1) * kv_block + torch.arange(kv_block, device=q.device)
    partial = (per_row == PARTIAL).any(dim=1).nonzero().flatten()
    shared = _PoolTiles(row, {"b": row.view(-1, 1, 1, 1), "q_idx": mods.q_idx.view(1, 1, L, 1),
                              "kv_idx": kv_idx.view(-1, 1, 1, kv_block)},
                        (per_row == EMPTY).view(-1, 1, L, 1), partial, (per_row[partial] == PARTIAL).view(-1, 1, L, 1),
                        (owner[tiles] < 0).nonzero().flatten())
    pool_tiles = lambda x, h: x[h].view(S // kv_block, kv_block, -1)[span]  # noqa: E731
    q = q * scale  # the few queries, not the many scores
    for h in range(Hkv):
        _tile_partials(q, pool_tiles(k, h), pool_tiles(v, h), h, Hkv, shared, mods, out, lse, max_scores)


def _tile_partials(q, k_tiles, v_tiles, kv_head: int, Hkv, shared: _PoolTiles, mods, out, lse, max_scores):
    """Attention of each tile with its owner row's queries for KV head ``kv_head``, summed per row.

    q (B, Hq, L, E) scaled; k_tiles/v_tiles (n, kv_block, D).
    """
    B, Hq, L, E = q.shape
    n, group, kv_block, row = k_tiles.shape[0], Hq // Hkv, mods.kv_block, shared.row
    q_heads = slice(kv_head * group, (kv_head + 1) * group)
    # Each tile's owner queries, gathered per head (small, and reused memory, unlike all heads at once).
    s = keys_major_scores(k_tiles, q[:, q_heads].reshape(B, group * L, E)[row]).view(n, group, L, kv_block)
    env = {**shared.env, "h": torch.arange(q_heads.start, q_heads.stop, device=s.device).view(1, group, 1, 1)}
    if mods.score_graph is not None:
        s = torch.broadcast_to(evaluate(mods.score_graph, {**env, "score": s}, mods.score_buffers), s.shape)
        s = s.to(q.dtype).contiguous()
    s.masked_fill_(shared.empty, NEG_INF)
    partial = shared.partial
    if partial.numel() and mods.mask_graph is not None:  # the mask_mod only where a tile is PARTIAL
        sub_env = {name: value[partial] if value.shape[0] > 1 else value for name, value in env.items()}
        keep = evaluate(mods.mask_graph, sub_env, mods.mask_buffers).bool()
        s[partial] = s[partial].masked_fill(shared.partial_rows & ~keep, NEG_INF)
    m = s.amax(dim=-1)  # (n, G, L)
    # Each row's max over all its tiles shifts the exponent of all of them, so the
    # tiles' partials add up as they are (no rescaling by their own maxima).
    row_max = m.new_full((B, group, L), NEG_INF).scatter_reduce_(0, row.view(-1, 1, 1).expand_as(m), m, "amax")
    row_shift = torch.where(row_max == NEG_INF, 0.0, row_max)
    p = s.sub_(row_shift[row].unsqueeze(-1)).exp_()
    o = torch.bmm(p.reshape(n, group * L, kv_block), v_tiles).view(n, group, L, -1).index_fill_(0, shared.free, 0)
    total = m.new_zeros(B, group, L).index_add_(0, row, p.sum(dim=-1))
    merged = m.new_zeros(B, group, L, o.shape[-1]).index_add_(0, row, o)
    out[:, q_heads] = merged / torch.where(total == 0, 1.0, total).unsqueeze(-1)
    lse[:, q_heads] = row_shift + torch.log(total)
    max_scores[:, q_heads] = row_max


class _Mods:
    """The traced mods and what evaluating them on a chunk needs."""

    def __init__(self, score_graph, score_buffers, mask_graph, mask_buffers, q_block, kv_block, L, device):
        self.score_graph, self.mask_graph = score_graph, mask_graph
        self.score_buffers = [t.to(device) for t in score_buffers]
        self.mask_buffers = [t.to(device) for t in mask_buffers]
        self.q_block, self.kv_block = q_block, kv_block
        self.q_idx = torch.arange(L, device=device).view(1, 1, L, 1)

    def env(self, b: int, q_heads: slice, group: int, kv_idx: torch.Tensor) -> dict:
        """Index tensors broadcasting to a chunk's scores (Hkv_u, G, L, N)."""
        h = torch.arange(q_heads.start, q_heads.stop, device=kv_idx.device).view(-1, group, 1, 1)
        return {"b": torch.tensor(b, device=kv_idx.device), "h": h, "q_idx": self.q_idx,
                "kv_idx": kv_idx.view(1, 1, 1, -1)}


def _chunk(q, k, v, tiles, b, q_heads, tile_classes, scale, mods: _Mods):
    """One chunk's partial: (row max m, sum of exp(s - m), unnormalised output), each per (Hq_u, L).

    q (Hq_u, L, E) for the query heads of k/v's (Hkv_u, S, E) heads; ``tiles``
    the chunk's visited KV tiles in ascending order.
    """
    Hkv_u, S, _ = k.shape
    group, L = q.shape[0] // Hkv_u, q.shape[1]
    kv_block = mods.kv_block
    # Consecutive tiles are a view of the cache; scattered ones (a paged cache) are gathered once.
    source, kv_idx = tile_source(tiles, kv_block, S)
    k_chunk, v_chunk = (read_tiles(x, source, kv_block, slot) for slot, x in enumerate((k, v)))
    # All query rows of a KV head in one matmul, keys-major (see ``keys_major_scores``).
    s = keys_major_scores(k_chunk, q.reshape(Hkv_u, group * L, -1) * scale).view(Hkv_u, group, L, -1)
    env = None
    if mods.score_graph is not None:
        env = mods.env(b, q_heads, group, kv_idx)
        env["score"] = s
        s = torch.broadcast_to(evaluate(mods.score_graph, env, mods.score_buffers), s.shape).to(s.dtype)
    chunk_classes = tile_classes[..., tiles]  # (H_u, Q_BLOCKS, tiles)
    if bool((chunk_classes != FULL).any()):
        s = s.masked_fill(~_keep(chunk_classes, kv_idx, b, q_heads, group, L, mods, env), NEG_INF)
    m = s.amax(dim=-1)
    # A row with nothing kept in this chunk has m = -inf: shift by 0 so exp gives 0, not NaN.
    shift = torch.where(m == NEG_INF, 0.0, m)
    p = torch.exp(s - shift.unsqueeze(-1))
    o = torch.bmm(p.reshape(Hkv_u, group * L, -1), v_chunk).view(Hkv_u * group, L, -1)
    return m.reshape(-1, L), p.sum(dim=-1).reshape(-1, L), o


def _keep(chunk_classes, kv_idx, b, q_heads, group, L, mods: _Mods, env):
    """Bool (H_u or 1, 1 or G, L, N): FULL tiles kept, PARTIAL tiles by the mask_mod, EMPTY dropped."""
    q_tile = (mods.q_idx // mods.q_block).view(1, L, 1)
    kv_tile = torch.arange(kv_idx.numel(), device=kv_idx.device) // mods.kv_block  # tile within the chunk
    per_element = chunk_classes[:, q_tile, kv_tile.view(1, 1, -1)].view(-1, 1, L, kv_idx.numel())
    if chunk_classes.shape[0] > 1:  # per-head classes: (G, L, N) -> (1, G, L, N)
        per_element = per_element.view(1, group, L, -1)
    keep = per_element == FULL
    if mods.mask_graph is not None and bool((chunk_classes == PARTIAL).any()):
        mask_env = {name: value for name, value in (env or mods.env(b, q_heads, group, kv_idx)).items()
                    if name != "score"}
        keep = keep | ((per_element == PARTIAL) & evaluate(mods.mask_graph, mask_env, mods.mask_buffers).bool())
    return keep


def _merge(partials):
    """Merge chunk partials by log-sum-exp -> out (Hq_u, L, Ev), lse and max (Hq_u, L)."""
    if len(partials) == 1:  # nothing to merge (a short window): normalise directly
        m, row_sum, out = partials[0]
        shift = torch.where(m == NEG_INF, 0.0, m)
        return out / torch.where(row_sum == 0, 1.0, row_sum).unsqueeze(-1), shift + torch.log(row_sum), m
    m = torch.stack([p[0] for p in partials])  # (C, Hq_u, L)
    row_sum = torch.stack([p[1] for p in partials])
    out = torch.stack([p[2] for p in partials])  # (C, Hq_u, L, Ev)
    m_all = m.amax(dim=0)
    shift_all = torch.where(m_all == NEG_INF, 0.0, m_all)
    # Each chunk's sums are relative to its own max; rescale to the common one (0 for empty chunks).
    weight = torch.where(m == NEG_INF, 0.0, torch.exp(m - shift_all))
    total = (weight * row_sum).sum(dim=0)
    merged = (weight.unsqueeze(-1) * out).sum(dim=0)
    merged = merged / torch.where(total == 0, 1.0, total).unsqueeze(-1)
    return merged, shift_all + torch.log(total), m_all
