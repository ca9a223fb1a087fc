"""Split-KV decoding in the torch back end: a few query rows against a long KV cache.

With one to a few query rows (``codegen.decoding``) the general loop has almost no work per KV
tile on the query side, and its cost is reading K/V. These paths are organised around that read:

* **Query heads that share a KV head go together.** The G = Hq / Hkv query heads of a KV head
  (GQA) and all Q_LEN rows form one (G * Q_LEN, E) matrix, so each KV tile is read once per KV
  head, by one matmul (keys-major, ``reads.keys_major_scores``), not G times.
* **Only tiles the BlockMask visits are read**, and the mask_mod is evaluated only where a tile
  is PARTIAL. The mods are evaluated by ``flexattn.semantics.evaluate`` on index tensors, so any
  IR graph works.

Four paths (tried in this order by ``codegen.torch_backend.paths``):

* ``decode_batch_in_place`` (``batch``): every sequence of the batch at once, masks, score_mod
  and softmax over the stacked scores, K/V read where they lie by the CPU kernels
  (``cpu_kernels``), a contiguous cache or a paged pool's scattered pages alike;
* ``decode_batch_copied`` (``batch``): the same with views and copies of tiles, where every
  sequence visits at most one chunk of tiles (a sliding window, a short cache);
* ``decode_pool`` (``pool``): a paged pool shared by the batch, tile by tile, read in place;
* ``decode_chunks`` (``chunks``): per sequence (and KV head where the mask depends on it), KV
  split into chunks whose partial results are merged by their log-sum-exp.

All are forward only. ``Decoding`` is what they share, prepared once per call.
"""

from __future__ import annotations

from functools import cached_property

import torch

from codegen.decoding import why_not_decoding
from flexattn.block_mask import EMPTY, FULL
from flexattn.call import Call

DEFAULT_CHUNK = 2048  # KV positions per chunk: big enough that per-chunk overhead is small
MIN_KV_TILES = 8  # shorter caches: the general paths are as fast (docs/performance.md)
NEG_INF = float("-inf")


def why_not_split_kv(call: Call, path: str) -> str | None:
    """Why the torch back end's split-KV ``path`` does not serve ``call``: not a decoding shape
    (``codegen.decoding``) or, unless the path is forced, a cache of fewer than ``MIN_KV_TILES`` tiles."""
    reason = why_not_decoding(call)
    if reason is not None or call.forces(path):
        return reason
    return call.derived("short cache", lambda: _why_short(call))  # every split-KV path asks


def _why_short(call: Call) -> str | None:
    S, kv_block = call.shape[4], call.block_size[1]
    if S < MIN_KV_TILES * kv_block:
        return f"KV_LEN={S} spans fewer than {MIN_KV_TILES} KV tiles of {kv_block}: the general paths are as fast"
    return None


def decoding(call: Call) -> "Decoding":
    """The ``Decoding`` of ``call`` (made once per call)."""
    return call.derived("decoding", lambda: Decoding(call))


class Decoding:
    """A decode call as its paths read it.

    ``q_block``/``kv_block``: tile sizes (one q tile of Q_LEN rows without a BlockMask);
    ``classes`` (B or 1, H or 1, Q_BLOCKS, KV_BLOCKS) tile classes on the query's device;
    ``tiles_per_chunk``: ``kernel_options["SPLIT_KV_CHUNK"]`` (default ``DEFAULT_CHUNK``) in whole
    tiles; the mods' buffers on the device; ``q_idx`` (L,); ``q``/``k``/``v`` in the compute float
    on first use.
    """

    def __init__(self, call: Call):
        B, Hq, Hkv, L, S = call.shape
        device = call.query.device
        self.call, self.L, self.S = call, L, S
        self.q_block, self.kv_block = call.block_size if call.block_mask is not None else (L, call.block_size[1])
        self.tiles_per_chunk = max(1, -(-int(call.options.get("SPLIT_KV_CHUNK", DEFAULT_CHUNK)) // self.kv_block))
        if call.block_mask is not None:
            self.classes = call.block_mask.tile_classes().to(device)
        else:
            self.classes = torch.full((1, 1, 1, -(-S // self.kv_block)), FULL, dtype=torch.int8, device=device)
        self.score_buffers = [t.to(device) for t in call.score_buffers]
        self.mask_buffers = [t.to(device) for t in call.mask_buffers]
        self.q_idx = torch.arange(L, device=device)

    @cached_property
    def q(self) -> torch.Tensor:
        return self.call.query.to(self.call.compute_dtype)

    @cached_property
    def k(self) -> torch.Tensor:
        return _to_compute(self.call.key, self.call.compute_dtype)

    @cached_property
    def v(self) -> torch.Tensor:
        return _to_compute(self.call.value, self.call.compute_dtype)

    @property
    def per_head(self) -> bool:
        """Whether the BlockMask lists tiles per head (the mask depends on the head)."""
        return self.classes.shape[1] > 1

    @cached_property
    def visits(self) -> torch.Tensor:
        """(B or 1, T) bool: the tiles each sequence visits for some query row (head-independent masks)."""
        return (self.classes[:, 0] != EMPTY).any(dim=1)

    @cached_property
    def width(self) -> int:
        """The most tiles one sequence visits."""
        return int(self.visits.sum(dim=1).max())

    def outputs(self):
        """Fresh (out (B, Hq, L, Ev), lse, max_scores (B, Hq, L)): 0, -inf, -inf (rows that attend nowhere)."""
        B, Hq, _, L, _ = self.call.shape
        q = self.q
        return (q.new_zeros(B, Hq, L, self.call.value.shape[-1]), q.new_full((B, Hq, L), NEG_INF),
                q.new_full((B, Hq, L), NEG_INF))

    def result(self, out, lse, max_scores):
        """``(out, lse, max_scores)`` as a back end returns them: out in the query's dtype."""
        return out.to(self.call.query.dtype), lse, max_scores


def _to_compute(x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """x in the compute float; a batch-broadcast pool (stride 0) is converted once, not per sequence."""
    if x.stride(0) == 0 and x.dtype != compute:
        return x[:1].to(compute).expand_as(x)
    return x.to(compute)
