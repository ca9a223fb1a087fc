"""Tree attention for speculative decoding: a tree of draft tokens checked in one pass over a long KV cache.

SpecInfer (Miao et al., 2024) and Medusa (Cai et al., 2024): the draft is a
token tree given by parent pointers (parent[i] < i, -1 for the roots, which
follow the cached prefix). Every tree token attends to the whole cached
prefix of PREFIX tokens and to its ancestors in the tree, itself included,
never to its siblings or cousins. Q_LEN is the tree size, KV_LEN = PREFIX +
tree size; the ancestor table is a captured (T, T) bool tensor, computed by
repeated squaring. Inference only: the forward pass is checked.
"""

import torch

import flexattn
from _dense import check, dense_attention, qkv, report, torch_flex_error

HEADS, DIM, TREE = 8, 64, 64


def random_tree(size, seed=0):
    """Parent pointers of a random draft tree: a few chains that branch."""
    g = torch.Generator().manual_seed(seed)
    parent = torch.tensor([-1] + [int(torch.randint(max(0, i - 8), i, (), generator=g)) for i in range(1, size)])
    return parent


def ancestor_table(parent):
    """(T, T) bool: ancestors[i, j] iff j is i or an ancestor of i (transitive closure by squaring)."""
    T = len(parent)
    ancestors = torch.eye(T, dtype=torch.bool)
    ancestors[torch.arange(T)[parent >= 0], parent[parent >= 0]] = True
    for _ in range(T.bit_length()):
        ancestors = ancestors | (ancestors.float() @ ancestors.float() > 0)
    return ancestors


def make_tree_mask(prefix, ancestors):
    # --- the user's code -----------------------------------------------------------------
    def tree_mask(b, h, q_idx, kv_idx):
        tree_kv = torch.clamp(kv_idx - prefix, min=0)
        return (kv_idx < prefix) | ancestors[q_idx, tree_kv]
    # --------------------------------------------------------------------------------------

    return tree_mask


def dense_tree_mask(prefix, parent):
    """The definition, walking parent pointers in Python: each token, then its parent, up to the root."""
    T = len(parent)
    mask = torch.zeros(T, prefix + T, dtype=torch.bool)
    mask[:, :prefix] = True
    for i in range(T):
        j = i
        while j >= 0:
            mask[i, prefix + j] = True
            j = int(parent[j])
    return mask


def main(size=16384):
    prefix = size
    parent = random_tree(TREE)
    tree_mask = make_tree_mask(prefix, ancestor_table(parent))
    q, k, v = qkv(1, HEADS, TREE, DIM, kv_len=prefix + TREE)
    block_mask = flexattn.create_block_mask(tree_mask, None, None, TREE, prefix + TREE, BLOCK_SIZE=(TREE, 128))
    mask = dense_tree_mask(prefix, parent)
    errors = check(lambda q, k, v: flexattn.flex_attention(q, k, v, block_mask=block_mask),
                   lambda q, k, v: dense_attention(q, k, v, mask), [q, k, v], grads=False)
    ours = flexattn.flex_attention(q, k, v, block_mask=block_mask)
    return report(f"tree attention, {TREE}-token tree over a {prefix}-token cache", prefix + TREE, block_mask,
                  errors, torch_flex_error(ours, q, k, v, mask_mod=tree_mask))


if __name__ == "__main__":
    main()
