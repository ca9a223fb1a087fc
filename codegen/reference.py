"""The dense reference: an IR interpreter and attention computed the obvious way.

This is the ground truth every other back end is tested against. It is
written for clarity, not speed: it materializes the full (B, H, Q, KV) score
matrix in float32 (float64 when the inputs are float64).
"""

from __future__ import annotations

import math

import torch

from codegen.paths import Path, ServesEveryCall
from flexattn.block_mask import FULL, PARTIAL
from flexattn.call import Call, compute_dtype
from flexattn.ir import Graph
from flexattn.semantics import evaluate, index_grid


def dense_mask(mask_graph: Graph | None, buffers, B: int, H: int, Q_LEN: int, KV_LEN: int,
               device="cpu") -> torch.Tensor:
    """The mask as a bool tensor of shape (B, H, Q_LEN, KV_LEN)."""
    if mask_graph is None:
        return torch.ones(B, H, Q_LEN, KV_LEN, dtype=torch.bool, device=device)
    grid = index_grid(B, H, Q_LEN, KV_LEN, device)
    mask = evaluate(mask_graph, grid, [b.to(device) for b in buffers])
    return mask.to(torch.bool).expand(B, H, Q_LEN, KV_LEN)


def dense_attention(query, key, value, *, score_graph: Graph | None = None, score_buffers=(),
                    mask: torch.Tensor | None = None, scale: float | None = None,
                    enable_gqa: bool = False):
    """Attention with a score_mod graph and a dense bool mask, all in float32.

    Shapes: query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev),
    mask broadcastable to (B, Hq, L, S). Returns ``(out, lse, max_scores)`` with
    out (B, Hq, L, Ev) in query's dtype, lse and max_scores (B, Hq, L) in
    float32 (natural log). Fully masked rows give out 0, lse and max -inf.
    """
    B, Hq, L, E = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    compute = compute_dtype(query.dtype)
    q, k, v = query.to(compute), key.to(compute), value.to(compute)
    if enable_gqa and Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if score_graph is not None:
        env = index_grid(B, Hq, L, S, query.device)
        env["score"] = scores
        scores = evaluate(score_graph, env, list(score_buffers)).to(compute).expand(B, Hq, L, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.to(query.device), float("-inf"))
    max_scores = scores.amax(dim=-1).detach()  # not differentiable, as in torch
    # A fully masked row has max -inf: shift by 0 there (exp(score - max) would be NaN) and take
    # its lse from a branch that never sees log(0), so no NaN reaches any gradient. The lse is
    # invariant to the shift, so a detached shift leaves its gradient exact.
    empty = torch.isneginf(max_scores)
    safe_max = torch.where(empty, 0.0, max_scores)
    weights = torch.exp(scores - safe_max.unsqueeze(-1))
    denom = weights.sum(dim=-1)
    safe_denom = torch.where(empty, 1.0, denom)
    lse = torch.where(empty, float("-inf"), safe_max + torch.log(safe_denom))
    out = (weights @ v) / safe_denom.unsqueeze(-1)
    return out.to(query.dtype), lse.to(compute), max_scores.to(compute)


def block_mask_to_dense(block_mask, mask_graph: Graph | None, mask_buffers, B: int, H: int,
                        device="cpu") -> torch.Tensor:
    """The element mask a BlockMask means: full tiles True, partial tiles the mask_mod, empty False.

    ``block_mask`` is any object with torch's BlockMask fields (``tile_classes()``,
    ``BLOCK_SIZE``, ``seq_lengths``). Returns (B, H, Q_LEN, KV_LEN) bool.
    """
    Q_LEN, KV_LEN = block_mask.seq_lengths
    q_block, kv_block = block_mask.BLOCK_SIZE
    classes = block_mask.tile_classes().to(device)
    per_element = classes.repeat_interleave(q_block, dim=-2).repeat_interleave(kv_block, dim=-1)
    per_element = per_element[..., :Q_LEN, :KV_LEN]
    mask = dense_mask(mask_graph, mask_buffers, B, H, Q_LEN, KV_LEN, device)
    return (per_element == FULL) | ((per_element == PARTIAL) & mask)


class Dense(ServesEveryCall):
    name = "dense"
    summary = "the dense reference: every score materialised, the mods evaluated everywhere"

    def run(self, call: Call):
        mask = None
        if call.block_mask is not None:
            B, H = call.query.shape[0], call.query.shape[1]
            mask = block_mask_to_dense(call.block_mask, call.mask_graph, call.mask_buffers, B, H, call.query.device)
        return dense_attention(call.query, call.key, call.value, score_graph=call.score_graph,
                               score_buffers=call.score_buffers, mask=mask, scale=call.scale,
                               enable_gqa=call.enable_gqa)


PATHS: tuple[Path, ...] = (Dense(),)  # the reference has one path
