"""Differential attention (DIFF Transformer) with grouped noise maps (grouped differential attention).

DIFF Transformer (Ye et al., 2024): with [Q1; Q2] = X W_Q, [K1; K2] = X W_K,
V = X W_V (V twice as wide as Q1),

    DiffAttn(X) = (softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d))) V,
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,

lambda learnable (re-parameterized by the four vectors). Grouped differential
attention (Lim et al., 2025) gives the noise-cancelling map fewer heads: each
of its HEADS // GROUP maps is shared by GROUP signal heads. Here both maps are
causal and come from two flex calls sharing one BlockMask; the shared noise
map meets its GROUP value heads in one call by stacking them along the value
dimension. (The per-head normalization and (1 - lambda_init) factor that
follow in the paper act on the output and are left out.)
"""

import torch

import flexattn
from _dense import check, dense_scores, qkv, randn, report, torch_flex_error

HEADS, GROUP, DIM = 8, 2, 32  # signal heads; signal heads per noise head; head dim of Q1, K1 (V: 2 * DIM)
LAMBDA_INIT = 0.2  # the paper's 0.8 - 0.6 exp(-0.3 (layer - 1)) for the first layer


# --- the user's code ---------------------------------------------------------------------
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def diff_attention(q1, k1, q2, k2, v, lq1, lk1, lq2, lk2, block_mask):
    lam = torch.exp(lq1 @ lk1) - torch.exp(lq2 @ lk2) + LAMBDA_INIT
    signal = flexattn.flex_attention(q1, k1, v, block_mask=block_mask)
    B, H, S, Dv = v.shape  # the GROUP value heads of each noise head, side by side
    v_grouped = v.view(B, H // GROUP, GROUP, S, Dv).transpose(2, 3).reshape(B, H // GROUP, S, GROUP * Dv)
    noise = flexattn.flex_attention(q2, k2, v_grouped, block_mask=block_mask)
    noise = noise.view(B, H // GROUP, -1, GROUP, Dv).transpose(2, 3).reshape(B, H, -1, Dv)
    return signal - lam * noise
# ------------------------------------------------------------------------------------------


def dense_diff(q1, k1, q2, k2, v, lq1, lk1, lq2, lk2):
    """The paper's formula: two causal softmax maps, the noise map repeated over its group, subtracted."""
    L = q1.shape[-2]
    causal_mask = torch.ones(L, L, dtype=torch.bool).tril()
    signal_map = torch.softmax(dense_scores(q1, k1).masked_fill(~causal_mask, float("-inf")), dim=-1)
    noise_map = torch.softmax(dense_scores(q2, k2).masked_fill(~causal_mask, float("-inf")), dim=-1)
    lam = torch.exp(lq1 @ lk1) - torch.exp(lq2 @ lk2) + LAMBDA_INIT
    return (signal_map - lam * noise_map.repeat_interleave(GROUP, dim=1)) @ v


def main(size=2048):
    q1, k1, v = qkv(1, HEADS, size, DIM, v_dim=2 * DIM)
    q2, k2, _ = qkv(1, HEADS // GROUP, size, DIM, seed=10)
    lambdas = [randn(DIM, seed=20 + i, scale=0.1) for i in range(4)]
    block_mask = flexattn.create_block_mask(causal, None, None, size, size)
    errors = check(lambda *leaves: diff_attention(*leaves, block_mask), dense_diff, [q1, k1, q2, k2, v, *lambdas])
    signal = flexattn.flex_attention(q1, k1, v, block_mask=block_mask)
    return report("differential attention", size, block_mask, errors,
                  torch_flex_error(signal, q1, k1, v, mask_mod=causal))


if __name__ == "__main__":
    main()
