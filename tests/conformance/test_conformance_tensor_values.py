"""Mods with tensor-valued intermediates, run through flexattn and torch.

A captured tensor indexed in fewer dimensions than its rank is a tensor per (b, h, q_idx,
kv_idx) under torch's vmap; so are ``unsqueeze``, broadcasting against a captured 1-D tensor,
and ``torch.stack`` of traced values. Each case reduces such a value (any, all, sum,
amax, mean, dot, matmul, einsum, isin, norm, logsumexp, argmax, max over a dim) or searches a
captured sorted tensor (``searchsorted`` / ``bucketize``: document ids from offsets, per batch
row too), or reads a captured tensor at a negative traced index (from the end, as torch);
each gets the four checks of ``conformance_helpers.make_case_tests``.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance_helpers import Case, check_block_mask, check_create_mask, make_case_tests

G = torch.Generator().manual_seed(21)
L = 96
OFFSETS = torch.tensor([0, 17, 40, 41, 70, L], dtype=torch.int32)
# More starts than flexattn counts one by one: the unrolled binary search (empty documents too).
MANY_OFFSETS = torch.cat([torch.tensor([0]), torch.randint(0, L, (40,), generator=G).sort().values, torch.tensor([L])])
ROW_OFFSETS = torch.tensor([[0, 30, 60, L, L], [0, 5, 50, 51, L]])  # per batch row (jagged)
BOUNDARIES = torch.tensor([8, 16, 32, 64])  # bucketize: log-spaced distance buckets
ALLOWED = torch.tensor([0, 3, 5])
SETS = torch.randint(0, 6, (2, L // 16, 4), generator=G)  # per batch and q tile: the kv tiles it sees
WRAP = torch.randn(L, generator=G)  # read at q_idx - kv_idx: a negative index counts from the end, as in torch
TOPK = torch.stack([torch.randperm(6, generator=G)[:3] for _ in range(2 * L // 16)]).view(2, L // 16, 3)


def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


def mask_only(mask_mod):
    return lambda: (None, mask_mod)


def document_ids(b, h, q_idx, kv_idx):
    same = torch.searchsorted(OFFSETS, q_idx, right=True) == torch.searchsorted(OFFSETS, kv_idx, right=True)
    return same & (q_idx >= kv_idx)


def many_documents(b, h, q_idx, kv_idx):
    return torch.bucketize(q_idx, MANY_OFFSETS, right=True) == torch.bucketize(kv_idx, MANY_OFFSETS, right=True)


def jagged_rows(b, h, q_idx, kv_idx):
    rows = ROW_OFFSETS[b]
    return torch.searchsorted(rows, q_idx, side="right") == torch.searchsorted(rows, kv_idx, side="right")


def bucket_window(b, h, q_idx, kv_idx):
    return torch.bucketize((q_idx - kv_idx).abs(), BOUNDARIES, right=False) <= 1 + h


def tile_sets(b, h, q_idx, kv_idx):
    return ((kv_idx // 16).unsqueeze(-1) == SETS[b, q_idx // 16]).any(-1)


def topk_all_excluded(b, h, q_idx, kv_idx):
    return (TOPK[b, q_idx // 16] != kv_idx // 16).all(dim=-1) | (q_idx == kv_idx)


def isin_heads(b, h, q_idx, kv_idx):
    return torch.isin(kv_idx % 7, ALLOWED) | (q_idx >= kv_idx)


def stacked_bounds(b, h, q_idx, kv_idx):
    bounds = torch.stack([q_idx - 20, q_idx + 5])
    return (kv_idx >= bounds[0]) & (kv_idx <= bounds[1])


def rope_dot(qv, kv):
    return (lambda score, b, h, q_idx, kv_idx: score + torch.dot(qv[h, q_idx], kv[h, kv_idx])), None


def matmul_bilinear(vectors, weight):
    """A bilinear form of captured per-position vectors: q_vec @ W @ kv_vec."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + vectors[q_idx] @ weight @ vectors[kv_idx]
    return score_mod, None


def einsum_pair(vectors):
    return (lambda score, b, h, q_idx, kv_idx: score + torch.einsum("i,i->", vectors[q_idx], vectors[kv_idx])), None


def amax_gate(table):
    return (lambda score, b, h, q_idx, kv_idx: score * torch.sigmoid(table[h].amax()) + table[h, kv_idx % 4]), None


def mean_and_sum(table):
    def score_mod(score, b, h, q_idx, kv_idx):
        row = table[kv_idx % 8]
        return score + row.mean(-1) - 0.1 * row.sum(dim=0, keepdim=True).squeeze(0)
    return score_mod, None


def logsumexp_norm(table):
    def score_mod(score, b, h, q_idx, kv_idx):
        rows = table[q_idx % 5] - table[kv_idx % 5]
        return score + torch.logsumexp(rows, -1) - torch.linalg.vector_norm(rows)
    return score_mod, None


def argmax_bias(table):
    def score_mod(score, b, h, q_idx, kv_idx):
        best = table[kv_idx % 6].max(dim=-1)
        return score + best.values + 0.01 * table[q_idx % 6].argmax(-1)
    return score_mod, None


def broadcast_outer(a, c):
    """An outer broadcast (3, 1) x (1, 4) of two captured rows, summed over both dimensions."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + (a[q_idx].unsqueeze(-1) * c[kv_idx][None, :]).sum((0, 1)) * 0.1
    return score_mod, None


def wrapped_bias(table):
    return (lambda score, b, h, q_idx, kv_idx: score + table[q_idx - kv_idx] + table[h - 1]), None


CASES = [
    Case("negative_index_mask", mask_only(lambda b, h, q_idx, kv_idx: WRAP[q_idx - kv_idx] > 0), L=L, block=16),
    Case("negative_index_bias", wrapped_bias, (randn(L),), L=L),
    Case("searchsorted_documents", mask_only(document_ids), L=L, block=16),
    Case("searchsorted_many_documents", mask_only(many_documents), L=L, block=16),
    Case("searchsorted_jagged_rows", mask_only(jagged_rows), L=L, block=16),
    Case("bucketize_distance", mask_only(bucket_window), L=L, block=16),
    Case("unsqueeze_any_tile_sets", mask_only(tile_sets), L=L, block=16),
    Case("ne_all_topk", mask_only(topk_all_excluded), L=L, B=2, block=16),
    Case("isin_captured", mask_only(isin_heads), L=L, block=16),
    Case("stacked_bounds", mask_only(stacked_bounds), L=L, block=16),
    Case("dot_rope", rope_dot, (randn(2, L, 8, scale=0.3), randn(2, L, 8, scale=0.3)), L=L),
    Case("matmul_bilinear", matmul_bilinear, (randn(L, 4, scale=0.5), randn(4, 4, scale=0.5)), L=L),
    Case("einsum_pair", einsum_pair, (randn(L, 6, scale=0.4),), L=L),
    Case("amax_gate", amax_gate, (randn(2, 4),), L=L),
    Case("mean_and_sum", mean_and_sum, (randn(8, 5),), L=L),
    Case("logsumexp_norm", logsumexp_norm, (randn(5, 4),), L=L),
    Case("max_dim_argmax", argmax_bias, (randn(6, 5),), L=L),
    Case("broadcast_outer", broadcast_outer, (randn(L, 3), randn(L, 4)), L=L),
]

test_forward, test_block_mask, test_create_mask, test_gradients = make_case_tests(CASES)


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6), right=st.booleans(),
       causal=st.booleans(), block=st.sampled_from([16, 32, (16, 32)]))
def test_fuzz_searchsorted_documents(lengths, right, causal, block):
    """Random document lengths: create_mask and the BlockMask of a searchsorted document mask equal torch's."""
    offsets = torch.cumsum(torch.tensor([0] + lengths), 0)
    n = int(offsets[-1])

    def mask_mod(b, h, q_idx, kv_idx):
        same = torch.searchsorted(offsets, q_idx, right=right) == torch.searchsorted(offsets, kv_idx, right=right)
        return same & (q_idx >= kv_idx) if causal else same
    check_create_mask(mask_mod, 1, 1, n, n)
    check_block_mask(mask_mod, 1, 1, n, n, block)
