"""tanh softcapping of the scores (as in Gemma 2), causal."""

import torch

from _common import run

CAP = 30.0


def softcap(score, b, h, q_idx, kv_idx):
    return CAP * torch.tanh(score / CAP)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def main(size=2048):
    return run("softcapping", score_mod=softcap, mask_mod=causal, size=size)


if __name__ == "__main__":
    main()
