"""Longformer / BigBird: global tokens, a sliding window and random blocks, bidirectional.

Longformer (Beltagy et al., 2020): each token attends to the tokens within
WINDOW positions either side; GLOBAL chosen tokens (here the first ones, e.g.
[CLS] and a question) attend to everything and are attended by everything.
BigBird (Zaheer et al., 2020) adds, per query block of RAND_BLOCK tokens,
RANDOM key blocks chosen at random: a captured (query blocks, key blocks) bool
table. An encoder that trains: the gradients are checked too.
"""

import torch

import flexattn
from _dense import check, dense_attention, qkv, report, torch_flex_error

HEADS, DIM, GLOBAL, WINDOW, RAND_BLOCK, RANDOM = 4, 64, 64, 192, 64, 3


def random_blocks(n, seed=0):
    """(n // RAND_BLOCK, n // RAND_BLOCK) bool: RANDOM distinct random key blocks per query block."""
    blocks = n // RAND_BLOCK
    g = torch.Generator().manual_seed(seed)
    picks = torch.stack([torch.randperm(blocks, generator=g)[:RANDOM] for _ in range(blocks)])
    return torch.zeros(blocks, blocks, dtype=torch.bool).scatter_(1, picks, True)


def make_bigbird(random):
    # --- the user's code -----------------------------------------------------------------
    def bigbird(b, h, q_idx, kv_idx):
        is_global = (q_idx < GLOBAL) | (kv_idx < GLOBAL)
        window = torch.abs(q_idx - kv_idx) <= WINDOW
        return is_global | window | random[q_idx // RAND_BLOCK, kv_idx // RAND_BLOCK]
    # --------------------------------------------------------------------------------------

    return bigbird


def dense_bigbird_mask(n, random):
    """The three patterns of the paper, each as an (n, n) matrix, united."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:GLOBAL, :] = mask[:, :GLOBAL] = True
    for i in range(n):
        mask[i, max(0, i - WINDOW): i + WINDOW + 1] = True
    for qb, kb in random.nonzero().tolist():
        mask[qb * RAND_BLOCK:(qb + 1) * RAND_BLOCK, kb * RAND_BLOCK:(kb + 1) * RAND_BLOCK] = True
    return mask


def main(size=8192):
    size = max(RAND_BLOCK, size // RAND_BLOCK * RAND_BLOCK)
    q, k, v = qkv(1, HEADS, size, DIM)
    random = random_blocks(size)
    bigbird = make_bigbird(random)
    block_mask = flexattn.create_block_mask(bigbird, None, None, size, size)
    mask = dense_bigbird_mask(size, random)
    errors = check(lambda q, k, v: flexattn.flex_attention(q, k, v, block_mask=block_mask),
                   lambda q, k, v: dense_attention(q, k, v, mask), [q, k, v])
    ours = flexattn.flex_attention(q, k, v, block_mask=block_mask)
    return report("Longformer / BigBird", size, block_mask, errors, torch_flex_error(ours, q, k, v, mask_mod=bigbird))


if __name__ == "__main__":
    main()
