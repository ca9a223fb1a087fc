"""attn-gym's mask_mod and score_mod generators, run unchanged through flexattn and torch.

Each case is checked four ways (see ``conformance_helpers.make_case_tests``): the forward
output and LSE against torch's eager flex_attention, the BlockMask structure and
``create_mask`` against torch's, and the gradients (q, k, v and any learnable table the
score_mod reads) against a dense float64 reference. A few variants attn-gym does not ship
(relative position bias, T5 buckets, attention sinks) are written here in our own words.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import noop_mask

from conformance_helpers import Case, make_case_tests

masks = pytest.importorskip("attn_gym.masks")
mods = pytest.importorskip("attn_gym.mods")
from attn_gym.masks.document_mask import length_to_offsets  # noqa: E402

G = torch.Generator().manual_seed(1234)
OFFSETS = length_to_offsets([30, 57, 3, 70], "cpu")  # 160 tokens in four documents
IS_GLOBAL = torch.zeros(160, dtype=torch.bool)
IS_GLOBAL[[0, 33, 100]] = True
INTERVALS = torch.tensor([[0, 50], [20, 90], [90, 120]], dtype=torch.int32)  # text rows seeing each image
PARENTS = [-1] + [int(torch.randint(0, i, (), generator=G)) for i in range(1, 40)]
TOPK = torch.stack([torch.randperm(8, generator=G)[:3] for _ in range(2 * 2 * 8)]).view(2, 2, 8, 3)
TILE_SIZES = torch.tensor([16, 16, 9, 16, 16, 16, 5, 16], dtype=torch.int32)
ADJACENCY = torch.rand(2, 96, 96, generator=G) < 0.03
EDGE_TYPES = torch.randint(0, 5, (2, 96, 96), generator=G)


def mask_only(mask_mod):
    return lambda: (None, mask_mod)


def with_causal(score_mod):
    return lambda *params: (score_mod(*params), masks.causal_mask)


def relative_position(table):
    """A learnable bias per head and signed distance (T5/Swin style, without buckets)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + 159]
    return score_mod


def t5_buckets(table, num_buckets=16, max_distance=64):
    """T5's bidirectional log buckets: exact for small distances, logarithmic beyond."""
    half = num_buckets // 2
    exact = half // 2

    def score_mod(score, b, h, q_idx, kv_idx):
        rel = kv_idx - q_idx
        bucket = (rel > 0).to(torch.int64) * half
        dist = torch.abs(rel)
        far = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                       * (half - exact)).to(torch.int64)
        far = torch.minimum(far, torch.full_like(far, half - 1))
        bucket = bucket + torch.where(dist < exact, dist, far)
        return score + table[h, bucket]
    return score_mod


def sinks(n_sinks=4, window=24):
    """StreamingLLM: a causal sliding window plus the first few tokens, always visible."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx - kv_idx <= window) | (kv_idx < n_sinks))
    return mask_mod


def spatial_bias(table):
    return mods.generate_graphormer_spatial_bias(table, mods.shortest_path_distances(ADJACENCY, 4))


def edge_bias(table):
    types, lengths = mods.shortest_path_edge_types(ADJACENCY, EDGE_TYPES, 3)
    return mods.generate_graphormer_edge_bias(table, types, lengths)


def mla_rope(query_rope, key_rope):
    """DeepSeek's MLA positional term: a dot product of per-position RoPE vectors (both learnable, so
    the float64 reference gets both in float64, as torch.dot requires one dtype)."""
    return mods.generate_mla_rope_score_mod(query_rope, key_rope, num_heads=2)


def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


CASES = [
    Case("causal", mask_only(masks.causal_mask), L=160),
    Case("sliding_window", mask_only(masks.generate_sliding_window(40)), L=160),
    Case("prefix_lm", mask_only(masks.generate_prefix_lm_mask(37)), L=160),
    Case("document_causal", mask_only(masks.generate_doc_mask_mod(masks.causal_mask, OFFSETS)), L=160),
    Case("document_full", mask_only(masks.generate_doc_mask_mod(noop_mask, OFFSETS)), L=160),
    Case("packed_causal_document", mask_only(masks.generate_packed_causal_doc_mask_mod(OFFSETS)), L=160),
    Case("natten", mask_only(masks.generate_natten(16, 12, 5, 3)), L=192),
    Case("tiled_natten", mask_only(masks.generate_tiled_natten(16, 12, 5, 3, 4, 4)), L=192),
    Case("morton_natten", mask_only(masks.generate_morton_natten(16, 16, 5, 5)), L=256, block=64),
    Case("dilated_sliding_window", mask_only(masks.generate_dilated_sliding_window(24, 3)), L=150),
    Case("global_sliding_window", mask_only(masks.generate_global_sliding_window(8, IS_GLOBAL)), L=160),
    Case("shared_prefix", mask_only(masks.generate_shared_prefix_mask_mod(
        OFFSETS, torch.tensor([0, 0, 2, 2], dtype=torch.int32))), L=160),
    Case("block_diffusion", mask_only(masks.generate_block_diffusion_mask(80, 16)), L=160),
    Case("batchify_causal", mask_only(masks.batchify_mask_mod(masks.causal_mask, 40)), L=160),
    Case("flamingo_cross_attention", mask_only(masks.generate_vision_cross_attention_mask_mod(INTERVALS, 20)),
         L=120, S=60),
    Case("jetspec_tree", mask_only(masks.generate_jetspec_tree_causal_mask_mod(
        60, masks.build_tree_ancestor_matrix(PARENTS, device="cpu"))), L=40, S=100, block=16),
    Case("jetspec_training", mask_only(masks.generate_jetspec_training_mask_mod(50, 10)), L=80, S=130),
    Case("sta_2d", mask_only(masks.generate_sta_mask_mod_2d((12, 16), (6, 8), (3, 4), text_seq_len=20)), L=212),
    Case("svg_spatial", mask_only(masks.generate_spatial_head_mask_mod(10, 6, 30, 2, True, 16)), L=190),
    Case("svg_temporal", mask_only(masks.generate_temporal_head_mask_mod(10, 6, 30, 2)), L=190),
    Case("vsa_topk", mask_only(masks.generate_vsa_mask_mod(TOPK, 16)), L=128, block=16),
    Case("vsa_topk_padded", mask_only(masks.generate_vsa_mask_mod(TOPK, 16, TILE_SIZES)), L=128, block=16),
    Case("sinks", mask_only(sinks()), L=160),
    Case("alibi", with_causal(lambda: mods.generate_alibi_bias(4)), H=4, L=96),
    Case("tanh_softcap", lambda: (mods.generate_tanh_softcap(20), None), L=96),
    Case("tanh_softcap_approx", lambda: (mods.generate_tanh_softcap(20, approx=True), None), L=96),
    Case("activation_gelu", lambda: (mods.generate_activation_score_mod(F.gelu), None), L=96),
    Case("activation_relu", lambda: (mods.generate_activation_score_mod(torch.relu), None), L=96),
    Case("activation_sigmoid", lambda: (mods.generate_activation_score_mod(torch.sigmoid), None), L=96),
    Case("sandwich", with_causal(lambda: mods.generate_sandwich_bias(2, 128)), L=128),
    Case("graphormer_spatial", lambda t: (spatial_bias(t), None), (randn(2, 6),), L=96),
    Case("graphormer_edge", lambda t: (edge_bias(t), None), (randn(2, 3, 5),), L=96),
    Case("mla_rope", lambda r, k: (mla_rope(r, k), None), (randn(2, 2, 128, 8, scale=0.3), randn(2, 1, 128, 8)),
         L=128),
    Case("relative_position", lambda t: (relative_position(t), masks.causal_mask), (randn(2, 319),), L=160),
    Case("t5_buckets", lambda t: (t5_buckets(t), None), (randn(2, 16),), L=160),
]

test_forward, test_block_mask, test_create_mask, test_gradients = make_case_tests(CASES)
