"""Softmax results in pieces: normalising a piece and merging pieces by their log-sum-exp.

A piece of attention (some keys of a row) is kept either unnormalised, as its row max ``m``,
its sum ``total`` of ``exp(s - shift)`` (``shift``: m, or 0 where m is -inf) and its
weighted values ``acc``, or normalised, as ``out = acc / total`` and ``lse = shift + log(total)``.
A row that attends nowhere has total 0: out 0 and lse -inf.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def safe_shift(m: torch.Tensor) -> torch.Tensor:
    """The exponent shift of rows with max ``m``: m, or 0 where m is -inf (so exp gives 0, not NaN)."""
    return torch.where(m == NEG_INF, 0.0, m)


def normalise(acc: torch.Tensor, total: torch.Tensor, shift: torch.Tensor):
    """(out, lse) of an unnormalised piece: acc (..., Ev), total and shift (...)."""
    return acc / torch.where(total == 0, 1.0, total).unsqueeze(-1), shift + torch.log(total)


def merge(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor, first: bool = False) -> None:
    """out (..., Ev), lse (...) <- the softmax merge of themselves with another normalised piece (o, l), in place.

    Both are normalised, so the merge weighs each by exp(its lse - the merged lse). ``first``:
    out and lse hold nothing yet (a plain copy). Rows empty in both stay 0 / -inf.
    """
    if first:
        out.copy_(o)
        lse.copy_(l)
        return
    merged = torch.logaddexp(lse, l)
    shift = safe_shift(merged)
    out.mul_(torch.exp(lse - shift).unsqueeze(-1)).addcmul_(o, torch.exp(l - shift).unsqueeze(-1))
    lse.copy_(merged)
