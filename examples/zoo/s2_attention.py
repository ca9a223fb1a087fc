"""S2-Attn, LongLoRA's shifted sparse attention: half the heads in groups, half in groups shifted by half.

Chen et al., 2023 ("LongLoRA"): the sequence is split into groups of G tokens
(a quarter of the context, as in the paper) and attention is causal inside
each group; the second half of the heads first rolls its tokens by -G/2
(``qkv[:, :, H//2:].roll(-G//2)``), so its groups straddle the first half's,
then rolls the output back. The roll wraps: the last group of the shifted heads
holds the last G/2 tokens and the first G/2 (which, causally in rolled order,
see the last ones; LongLoRA accepts this in fine-tuning, SinkLoRA reorders
it). The mask_mod below is the same computation in original token order, so
no tensor is rolled.
"""

import torch

import flexattn
from _dense import check, dense_attention, qkv, report, torch_flex_error

HEADS, DIM = 8, 64


def make_s2(n, group):
    # --- the user's code -----------------------------------------------------------------
    def s2_attention(b, h, q_idx, kv_idx):
        shift = (h >= HEADS // 2) * (group // 2)
        q_pos, kv_pos = (q_idx - shift) % n, (kv_idx - shift) % n  # positions after the roll
        return (q_pos // group == kv_pos // group) & (q_pos >= kv_pos)
    # --------------------------------------------------------------------------------------

    return s2_attention


def dense_s2(q, k, v, group):
    """LongLoRA's procedure: roll half the heads, causal attention inside each group, roll back."""
    B, H, L, D = q.shape
    shifted = lambda x, s: torch.cat([x[:, :H // 2], x[:, H // 2:].roll(s, dims=2)], dim=1)  # noqa: E731
    groups = lambda x: x.view(B, H, L // group, group, -1)  # noqa: E731
    causal = torch.ones(group, group, dtype=torch.bool).tril()
    out = dense_attention(*(groups(shifted(x, -group // 2)) for x in (q, k, v)), causal)
    return shifted(out.reshape(B, H, L, D), group // 2)


def main(size=8192):
    group = size // 4
    size = 4 * group
    q, k, v = qkv(1, HEADS, size, DIM)
    s2_attention = make_s2(size, group)
    block_mask = flexattn.create_block_mask(s2_attention, None, HEADS, size, size)
    errors = check(lambda q, k, v: flexattn.flex_attention(q, k, v, block_mask=block_mask),
                   lambda q, k, v: dense_s2(q, k, v, group), [q, k, v])
    ours = flexattn.flex_attention(q, k, v, block_mask=block_mask)
    return report("S2-attention", size, block_mask, errors,
                  torch_flex_error(ours, q, k, v, mask_mod=s2_attention, H=HEADS))


if __name__ == "__main__":
    main()
