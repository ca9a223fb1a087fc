"""Packed documents: several sequences of random lengths in one row, each attending only to itself."""

import torch

from _common import run


def document_ids(size, seed=0):
    lengths = torch.randint(32, size // 4, (size,), generator=torch.Generator().manual_seed(seed))
    return torch.repeat_interleave(torch.arange(size), lengths)[:size]


def make_document_mask(doc_id):
    def document_causal(b, h, q_idx, kv_idx):
        return (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx)

    return document_causal


def main(size=2048):
    return run("packed documents", mask_mod=make_document_mask(document_ids(size)), size=size)


if __name__ == "__main__":
    main()
