"""Split-KV decoding per sequence, KV split into chunks merged by log-sum-exp (``decode_chunks``).

A unit is one sequence and the KV heads that visit the same tiles (all of them when the mask does
not depend on the head, else one KV head with its query-head group). Its visited tiles are split
into chunks of ``SPLIT_KV_CHUNK`` positions (whole tiles); each chunk yields a partial result
independently, and the partials are merged by their log-sum-exp. A chunk of consecutive tiles is a
view of the cache (no copy), a chunk of scattered tiles is copied once. This path serves every
decoding shape.
"""

from __future__ import annotations

import torch

from codegen.torch_backend.decode import NEG_INF, Decoding
from codegen.torch_backend.decode.reads import keys_major_scores, read_tiles, tile_source
from codegen.torch_backend.evaluate import index_inputs, kept, modded_scores
from flexattn.lse import merge, normalise, safe_shift
from flexattn.block_mask import EMPTY, FULL, PARTIAL


def chunked(d: Decoding):
    """(out, lse, max_scores) unit by unit, chunk by chunk (see the module docstring)."""
    q, k, v = d.q, d.k, d.v
    B, Hq, Hkv, L, _ = d.call.shape
    group, per_tiles = d.call.group, d.tiles_per_chunk
    out, lse, max_scores = d.outputs()
    for b in range(B):
        unit_classes = d.classes[b if d.classes.shape[0] > 1 else 0]
        for kv_heads in ([slice(h, h + 1) for h in range(Hkv)] if d.per_head else [slice(0, Hkv)]):
            q_heads = slice(kv_heads.start * group, kv_heads.stop * group)
            tile_classes = unit_classes[q_heads] if d.per_head else unit_classes  # (H_u, Q_BLOCKS, KV_BLOCKS)
            tiles = (tile_classes != EMPTY).flatten(0, 1).any(0).nonzero().flatten()
            for i in range(0, tiles.numel(), per_tiles):
                o, l, m = _chunk(d, q[b, q_heads], k[b, kv_heads], v[b, kv_heads], tiles[i:i + per_tiles], b,
                                 q_heads, tile_classes)
                merge(out[b, q_heads], lse[b, q_heads], o, l, first=i == 0)
                torch.maximum(max_scores[b, q_heads], m, out=max_scores[b, q_heads])
    return d.result(out, lse, max_scores)


def _chunk(d: Decoding, q, k, v, tiles, b: int, q_heads: slice, tile_classes):
    """One chunk's normalised partial: (out (Hq_u, L, Ev), lse, max (Hq_u, L)).

    q (Hq_u, L, E) for the query heads of k/v's (Hkv_u, S, E) heads; ``tiles`` the chunk's visited
    KV tiles in ascending order.
    """
    Hkv_u, S, _ = k.shape
    group, L, kv_block = q.shape[0] // Hkv_u, q.shape[1], d.kv_block
    source, kv_idx = tile_source(tiles, kv_block, S)
    k_chunk, v_chunk = (read_tiles(x, source, kv_block, slot) for slot, x in enumerate((k, v)))
    # All query rows of a KV head in one matmul, keys-major (see ``keys_major_scores``).
    s = keys_major_scores(k_chunk, q.reshape(Hkv_u, group * L, -1) * d.call.scale).view(Hkv_u, group, L, -1)
    env = index_inputs(4, b=(b, ()), h=(torch.arange(q_heads.start, q_heads.stop, device=s.device).view(-1, group),
                                        (0, 1)), q_idx=(d.q_idx, (2,)), kv_idx=(kv_idx, (3,)))
    if d.call.score_graph is not None:
        s = modded_scores(d.call.score_graph, s, env, d.score_buffers)
    chunk_classes = tile_classes[..., tiles]  # (H_u, Q_BLOCKS, tiles)
    if bool((chunk_classes != FULL).any()):
        s = s.masked_fill(~_keep(d, chunk_classes, kv_idx, group, env), NEG_INF)
    m = s.amax(dim=-1)
    shift = safe_shift(m)
    p = torch.exp(s - shift.unsqueeze(-1))
    acc = torch.bmm(p.reshape(Hkv_u, group * L, -1), v_chunk).view(Hkv_u * group, L, -1)
    o, l = normalise(acc, p.sum(dim=-1).reshape(-1, L), shift.reshape(-1, L))
    return o, l, m.reshape(-1, L)


def _keep(d: Decoding, chunk_classes, kv_idx, group: int, env):
    """Bool (H_u or 1, 1 or G, L, N): FULL tiles kept, PARTIAL tiles by the mask_mod, EMPTY dropped."""
    L = d.L
    q_tile = (d.q_idx // d.q_block).view(1, L, 1)
    kv_tile = torch.arange(kv_idx.numel(), device=kv_idx.device) // d.kv_block  # tile within the chunk
    per_element = chunk_classes[:, q_tile, kv_tile.view(1, 1, -1)].view(-1, 1, L, kv_idx.numel())
    if chunk_classes.shape[0] > 1:  # per-head classes: (G, L, N) -> (1, G, L, N)
        per_element = per_element.view(1, group, L, -1)
    keep = per_element == FULL
    if d.call.mask_graph is not None and bool((chunk_classes == PARTIAL).any()):
        keep = keep | ((per_element == PARTIAL) & kept(d.call.mask_graph, env, d.mask_buffers))
    return keep
