"""Softmax results in pieces: normalising a piece and merging pieces by their log-sum-exp.

A piece of attention (some keys of a row) is kept either unnormalised, as its row max ``m``,
its sum ``total`` of ``exp(s - shift)`` (``shift``: m, or 0 where m is -inf) and its
weighted values ``acc``, or normalised, as ``out = acc / total`` and ``lse = shift + log(total)``.
A row that attends nowhere has total 0: out 0 and lse -inf.

``merge`` combines two normalised pieces in place (the back ends' running merge);
``merge_attention`` combines any number of them out of place and differentiably (the public
helper, for attention split over keys across calls or devices).
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


def merge_attention(outs, lses):
    """The attention of all keys from the attention of disjoint parts of them.

    ``outs``: normalised outputs (..., L, Ev) of attention over disjoint sets of keys (one
    tensor per set, e.g. one per device or per chunk of a long cache), ``lses`` their log-sum-exps
    (..., L), as ``flex_attention(..., return_aux=AuxRequest(lse=True))`` gives them. Returns
    ``(out, lse)`` of attention over every key, in the dtypes of ``outs[0]`` / ``lses[0]``;
    differentiable in every input (a row that attends nowhere in every part gives out 0, lse
    -inf and zero gradients, never NaN). Raises ``ValueError`` for no pieces or a count mismatch.

    Example::

        >>> o1, a1 = flex_attention(q, k[:, :, :512], v[:, :, :512], return_aux=AuxRequest(lse=True))
        >>> o2, a2 = flex_attention(q, k[:, :, 512:], v[:, :, 512:], return_aux=AuxRequest(lse=True))
        >>> out, lse = merge_attention([o1, o2], [a1.lse, a2.lse])  # attention over all 1024 keys
    """
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_attention needs one lse per output and at least one piece, got {len(outs)} "
                         f"outputs and {len(lses)} lses")
    stacked = torch.stack([l.float() if l.dtype != torch.float64 else l for l in lses])
    m = stacked.detach().amax(dim=0)
    shift = safe_shift(m)  # the lse is invariant to the shift: detached, its gradient stays exact
    weights = torch.exp(stacked - shift)  # 0 for empty pieces
    total = weights.sum(dim=0)
    empty = total == 0
    lse = torch.where(empty, NEG_INF, shift + torch.log(torch.where(empty, 1.0, total)))
    share = weights / torch.where(empty, 1.0, total)  # each piece's share of the row's softmax mass
    out = sum(o.to(share.dtype) * w.unsqueeze(-1) for o, w in zip(outs, share))
    return out.to(outs[0].dtype), lse.to(lses[0].dtype)
