"""The shared reference set of attention variants, for tests of every back end.

``MODS`` lists ``ModCase(name, build)``; ``build(L, S, H)`` returns a
``Mods(score_mod, mask_mod, params)`` for query length L, key length S and H
query heads. ``params`` are the floating-point tensors the score_mod reads
(learnable in a model: tests ask for their gradients). Buffers are made from
a fixed seed, so a case is the same every time it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Mods:
    score_mod: Callable | None
    mask_mod: Callable | None
    params: list[torch.Tensor] = field(default_factory=list)


@dataclass
class ModCase:
    name: str
    build: Callable[[int, int, int], Mods]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def causal(L, S, H):
    return Mods(None, lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)


def sliding_window(L, S, H):
    window = max(3, S // 4)

    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return Mods(None, mask)


def prefix_lm(L, S, H):
    prefix = max(2, S // 5)
    return Mods(None, lambda b, h, q_idx, kv_idx: (kv_idx < prefix) | (q_idx >= kv_idx))


def document(L, S, H):
    n = max(L, S)
    lengths = torch.randint(1, max(2, n // 2), (n,), generator=_gen(1))
    doc_id = torch.repeat_interleave(torch.arange(n), lengths)[:n]

    def mask(b, h, q_idx, kv_idx):
        return (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx)
    return Mods(None, mask)


def alibi(L, S, H):
    slopes = torch.exp2(-torch.arange(1, H + 1, dtype=torch.float32) * 8 / H)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return Mods(score_mod, causal(L, S, H).mask_mod, [slopes])


def softcap(L, S, H, cap=20.0):
    return Mods(lambda score, b, h, q_idx, kv_idx: cap * torch.tanh(score / cap), None)


def relative_bias(L, S, H):
    table = torch.randn(H, L + S - 1, generator=_gen(2))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + S - 1]
    return Mods(score_mod, None, [table])


def bias_read_twice(L, S, H):
    """One table read at two places (torch allows a captured tensor one read for gradients)."""
    table = torch.randn(H, L + S - 1, generator=_gen(3))

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + S - 1] - 0.5 * table[h, kv_idx - q_idx + S - 1]
    return Mods(score_mod, prefix_lm(L, S, H).mask_mod, [table])


def natten(L, S, H, width=6, radius=1):
    """2-D neighbourhood attention over a grid of ``width`` columns."""
    def mask(b, h, q_idx, kv_idx):
        q_row, q_col = q_idx // width, q_idx % width
        kv_row, kv_col = kv_idx // width, kv_idx % width
        return ((q_row - kv_row).abs() <= radius) & ((q_col - kv_col).abs() <= radius)
    return Mods(None, mask)


def dilated_sliding_window(L, S, H, dilation=2):
    window = max(4, S // 3)

    def mask(b, h, q_idx, kv_idx):
        distance = (q_idx - kv_idx).abs()
        return (distance <= window) & (distance % dilation == 0)
    return Mods(None, mask)


def empty_rows(L, S, H):
    """Query rows before L // 2 attend nowhere: out 0, lse -inf."""
    half = L // 2
    return Mods(None, lambda b, h, q_idx, kv_idx: (q_idx >= half) & (kv_idx < 10))


def per_head_batch(L, S, H):
    """A mask that differs per batch and head (each (b, h) lists its own tiles)."""
    def mask(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= (h + 1) * 7 + b * 5
    return Mods(lambda score, b, h, q_idx, kv_idx: score * (1.0 + 0.1 * h), mask)


MODS = [
    ModCase("causal", causal), ModCase("sliding_window", sliding_window), ModCase("prefix_lm", prefix_lm),
    ModCase("document", document), ModCase("alibi", alibi), ModCase("softcap", softcap),
    ModCase("relative_bias", relative_bias), ModCase("bias_read_twice", bias_read_twice),
    ModCase("natten", natten), ModCase("dilated_sliding_window", dilated_sliding_window),
    ModCase("empty_rows", empty_rows), ModCase("per_head_batch", per_head_batch),
]
