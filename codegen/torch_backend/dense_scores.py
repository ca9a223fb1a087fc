"""A decoding step with a score_mod, forward only: its whole score matrix in a few torch ops.

A decoding step of a model with softcapping or a bias (a score_mod) has nothing for a block-sparse
loop to skip when every KV tile is visited, and on a short cache the loop is one piece whose cost is
its thirty-odd small torch ops. Here the scores of every query row and key are one matmul, the
score_mod is evaluated once on them (``flexattn.semantics.evaluate`` over index tensors, any IR
graph), the mask (``small_dense.mask_of_call``: the BlockMask's classes and the mask_mod in
PARTIAL tiles, kept with the BlockMask that every layer of a step shares) replaces dropped scores
by -inf after the score_mod, as flex attention applies it, then one softmax and one matmul with
the values. The query heads of a KV head are one matrix of rows, (B, Hkv, G * Q_LEN, E), so K/V
are read once per KV head (GQA).

Served: what ``small_dense`` does not take (a score_mod, max_scores, head dims that differ) when
nothing needs a gradient (the general paths have the backward), at most ``MAX_CELLS`` positions,
and, unless forced, a decoding step (``codegen.decoding``) on a short cache or one with no EMPTY
tile: longer queries are faster in tiles, which never hold the whole matrix (docs/performance.md).
Values of keys that no row of their KV head reads are zeroed where they are not finite
(``small_dense.unread_zeroed``), since the matmul reads every value (a NaN there would turn a 0
weight into NaN); a dropped key's score is replaced, never added to, so a NaN key or a score_mod
that is not finite where the mask drops it does not reach the softmax.
"""

from __future__ import annotations

import torch

from codegen.decoding import why_not_decoding
from codegen.torch_backend.decode import MIN_KV_TILES
from codegen.torch_backend.evaluate import index_inputs, modded_scores
from codegen.torch_backend.small_dense import has_empty_tiles, mask_of_call, unread_zeroed, why_not_sized
from flexattn.call import Call
from flexattn.lse import normalise, safe_shift

NEG_INF = float("-inf")


def why_not_dense_scores(call: Call, forced: bool) -> str | None:
    """Why ``call`` is not a call this path computes (None: it is)."""
    if call.needs_grad:
        return "an input needs gradients and this path is forward only"
    reason = why_not_sized(call, "the scores")
    if reason is not None or forced:
        return reason
    reason = why_not_decoding(call)
    if reason is not None:
        return f"{reason} (longer queries: the tiled paths, which hold no whole score matrix, are faster)"
    if call.shape[4] >= MIN_KV_TILES * call.block_size[1] and has_empty_tiles(call):
        return "a decoding step on a long cache with EMPTY tiles: split-KV skips them"
    return None


def dense_scores(call: Call):
    """``(out, lse, max_scores)`` of ``call`` (see the module docstring): out (B, Hq, L, Ev) in the
    query's dtype, lse and max_scores (B, Hq, L) in the compute float."""
    B, Hq, Hkv, L, S = call.shape
    G, compute, mask = Hq // Hkv, call.compute_dtype, mask_of_call(call)
    device = call.query.device
    q = (call.query.to(compute) * call.scale).reshape(B, Hkv, G * L, -1)  # scaling the few queries
    k, v = call.key.to(compute), call.value.to(compute)
    v = unread_zeroed(v, mask, (B, Hkv, S, v.shape[-1]))  # a dropped key's score is replaced, not added to
    s = torch.matmul(q, k.transpose(-1, -2)).view(B, Hkv, G, L, S)
    if call.score_graph is not None:
        graph = call.score_graph
        reads = graph.derived("used inputs", graph.used_inputs)
        index = dict(b=lambda: (torch.arange(B, device=device), (0,)),
                     h=lambda: (torch.arange(Hq, device=device).view(Hkv, G), (1, 2)),
                     q_idx=lambda: (torch.arange(L, device=device), (3,)),
                     kv_idx=lambda: (torch.arange(S, device=device), (4,)))
        env = index_inputs(5, **{name: place() for name, place in index.items() if name in reads})
        s = modded_scores(graph, s, env, [t.to(device) for t in call.score_buffers])
    if mask.dropped is not None:
        # The mask's rows: the stacked (B or 1, Hkv or 1, G * L, S), or rows shared by the query
        # heads (B or 1, 1, L or 1, S), which broadcast over the KV heads and their groups.
        dropped = mask.dropped.unflatten(2, (-1, L) if mask.dropped.shape[2] == G * L else (1, -1))
        s.masked_fill_(dropped, NEG_INF)
    m = s.amax(dim=-1)  # (B, Hkv, G, L)
    shift = safe_shift(m)
    p = s.sub_(shift.unsqueeze(-1)).exp_()
    total = p.sum(dim=-1)
    o = torch.matmul(p.view(B, Hkv, G * L, S), v).view(B, Hkv, G, L, -1)
    out, lse = normalise(o, total, shift)
    return out.reshape(B, Hq, L, -1).to(call.query.dtype), lse.reshape(B, Hq, L), m.reshape(B, Hq, L)
