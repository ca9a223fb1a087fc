"""Sigmoid attention, exactly, from softmax attention: a score_mod plus the returned log-sum-exp.

Ramapuram et al., 2024 ("Theory, Analysis, and Best Practices for Sigmoid
Self-Attention"): SigmoidAttn(X) = sigmoid(Q K^T / sqrt(d) + b) V with
b = -log(n), no normalization over the row; causal here (a masked key adds 0).

The activation trick: with score_mod x -> log sigmoid(x + b), softmax gives
sigmoid(x_ij + b) / sum_j sigmoid(x_ij + b), and the returned lse is
log sum_j sigmoid(x_ij + b); so out * exp(lse) is sigmoid attention, and its
gradient flows through both the score_mod and the lse.
"""

import math

import torch

import flexattn
from _dense import check, dense_scores, qkv, report, torch_flex_error

HEADS, DIM = 4, 64


def make_sigmoid_attention(n):
    bias = -math.log(n)

    # --- the user's code -----------------------------------------------------------------
    def log_sigmoid(score, b, h, q_idx, kv_idx):
        return torch.nn.functional.logsigmoid(score + bias)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def sigmoid_attention(q, k, v, block_mask):
        out, aux = flexattn.flex_attention(q, k, v, score_mod=log_sigmoid, block_mask=block_mask,
                                           return_aux=flexattn.AuxRequest(lse=True))
        return out * aux.lse.exp().unsqueeze(-1)
    # --------------------------------------------------------------------------------------

    return log_sigmoid, causal, sigmoid_attention


def dense_sigmoid(q, k, v):
    """The paper's formula: elementwise sigmoid of the biased scores, masked entries 0, times V."""
    L = q.shape[-2]
    weights = torch.sigmoid(dense_scores(q, k) - math.log(L)) * torch.ones(L, L, dtype=q.dtype).tril()
    return weights @ v


def main(size=2048):
    q, k, v = qkv(1, HEADS, size, DIM)
    log_sigmoid, causal, sigmoid_attention = make_sigmoid_attention(size)
    block_mask = flexattn.create_block_mask(causal, None, None, size, size)
    errors = check(lambda q, k, v: sigmoid_attention(q, k, v, block_mask), dense_sigmoid, [q, k, v])
    ours = flexattn.flex_attention(q, k, v, score_mod=log_sigmoid, block_mask=block_mask)
    return report("sigmoid attention", size, block_mask, errors,
                  torch_flex_error(ours, q, k, v, score_mod=log_sigmoid, mask_mod=causal))


if __name__ == "__main__":
    main()
