"""Prefix-LM (encoder-decoder in one stack) over packed documents.

Prefix-LM (Raffel et al., 2020, T5; UniLM, Dong et al., 2019): a document's
first tokens (its prefix: the input) are seen bidirectionally, the rest (the
target) causally; packing several documents in one row (as in T5's packed
training) adds: never across documents. Query i sees key j iff
doc(i) == doc(j) and (j is in its document's prefix or j <= i). The document
ids and each document's prefix end are captured tensors. It trains: the
gradients are checked too.
"""

import torch

import flexattn
from _dense import check, dense_attention, qkv, report, torch_flex_error

HEADS, DIM = 4, 64


def packed_documents(size, seed=0):
    """Random document lengths filling ``size`` tokens; each prefix a random part of its document."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(size // 16, size // 4, (size,), generator=g)
    lengths = lengths[: int((lengths.cumsum(0) < size).sum()) + 1]
    lengths[-1] -= int(lengths.sum()) - size
    starts = lengths.cumsum(0) - lengths
    prefix_lengths = (torch.rand(len(lengths), generator=g) * 0.8 * lengths).long() + 1
    return lengths, starts, starts + prefix_lengths


def make_prefix_lm(doc_id, prefix_end):
    # --- the user's code -----------------------------------------------------------------
    def packed_prefix_lm(b, h, q_idx, kv_idx):
        in_prefix = kv_idx < prefix_end[doc_id[kv_idx]]
        return (doc_id[q_idx] == doc_id[kv_idx]) & (in_prefix | (q_idx >= kv_idx))
    # --------------------------------------------------------------------------------------

    return packed_prefix_lm


def dense_mask(size, lengths, starts, prefix_ends):
    """Per document: its prefix columns are visible to all its rows, the rest of it causally."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    for start, length, prefix_end in zip(starts.tolist(), lengths.tolist(), prefix_ends.tolist()):
        end = start + length
        mask[start:end, start:prefix_end] = True  # the prefix is visible to the whole document
        mask[start:end, start:end] |= torch.ones(length, length, dtype=torch.bool).tril()  # causal after it
    return mask


def main(size=8192):
    lengths, starts, prefix_ends = packed_documents(size)
    doc_id = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    prefix_lm = make_prefix_lm(doc_id, prefix_ends)
    q, k, v = qkv(1, HEADS, size, DIM)
    block_mask = flexattn.create_block_mask(prefix_lm, None, None, size, size)
    mask = dense_mask(size, lengths, starts, prefix_ends)
    errors = check(lambda q, k, v: flexattn.flex_attention(q, k, v, block_mask=block_mask),
                   lambda q, k, v: dense_attention(q, k, v, mask), [q, k, v])
    ours = flexattn.flex_attention(q, k, v, block_mask=block_mask)
    return report(f"prefix-LM over {len(lengths)} packed documents", size, block_mask, errors,
                  torch_flex_error(ours, q, k, v, mask_mod=prefix_lm))


if __name__ == "__main__":
    main()
