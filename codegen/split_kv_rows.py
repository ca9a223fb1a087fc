"""Split-KV decoding for rows that each visit a window of tiles: the whole batch at once.

When every row of the batch visits at most one chunk of KV tiles (a sliding
window, a short cache), per-row work is a handful of tiny tensor ops around two
matmuls, and their per-op cost adds up to a third of the call. Here only the
two matmuls are per row; masking, the score_mod and the softmax run once over
the stacked scores of all rows:

* a row whose tiles are consecutive reads them as a view of the cache; a row
  of scattered tiles (a paged pool) has them copied side by side into a
  per-thread buffer reused across calls, right before its matmul reads them,
  so the copy is still in cache;
* row b's scores come from the tall (N x E) @ (E x G*L) matmul, which with
  G * L a handful of query rows runs about twice as fast on CPU as
  (G*L x E) @ (E x N), and are stored query-major, keys last, so the softmax
  reduces along contiguous memory;
* rows are padded to the longest row's tiles; padding is masked out.

Used by ``codegen.split_kv.decode_attention``; see there for shapes.
"""

from __future__ import annotations

import threading

import torch

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
    shared = k.stride(0) == 0
    sources = [tile_source(tiles[b, :int(count[b])], kv_block, S)[0] if count[b] else None for b in range(B)]

    q_rows = q.view(B, Hkv, group * L, E)
    s = q.new_full((B, Hkv, group * L, width * kv_block), NEG_INF)
    for b, source in enumerate(sources):
        if source is not None:
            keys = read_tiles(k[0] if shared else k[b], source, kv_block, slot=0)
            s[b, :, :, :keys.shape[1]] = torch.bmm(keys, q_rows[b].transpose(1, 2)).transpose(1, 2)
    s = s.mul_(scale).view(B, Hkv, group, L, width * kv_block)
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
    p = torch.exp(s.sub_(shift.unsqueeze(-1))).view(B, Hkv, group * L, width * kv_block)
    total = p.sum(dim=-1).view(B, Hkv, group, L)
    o = q.new_zeros(B, Hkv, group * L, v.shape[-1])
    for b, source in enumerate(sources):
        if source is not None:
            values = read_tiles(v[0] if shared else v[b], source, kv_block, slot=1)
            o[b] = torch.bmm(p[b, :, :, :values.shape[1]], values)
    o = o.view(B, Hkv, group, L, -1) / torch.where(total == 0, 1.0, total).unsqueeze(-1)
    out.copy_(o.view(B, Hq, L, -1))
    lse.copy_((shift + torch.log(total)).view(B, Hq, L))
    max_scores.copy_(m.view(B, Hq, L))


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
        out = _reused_buffer(slot, H * len(tiles) * kv_block * D, x).view(H, len(tiles), kv_block * D)
        return torch.index_select(x.view(H, S // kv_block, kv_block * D), 1, tiles, out=out).view(H, -1, D)
    return x.index_select(1, kv_idx)


def _reused_buffer(slot: int, numel: int, like: torch.Tensor) -> torch.Tensor:
    """``numel`` elements of ``like``'s dtype and device, reused by this thread's later calls.

    Grows to the largest size asked for and is kept for the thread's lifetime
    (at most the K or V tiles one row of one decode step reads).
    """
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (slot, like.dtype, like.device)
    if key not in buffers or buffers[key].numel() < numel:
        buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buffers[key][:numel]
