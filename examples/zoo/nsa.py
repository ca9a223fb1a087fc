"""Native sparse attention, the selection branch: per query block, the top-k KV blocks chosen at run time.

Yuan et al., 2025 ("Native Sparse Attention"): keys are compressed per block
(here phi = the mean of the block's keys; the paper learns an MLP), the
compressed scores p_cmp = softmax(q K_cmp^T / sqrt(d)) over the blocks a query
has fully seen give each KV block an importance, summed over the query heads
of a GQA group (they share the selection) and over the queries of a block;
each query block keeps the TOPK most important earlier blocks, always with
the first block and the LOCAL blocks ending at its own (the local window), and
attends causally to the tokens of its selected blocks. The selection changes
every step: the BlockMask is built from the selected indices with
BlockMask.from_kv_blocks, and the generated kernel is reused unchanged.
"""

import torch

import codegen.cache
import flexattn
from _dense import check, dense_attention, qkv, report, torch_flex_error

HQ, HKV, DIM, BLOCK, TOPK, LOCAL, STEPS = 8, 2, 64, 64, 4, 2, 3


def importance(q, k):
    """(B, HKV, NQ, NKV) block importance from the compressed attention scores (no gradient: a selection)."""
    B, _, L, D = q.shape
    n = L // BLOCK
    k_cmp = k.detach().view(B, HKV, n, BLOCK, D).mean(3)
    scores = q.detach().view(B, HKV, HQ // HKV, L, D) @ k_cmp[:, :, None].transpose(-1, -2) * D ** -0.5
    seen = torch.arange(n)[None, :] * BLOCK + BLOCK - 1 <= torch.arange(L)[:, None]  # block fully in the past
    p_cmp = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1).nan_to_num(0.0)
    return p_cmp.sum(2).view(B, HKV, n, BLOCK, n).sum(3)


# --- the user's code ---------------------------------------------------------------------
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def select_blocks(scores):
    """(B, HQ, NQ, NKV) bool: the TOPK best earlier blocks, the first block and the LOCAL last ones."""
    n = scores.shape[-1]
    q_block, kv_block = torch.arange(n)[:, None], torch.arange(n)[None, :]
    forced = (kv_block == 0) | ((q_block - kv_block >= 0) & (q_block - kv_block < LOCAL))
    scores = scores.masked_fill(kv_block > q_block, float("-inf")).masked_fill(forced, float("inf"))
    top = scores.topk(min(TOPK + LOCAL + 1, n), dim=-1).indices
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & (kv_block <= q_block)
    return chosen.repeat_interleave(HQ // HKV, dim=1)


def block_mask_from(chosen, length):
    diagonal = torch.eye(chosen.shape[-1], dtype=torch.bool)  # causal inside; every other selected tile is full
    lists = lambda sel: (sel.sum(-1).int(), torch.argsort(~sel, dim=-1, stable=True).int())  # noqa: E731
    return flexattn.BlockMask.from_kv_blocks(*lists(chosen & diagonal), *lists(chosen & ~diagonal),
                                             BLOCK_SIZE=BLOCK, mask_mod=causal, seq_lengths=(length, length))
# ------------------------------------------------------------------------------------------


def dense_nsa_mask(chosen):
    """Token mask from the selected blocks: every token of a chosen block, causally."""
    tokens = chosen.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    L = tokens.shape[-1]
    return tokens & torch.ones(L, L, dtype=torch.bool).tril()


def main(size=8192):
    size = max(BLOCK, size // BLOCK * BLOCK)
    results, builds = {}, []
    for step in range(STEPS):  # a new selection every step, e.g. new queries and keys
        q, k, v = qkv(1, HQ, size, DIM, seed=10 * step)
        k, v = k[:, ::HQ // HKV].detach().requires_grad_(), v[:, ::HQ // HKV].detach().requires_grad_()
        chosen = select_blocks(importance(q, k))
        block_mask = block_mask_from(chosen, size)
        mask = dense_nsa_mask(chosen)
        errors = check(lambda q, k, v: flexattn.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True),
                       lambda q, k, v: dense_attention(q, k.repeat_interleave(HQ // HKV, 1),
                                                       v.repeat_interleave(HQ // HKV, 1), mask), [q, k, v])
        stats = codegen.cache.KERNELS.stats  # kernels generated or loaded from disk so far; reuses are memory hits
        builds.append(stats["builds"] + stats["disk_hits"])
        results = report(f"NSA selection step {step}", size, block_mask, errors)
    assert builds[-1] == builds[0], f"kernels were generated again for a new selection: {builds}"

    # torch's eager flex_attention, given the same selection as a dense lookup (torch cannot take our lists)
    def selected(b, h, q_idx, kv_idx):
        return chosen[b, h, q_idx // BLOCK, kv_idx // BLOCK] & (q_idx >= kv_idx)
    ours = flexattn.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    lookup = flexattn.create_block_mask(selected, 1, HQ, size, size, BLOCK_SIZE=BLOCK)  # the same mask, analysed
    assert torch.equal(lookup.tile_classes(), block_mask.tile_classes()), "the lookup form gives other tiles"
    results["torch"] = torch_flex_error(ours, q, k, v, mask_mod=selected, B=1, H=HQ, BLOCK_SIZE=BLOCK,
                                        enable_gqa=True)
    print(f"NSA: {STEPS} selections, kernels generated or loaded after each step {builds}; "
          f"max |ours - torch flex eager| / max |torch| {results['torch']:.1e}")
    return results


if __name__ == "__main__":
    main()
