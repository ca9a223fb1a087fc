"""What every example does: build the block mask, run attention, check it, print sparsity and time."""

import time

import torch

import flexattn


def run(name, *, score_mod=None, mask_mod=None, size=2048, heads=4, dim=64, batch=1):
    """Build ``mask_mod``'s BlockMask, run flex_attention (auto back end), compare with the dense reference."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, size, dim, generator=g) for _ in range(3))
    start = time.perf_counter()
    block_mask = flexattn.create_block_mask(mask_mod, None, None, size, size) if mask_mod else None
    mask_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    out = flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    attn_ms = (time.perf_counter() - start) * 1e3
    ref = flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, backend="reference")
    error = (out - ref).abs().max().item()
    sparsity = block_mask.sparsity() if block_mask is not None else 0.0
    print(f"{name}: L={size}, sparsity {sparsity:.1f}%, block mask {mask_ms:.1f} ms, "
          f"attention {attn_ms:.1f} ms, max |out - reference| {error:.1e}")
    assert error < 1e-4, f"{name} differs from the reference by {error}"
    return out, block_mask
