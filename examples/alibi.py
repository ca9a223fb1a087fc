"""ALiBi: a per-head linear bias on the distance, with a causal mask."""

import torch

from _common import run

HEADS = 4
SLOPES = torch.exp2(-8.0 * torch.arange(1, HEADS + 1) / HEADS)  # a captured buffer, read per head


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def main(size=2048):
    return run("alibi", score_mod=alibi, mask_mod=causal, size=size, heads=HEADS)


if __name__ == "__main__":
    main()
