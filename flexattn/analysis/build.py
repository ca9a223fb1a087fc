"""create_block_mask: the BlockMask of a mask_mod."""

from __future__ import annotations

import torch

from flexattn.block_mask import DEFAULT_BLOCK_SIZE, EMPTY, FULL, PARTIAL, BlockMask, _pair
from flexattn.semantics import evaluate, index_grid
from flexattn.trace import trace_mask_mod


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=DEFAULT_BLOCK_SIZE) -> BlockMask:
    """Build the BlockMask of ``mask_mod`` (evaluated densely; see the analysis issue)."""
    B, H = B or 1, H or 1
    q_block, kv_block = _pair(BLOCK_SIZE)
    traced = trace_mask_mod(mask_mod)
    mask = evaluate(traced.graph, index_grid(B, H, Q_LEN, KV_LEN, device), list(traced.buffers))
    mask = mask.to(torch.bool).expand(B, H, Q_LEN, KV_LEN)
    pad_q, pad_kv = -Q_LEN % q_block, -KV_LEN % kv_block
    mask = torch.nn.functional.pad(mask, (0, pad_kv, 0, pad_q))
    tiles = mask.view(B, H, mask.shape[2] // q_block, q_block, mask.shape[3] // kv_block, kv_block)
    counts = tiles.sum(dim=(3, 5))
    classes = torch.full(counts.shape, EMPTY, dtype=torch.int8)
    classes[counts > 0] = PARTIAL
    classes[counts == q_block * kv_block] = FULL
    block_mask = BlockMask.from_tile_classes(classes, (q_block, kv_block), (Q_LEN, KV_LEN), mask_mod)
    block_mask.traced_mask = traced
    return block_mask
