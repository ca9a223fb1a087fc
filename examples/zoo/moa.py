"""Mixture of sparse attention (MoA): a different sliding-window span per head, one kernel for all heads.

Fu et al., 2024 ("MoA: Mixture of Sparse Attention for Automatic Large Language
Model Compression"): head h keeps the first SINK tokens and a causal window
whose span grows with the input length, S_h = alpha_h + beta_h * N (the
"elastic rule" found by its profiler); query i sees key j iff
j <= i and (i - j < S_h or j < SINK). The spans are a captured per-head tensor.
MoA compresses a trained model, so only the forward pass is checked.
"""

import torch

import flexattn
from _dense import check, dense_attention, qkv, report, torch_flex_error

SINK, DIM = 64, 64
ALPHA = torch.tensor([64, 64, 128, 128, 256, 256, 512, 512])  # per head (8 heads)
BETA = torch.tensor([0.0, 0.125, 0.0, 0.125, 0.0, 0.25, 0.25, 0.5])
HEADS = len(ALPHA)


def spans(n):
    return (ALPHA + BETA * n).long()


def make_moa(n):
    span = spans(n)

    # --- the user's code -----------------------------------------------------------------
    def moa(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx - kv_idx < span[h]) | (kv_idx < SINK))
    # --------------------------------------------------------------------------------------

    return moa


def dense_moa_mask(n):
    """One (N, N) mask per head from its span, stacked: (1, H, N, N)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return torch.stack([(j <= i) & ((i - j < int(s)) | (j < SINK)) for s in spans(n)])[None]


def main(size=4096):
    q, k, v = qkv(1, HEADS, size, DIM)
    moa = make_moa(size)
    block_mask = flexattn.create_block_mask(moa, None, HEADS, size, size)
    mask = dense_moa_mask(size)
    errors = check(lambda q, k, v: flexattn.flex_attention(q, k, v, block_mask=block_mask),
                   lambda q, k, v: dense_attention(q, k, v, mask), [q, k, v], grads=False)
    ours = flexattn.flex_attention(q, k, v, block_mask=block_mask)
    return report("MoA", size, block_mask, errors, torch_flex_error(ours, q, k, v, mask_mod=moa, H=HEADS))


if __name__ == "__main__":
    main()
