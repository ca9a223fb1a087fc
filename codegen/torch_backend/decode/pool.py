"""Split-KV decoding over a paged pool, tile by tile (``decode_pool``).

A paged pool (K/V shared by the batch with stride 0) whose sequences visit many tiles, filling
most of the range they span, is processed tile-major: every tile is a chunk, matched with its
owner sequence's queries, all tiles of a KV head in one batched matmul on views of the pool.
Every tile's exponents are shifted by its owner's max over all the owner's tiles, so the tiles'
partials add up per sequence without rescaling. Free pages in the range are read but dropped.
"""

from __future__ import annotations

from functools import cached_property
from typing import NamedTuple

import torch

from codegen.torch_backend.decode import NEG_INF, Decoding
from codegen.torch_backend.decode.reads import keys_major_scores
from codegen.torch_backend.evaluate import index_inputs, kept, modded_scores
from flexattn.lse import normalise, safe_shift
from flexattn.block_mask import EMPTY, PARTIAL

POOL_MIN_FILL = 0.5  # the pool is read in place when the visited tiles are at least this share of their range


class Pool:
    """Which sequence owns each tile of a pool shared by the batch, and the range read in place."""

    def __init__(self, d: Decoding):
        self.d = d

    @cached_property
    def owner(self) -> torch.Tensor | None:
        """(T,) int64 owner sequence per tile (-1: no sequence visits it) when every sequence reads
        the same K/V memory, no tile is visited by two sequences and some sequence's tiles are
        scattered; else None (per-sequence chunks are views of the cache)."""
        d = self.d
        B = d.call.shape[0]
        k, v, classes = d.call.key, d.call.value, d.classes
        shared = B == 1 or (k.stride(0) == 0 and v.stride(0) == 0)
        if not shared or d.per_head or k.shape[2] % d.kv_block or (classes.shape[0] != B and B > 1):
            return None
        visits = d.visits  # (B, T)
        count, per_seq = visits.sum(dim=0), visits.sum(dim=1)
        first = visits.to(torch.int8).argmax(dim=1)
        last = visits.shape[1] - 1 - visits.flip(1).to(torch.int8).argmax(dim=1)
        scattered = (per_seq > 0) & (last - first + 1 != per_seq)
        if bool((count > 1).any()) or not bool(scattered.any()):
            return None
        return torch.where(count == 1, visits.to(torch.int8).argmax(dim=0), -1)

    def why_not(self, forced: bool) -> str | None:
        """Why the pool is not read tile by tile (None: it is)."""
        if self.owner is None:
            return ("K/V are not one pool shared by the batch (stride 0, whole tiles) whose sequences own "
                    "their tiles alone, some of them scattered")
        visited = (self.owner >= 0).nonzero().flatten()
        span = int(visited[-1]) + 1 - int(visited[0])
        if visited.numel() < POOL_MIN_FILL * span and not forced:
            return f"the visited tiles fill {visited.numel()} of the {span} in their range (< {POOL_MIN_FILL:.0%})"
        return None


class _PoolTiles(NamedTuple):
    """What every KV head's pass over a pool's range shares (see ``pool_major``); n tiles."""

    owner: torch.Tensor  # (n,) each tile's owner sequence (0 for free tiles)
    env: dict  # the mods' b, q_idx, kv_idx over (tile, group, query row, position)
    empty: torch.Tensor  # (n, 1, L, 1) EMPTY for the owner's query rows (free tiles: all)
    partial: torch.Tensor  # tiles PARTIAL for some query row of their owner
    partial_rows: torch.Tensor  # (P, 1, L, 1) where those tiles are PARTIAL for the owner's query rows
    free: torch.Tensor  # tiles no sequence owns: their outputs are dropped (0 * NaN is NaN)


def pool_major(d: Decoding, pool: Pool):
    """(out, lse, max_scores) over the pool's range of visited tiles, read in place (see the module docstring)."""
    q, k, v = d.q, d.k[0], d.v[0]  # k/v (Hkv, S, D): the pool
    Hkv, S, _ = k.shape
    L, kv_block, owner = d.L, d.kv_block, pool.owner
    visited = (owner >= 0).nonzero().flatten()
    tiles = torch.arange(int(visited[0]), int(visited[-1]) + 1, device=q.device)
    seq = owner[tiles].clamp(min=0)
    # Each tile's class for its owner's query rows (n, L); unvisited tiles are EMPTY.
    per_row = d.classes[seq.view(-1, 1), 0, (d.q_idx.view(1, L) // d.q_block), tiles.view(-1, 1)]
    per_row = torch.where((owner[tiles] >= 0).view(-1, 1), per_row, EMPTY)
    kv_idx = tiles.view(-1, 1) * kv_block + torch.arange(kv_block, device=q.device)
    partial = (per_row == PARTIAL).any(dim=1).nonzero().flatten()
    shared = _PoolTiles(seq, index_inputs(4, b=(seq, (0,)), q_idx=(d.q_idx, (2,)), kv_idx=(kv_idx, (0, 3))),
                        (per_row == EMPTY).view(-1, 1, L, 1), partial, (per_row[partial] == PARTIAL).view(-1, 1, L, 1),
                        (owner[tiles] < 0).nonzero().flatten())
    span = slice(int(tiles[0]), int(tiles[-1]) + 1)
    pool_tiles = lambda x, h: x[h].view(S // kv_block, kv_block, -1)[span]  # noqa: E731
    q = q * d.call.scale  # the few queries, not the many scores
    outputs = d.outputs()
    for h in range(Hkv):
        _tile_partials(d, q, pool_tiles(k, h), pool_tiles(v, h), h, shared, *outputs)
    return d.result(*outputs)


def _tile_partials(d: Decoding, q, k_tiles, v_tiles, kv_head: int, shared: _PoolTiles, out, lse, max_scores):
    """Attention of each tile with its owner's queries for KV head ``kv_head``, summed per sequence.

    q (B, Hq, L, E) scaled; k_tiles/v_tiles (n, kv_block, D); writes out, lse, max_scores.
    """
    B, Hq, Hkv, L, _ = d.call.shape
    n, group, kv_block, seq = k_tiles.shape[0], d.call.group, d.kv_block, shared.owner
    q_heads = slice(kv_head * group, (kv_head + 1) * group)
    # Each tile's owner queries, picked per head (small, and reused memory, unlike all heads at once).
    s = keys_major_scores(k_tiles, q[:, q_heads].reshape(B, group * L, -1)[seq]).view(n, group, L, kv_block)
    env = {**shared.env, **index_inputs(4, h=(torch.arange(q_heads.start, q_heads.stop, device=s.device), (1,)))}
    if d.call.score_graph is not None:
        s = modded_scores(d.call.score_graph, s, env, d.score_buffers)
    s.masked_fill_(shared.empty, NEG_INF)
    partial = shared.partial
    if partial.numel() and d.call.mask_graph is not None:  # the mask_mod only where a tile is PARTIAL
        sub_env = {name: value[partial] if value.shape[0] > 1 else value for name, value in env.items()}
        keep = kept(d.call.mask_graph, sub_env, d.mask_buffers)
        s[partial] = s[partial].masked_fill(shared.partial_rows & ~keep, NEG_INF)
    m = s.amax(dim=-1)  # (n, G, L)
    # Each sequence's max over all its tiles shifts the exponent of all of them, so the tiles'
    # partials add up as they are (no rescaling by their own maxima).
    seq_max = m.new_full((B, group, L), NEG_INF).scatter_reduce_(0, seq.view(-1, 1, 1).expand_as(m), m, "amax")
    seq_shift = safe_shift(seq_max)
    p = s.sub_(seq_shift[seq].unsqueeze(-1)).exp_()
    o = torch.bmm(p.reshape(n, group * L, kv_block), v_tiles).view(n, group, L, -1).index_fill_(0, shared.free, 0)
    total = m.new_zeros(B, group, L).index_add_(0, seq, p.sum(dim=-1))
    acc = m.new_zeros(B, group, L, o.shape[-1]).index_add_(0, seq, o)
    out[:, q_heads], lse[:, q_heads] = normalise(acc, total, seq_shift)
    max_scores[:, q_heads] = seq_max
