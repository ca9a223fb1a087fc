"""Split-KV decoding of the whole batch at once: every sequence's visited tiles as one padded batch.

Per-sequence work is a handful of tiny tensor ops around two matmuls, and their per-op cost
adds up. Here masking, the score_mod and the softmax run once over the stacked scores of all
sequences, and K/V are read where they lie:

* in place (``decode_batch_in_place``): the cache is seen as a table of rows
  (``reads.row_table``, a view) and the CPU kernels of ``cpu_kernels`` read each sequence's
  positions in it, consecutive or scattered over a paged pool's pages alike: the keys' scores,
  then the values weighted by the softmax numerators. A copy of scattered pages would be read
  twice, once to copy and once to multiply. This serves sequences of any length whose padded
  scores fit ``BATCH_SCORES_BUDGET``;
* by views and copies of tiles (``decode_batch_copied``, ``reads.read_tiles``) and a matmul per
  sequence, where every sequence visits at most one chunk of tiles;
* sequences are padded to the longest one's tiles; padding is masked out (its values are never read).

Both need a mask that does not depend on the head (one list of tiles per sequence).
"""

from __future__ import annotations

import torch

from codegen.torch_backend.decode import NEG_INF, Decoding
from codegen.torch_backend.decode.cpu_kernels import scores_at, values_at
from codegen.torch_backend.decode.reads import (keys_major_scores, read_tiles, reads_in_place, reused_buffer,
                                                row_table, tile_source)
from codegen.torch_backend.evaluate import index_inputs, kept, modded_scores
from flexattn.lse import normalise, safe_shift
from flexattn.block_mask import EMPTY, FULL, PARTIAL

BATCH_SCORES_BUDGET = 1 << 24  # score elements of one batch of long sequences (64 MB in fp32); more: other paths
# Runs of consecutive keys shorter than this on average (bytes of one head) get the kernels' prefetch
# hints; longer runs are left to the hardware prefetcher (docs/performance.md).
SHORT_RUN_BYTES = 1 << 17


def why_not_in_place(d: Decoding, forced: bool) -> str | None:
    """Why the whole batch is not read in place by the CPU kernels (None: it is)."""
    if d.per_head:
        return "the BlockMask lists tiles per head: the batch shares one list of tiles per sequence"
    reason = reads_in_place(d.k) or reads_in_place(d.v)
    if reason is not None:
        return reason
    B, Hq, _, L, _ = d.call.shape
    scores = B * Hq * L * d.width * d.kv_block
    if d.width > d.tiles_per_chunk and scores > BATCH_SCORES_BUDGET and not forced:
        return f"the batch's padded scores ({scores} elements) pass BATCH_SCORES_BUDGET ({BATCH_SCORES_BUDGET})"
    return None


def why_not_copied(d: Decoding, forced: bool) -> str | None:
    """Why the whole batch is not read by views and copies of tiles (None: it is)."""
    if d.per_head:
        return "the BlockMask lists tiles per head: the batch shares one list of tiles per sequence"
    if d.width > d.tiles_per_chunk and not forced:
        return (f"a sequence visits {d.width} tiles, more than one chunk of {d.tiles_per_chunk} "
                "(SPLIT_KV_CHUNK): per-sequence copies would be large")
    return None


def whole_batch(d: Decoding, in_place: bool):
    """(out, lse, max_scores) of every sequence over its visited tiles (see the module docstring)."""
    call, q, k, v = d.call, d.q, d.k, d.v
    B, Hq, Hkv, L, S = call.shape
    kv_block, group, width = d.kv_block, call.group, d.width
    if width == 0:  # every sequence fully masked: out 0, lse -inf
        return d.result(*d.outputs())
    visits = d.visits.expand(B, -1)  # (B, T)
    count = visits.sum(dim=1)
    # Sequence b's j-th slot holds its j-th visited tile; spare slots tile 0 (masked below).
    seq, tile = visits.nonzero(as_tuple=True)
    tiles = torch.zeros(B, width, dtype=torch.int64, device=q.device)
    tiles[seq, visits.cumsum(dim=1)[seq, tile] - 1] = tile
    used = torch.arange(width, device=q.device).view(1, -1) < count.view(-1, 1)  # (B, width)
    kv_idx = tiles.view(B, width, 1) * kv_block + torch.arange(kv_block, device=q.device)  # (B, width, kv_block)
    positions = kv_idx.view(B, -1).clamp(max=S - 1)  # past the cache only in a ragged last tile: masked below
    # Sequence b reads its first `reads[b]` positions: its visited tiles, without what lies past the cache.
    last_tile = tiles.gather(1, (count - 1).clamp(min=0).view(B, 1)).view(B)
    reads = torch.where(count > 0, count * kv_block - ((last_tile + 1) * kv_block - S).clamp(min=0), 0)
    q_rows = q.view(B, Hkv, group * L, -1) * call.scale  # scaling the few queries, not the many scores
    s = reused_buffer(2, B * Hkv * group * L * width * kv_block, q.dtype, q.device).view(B, Hkv, group * L, -1)
    if in_place:
        # Sequences that jump often (a pool's pages scattered one by one) get the kernels' prefetch hints.
        runs = int(((tiles[:, 1:] != tiles[:, :-1] + 1) & used[:, 1:]).sum()) + int((count > 0).sum())
        scattered = int(reads.sum()) * k.shape[-1] * k.element_size() < SHORT_RUN_BYTES * runs
        scores_at(*row_table(k), positions, q_rows, reads, scattered, out=s)
    else:
        sources = [tile_source(tiles[b, :int(count[b])], kv_block, S)[0] if count[b] else None for b in range(B)]
        s.fill_(NEG_INF)
        for b, source in enumerate(sources):
            if source is not None:
                keys = read_tiles(k[0] if k.stride(0) == 0 else k[b], source, kv_block, slot=0)
                s[b, :, :, :keys.shape[1]] = keys_major_scores(keys, q_rows[b])
    s = s.view(B, Hkv, group, L, width * kv_block)
    env = index_inputs(5, b=(torch.arange(B, device=q.device), (0,)),
                       h=(torch.arange(Hq, device=q.device).view(Hkv, group), (1, 2)),
                       q_idx=(d.q_idx, (3,)), kv_idx=(kv_idx.view(B, -1), (0, 4)))
    if call.score_graph is not None:
        s = modded_scores(call.score_graph, s, env, d.score_buffers)
    # Each element's class: its tile's class for its query row; spare slots are EMPTY.
    b_index = torch.arange(d.classes.shape[0], device=q.device).view(-1, 1, 1)
    per_slot = d.classes[b_index, 0, (d.q_idx.view(1, L, 1) // d.q_block), tiles.view(B, 1, width)]
    per_slot = torch.where(used.view(B, 1, width), per_slot, EMPTY)  # (B, L, width)
    per_element = per_slot.repeat_interleave(kv_block, dim=2).view(B, 1, 1, L, -1)
    keep = per_element == FULL
    if call.mask_graph is not None and bool((per_slot == PARTIAL).any()):
        keep = keep | ((per_element == PARTIAL) & kept(call.mask_graph, env, d.mask_buffers))
    keep = keep & (env["kv_idx"] < S)
    if not bool(keep.all()):  # windows of FULL tiles only: nothing to mask, no pass over the scores
        s.masked_fill_(~keep, NEG_INF)
    m = s.amax(dim=-1)  # (B, Hkv, G, L)
    shift = safe_shift(m)
    p = s.sub_(shift.unsqueeze(-1)).exp_().view(B, Hkv, group * L, width * kv_block)
    total = p.sum(dim=-1).view(B, Hkv, group, L)
    if in_place:
        o = values_at(*row_table(v), positions, p, reads, scattered)
    else:
        o = q.new_zeros(B, Hkv, group * L, v.shape[-1])
        for b, source in enumerate(sources):
            if source is not None:
                values = read_tiles(v[0] if v.stride(0) == 0 else v[b], source, kv_block, slot=1)
                o[b] = torch.bmm(p[b, :, :, :values.shape[1]], values)
    o, l = normalise(o.view(B, Hkv, group, L, -1), total, shift)
    return d.result(o.view(B, Hq, L, -1), l.view(B, Hq, L), m.view(B, Hq, L))
