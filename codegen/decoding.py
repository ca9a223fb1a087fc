"""What counts as a decoding shape: the rule both back ends' split-KV paths share.

A decoding call has a few query rows (one token, or a few of speculative decoding) against a long
KV cache and needs no gradients: split-KV paths stack the query heads of a KV head into one tile,
so each K/V tile is read once per KV head, and merge the KV splits' partials by log-sum-exp.
"""

from __future__ import annotations

from flexattn.call import Call

MAX_Q_LEN = 16  # longer queries have enough rows per tile for the general paths


def why_not_decoding(call: Call) -> str | None:
    """Why ``call`` is not a decoding shape (None when it is): Q_LEN <= ``MAX_Q_LEN``, nothing needs a
    gradient (split-KV is forward only), and ``kernel_options["SPLIT_KV"]`` is not False. Asked by
    every decode path of a table: decided once per call."""
    return call.derived("why_not_decoding", lambda: _why_not(call))


def _why_not(call: Call) -> str | None:
    if not call.options.get("SPLIT_KV", True):
        return "kernel_options SPLIT_KV=False (or BACKEND='TRITON')"
    L = call.shape[3]
    if L > MAX_Q_LEN:
        return f"Q_LEN={L} > {MAX_Q_LEN}: not a decoding shape"
    if call.needs_grad:
        return "an input needs gradients and split-KV decoding is forward only"
    return None
