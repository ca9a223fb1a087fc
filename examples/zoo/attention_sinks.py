"""Attention sinks: StreamingLLM's mask and gpt-oss's learned per-head sink logits.

StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with
Attention Sinks"): token i attends to the keys j <= i that are among the first
SINKS tokens or within the last WINDOW positions.

gpt-oss (OpenAI, 2025): every head h has a learned logit s_h that joins each
row's softmax as one more column without a value,

    out_i = sum_j exp(x_ij) v_j / (exp(s_h) + sum_j exp(x_ij)),

which is flex_attention's output times sigmoid(lse_i - s_h): the sink logits
and q, k get their gradients through the returned log-sum-exp.
"""

import torch

import flexattn
from _dense import check, dense_scores, qkv, randn, report, torch_flex_error

SINKS, WINDOW, HEADS, DIM = 4, 128, 4, 64


# --- the user's code ---------------------------------------------------------------------
def streaming(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & ((kv_idx < SINKS) | (q_idx - kv_idx < WINDOW))


def attention_with_sinks(q, k, v, sinks, block_mask):
    out, aux = flexattn.flex_attention(q, k, v, block_mask=block_mask, return_aux=flexattn.AuxRequest(lse=True))
    return out * torch.sigmoid(aux.lse - sinks[:, None]).unsqueeze(-1)
# ------------------------------------------------------------------------------------------


def dense_sinks(q, k, v, sinks):
    """gpt-oss's reference: the sink logit as an extra softmax column, dropped after the softmax."""
    B, H, L, _ = q.shape
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    visible = (j <= i) & ((j < SINKS) | (i - j < WINDOW))
    scores = dense_scores(q, k).masked_fill(~visible, float("-inf"))
    column = sinks.view(1, H, 1, 1).expand(B, H, L, 1)
    weights = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    return weights @ v


def main(size=2048):
    q, k, v = qkv(1, HEADS, size, DIM)
    sinks = randn(HEADS, seed=3)
    block_mask = flexattn.create_block_mask(streaming, None, None, size, size)
    errors = check(lambda q, k, v, s: attention_with_sinks(q, k, v, s, block_mask), dense_sinks, [q, k, v, sinks])
    plain = flexattn.flex_attention(q, k, v, block_mask=block_mask)
    return report("attention sinks", size, block_mask, errors, torch_flex_error(plain, q, k, v, mask_mod=streaming))


if __name__ == "__main__":
    main()
