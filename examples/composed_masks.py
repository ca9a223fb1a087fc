"""Composing masks: packed documents AND a sliding window, with and_masks; or a global prefix with or_masks."""

import flexattn
from _common import run
from document_mask import document_ids, make_document_mask

WINDOW, PREFIX = 128, 64


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOW)


def global_prefix(b, h, q_idx, kv_idx):
    return kv_idx < PREFIX


def main(size=2048):
    documents = make_document_mask(document_ids(size))
    run("documents & sliding window", mask_mod=flexattn.and_masks(documents, sliding_window), size=size)
    return run("sliding window | global prefix", mask_mod=flexattn.or_masks(sliding_window, global_prefix), size=size)


if __name__ == "__main__":
    main()
