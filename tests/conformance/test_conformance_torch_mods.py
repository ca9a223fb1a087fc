"""The score_mods and mask_mods of torch's own flex-attention tests, run through flexattn and torch.

They follow test/inductor/test_flex_attention.py: its ``test_score_mods`` list, the captured
buffer and indexing tests (``index_weird*``, ``load_from_bias_*``, ``njt_causal``, ...), and
the ``TestLearnableBiases`` tables whose gradients are checked. Each case gets the four
checks of ``conformance_helpers.make_case_tests`` (forward + LSE and ``create_mask`` and the
BlockMask against torch, gradients against a float64 reference). Sizes are small (L, S up
to ~200) so the file runs in seconds.
"""

import functools

import torch
from torch.nn.attention.flex_attention import _identity

from conformance_helpers import Case, make_case_tests

G = torch.Generator().manual_seed(7)
B, H, S = 2, 4, 128


def randn(*shape):
    return torch.randn(*shape, generator=G)


def _times_two(score, b, h, m, n):
    return score * 2


def _squared(score, b, h, m, n):
    return score * score


def _causal(score, b, h, token_q, token_kv):
    return torch.where(token_q >= token_kv, score, float("-inf"))


def _inverse_causal(score, b, h, m, n):
    return torch.where(m <= n, score, float("-inf"))


def _rel_bias(score, b, h, token_q, token_kv):
    return score + (token_q - token_kv)


def _rel_causal(score, b, h, token_q, token_kv):
    return torch.where(token_q >= token_kv, score + (token_q - token_kv), float("-inf"))


def _generate_alibi_bias(num_heads):
    def _alibi_bias(score, b, head, token_q, token_kv):
        scale = torch.exp2(-((head + 1) * 8.0 / num_heads))
        return score + (token_kv - token_q) * scale
    return _alibi_bias


def _trig(score, b, h, m, n):
    return torch.sin(torch.cos(score)) + torch.tan(b)


def _trig2(score, b, h, m, n):
    return torch.cos(score) * torch.sin(score) + torch.tan(b)


def _causal_mask(b, h, q, kv):
    return q >= kv


def _inverse_causal_mask(b, h, q, kv):
    return q <= kv


def score_only(score_mod, mask_mod=None):
    return lambda: (score_mod, mask_mod)


def additive(index):
    """A score_mod reading one learnable table at ``index(table, b, h, q, kv)``."""
    return lambda table: (lambda score, b, h, q, kv: score + index(table, b, h, q, kv), None)


DOC_ID = torch.arange(S) // 32
SEQ_IDX = torch.arange(S) >= S // 2
NUM_BIDIRECTIONAL = torch.tensor([17, 90], dtype=torch.int32)
SEQ_LEN = torch.tensor([1, 2], dtype=torch.int32)
OFFSETS = torch.tensor([0, 50, 75, S], dtype=torch.int32)
NJT_IDX = torch.repeat_interleave(torch.arange(3), OFFSETS.diff())
SCALE = torch.ones((), dtype=torch.int32)
WHICH = torch.tensor(0)
MEANS = randn(S, 3)
LENGTH_SCALES = torch.logspace(0.001, 0.1, H)
ATTN_MASK = torch.ones(B, 1, S, S, dtype=torch.bool).tril()
INDIRECT = torch.randint(0, S, (S,), generator=G)
DOC_MASKS = (torch.arange(S) >= 64).int().expand(B, S).clone()
SEQ_BLOCKS = torch.arange(150) // 40
INPUT_LENGTHS = torch.tensor([100, 40])
RAND_MASK = torch.rand(B, S, generator=G) < 0.5
CLAMP_DOCS = torch.repeat_interleave(torch.arange(5), torch.tensor([20, 3, 50, 40, 7]))  # 120 tokens


def document_masking_causal(score, b, h, q_idx, kv_idx):
    keep = (q_idx >= kv_idx) & (DOC_ID[q_idx] == DOC_ID[kv_idx])
    return torch.where(keep, score, -float("inf"))


def dependent_causal_bidirectional(score, b, h, q, kv):
    bidirectional = (q <= NUM_BIDIRECTIONAL[b]) & (kv <= NUM_BIDIRECTIONAL[b])
    return torch.where(bidirectional | (q >= kv), score, -float("inf"))


def natten_2d(score, b, h, q, kv):
    q_x, q_y = q / 16, q % 16  # torch's test divides with / (true division) on purpose
    kv_x, kv_y = kv / 16, kv % 16
    keep = ((q_x - kv_x).abs() <= 3) | ((q_y - kv_y).abs() <= 3)
    return torch.where(keep, score, float("-inf"))


def padded_dense_causal(qk, b, h, q, kv):
    return torch.where(qk <= SEQ_LEN[b], _causal(qk, b, h, q, kv), -float("inf"))


def njt_causal(qk, b, h, q, kv):
    return _causal(qk, b, h, q - OFFSETS[NJT_IDX[q]], kv - OFFSETS[NJT_IDX[kv]])


def composed(score, b, h, m, n):
    return _inverse_causal(_rel_bias(score, b, h, m, n), b, h, m, n)


def euclidean_dist_pos_embed(score, b, h, q_idx, k_idx):
    dist = (MEANS[q_idx] - MEANS[k_idx]).pow(2).sum(-1).sqrt()
    return torch.exp(-dist / LENGTH_SCALES[h]) * score


def new_zeros_score(score, b, h, q_idx, kv_idx):
    return score + ATTN_MASK[b, h.new_zeros(h.shape), q_idx, kv_idx]


def new_zeros_mask(b, h, q_idx, kv_idx):
    return ATTN_MASK[b, h.new_zeros(h.shape), q_idx, kv_idx]


def padding_mask(b, h, q_idx, kv_idx, input_lengths):
    return (q_idx < input_lengths[b]) & (kv_idx < input_lengths[b])


def all_bias(head_scale, batch_scale, tok_scale):
    def score_mod(score, batch, head, token_q, token_kv):
        return score + tok_scale[token_q] + batch_scale[batch] + head_scale[head]
    return score_mod, None


def distinct_biases(bias1, bias2):
    return (lambda score, b, h, q_idx, kv_idx: score + bias1[q_idx] + bias2[kv_idx]), None


def head_gate(gate):
    return (lambda score, b, h, q_idx, kv_idx: score * torch.sigmoid(gate[h].to(torch.float32))), None


def head_offset(offsets):
    return (lambda score, b, h, m, n: score * offsets[h]), None


def multiplicative(bias):
    return (lambda score, b, h, q_idx, kv_idx: score * bias[q_idx]), None


def local_window(bias, window=8):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[torch.clamp(q_idx - kv_idx + window, 0, 2 * window)]
    return score_mod, None


def offsets_qkv(offset_q, offset_kv):
    return (lambda score, b, h, q, kv: score + offset_q[q] + offset_kv[kv]), _causal_mask


SCORE_MODS = [
    Case("identity", score_only(_identity)),
    Case("times_two", score_only(_times_two)),
    Case("squared", score_only(_squared)),
    Case("causal", score_only(_causal, _causal_mask)),
    Case("inverse_causal", score_only(_inverse_causal, _inverse_causal_mask)),
    Case("rel_bias", score_only(_rel_bias)),
    Case("rel_causal", score_only(_rel_causal, _causal_mask)),
    Case("alibi_8", score_only(_generate_alibi_bias(8)), H=H),
    Case("trig", score_only(_trig)),
    Case("trig2", score_only(_trig2)),
    Case("silu", score_only(lambda score, b, h, q, kv: torch.nn.functional.silu(score))),
    Case("captured_int_scale", score_only(lambda qk, b, h, q, kv: qk + SCALE)),
    Case("skip_odd_keys", score_only(lambda score, b, h, q, kv: torch.where(kv % 2 == 0, score, float("-inf")))),
    Case("composition", score_only(composed)),
    Case("subgraph_floordiv", score_only(lambda score, b, h, q, kv: score - q // (1 + kv))),
    Case("doc_mask_sparse", score_only(document_masking_causal), L=S),
    Case("seq_masking", score_only(lambda score, b, h, q, kv: torch.where(SEQ_IDX[q] == SEQ_IDX[kv], score,
                                                                         float("-inf"))), L=S),
    Case("dependent_causal_bidirectional", score_only(dependent_causal_bidirectional), L=S),
    Case("natten_2d_true_division", score_only(natten_2d), L=S),
    Case("padded_dense_causal", score_only(padded_dense_causal)),
    Case("njt_causal", score_only(njt_causal), L=S),
    Case("reduction_unrolled", score_only(euclidean_dist_pos_embed), H=H, L=S),
    Case("new_zeros_index", lambda: (new_zeros_score, new_zeros_mask), H=1, L=S),
    Case("head_offset", head_offset, (torch.rand(H, generator=G),), H=H),
    Case("captured_buffers_all_dims", all_bias, (randn(H), randn(B), randn(S)), H=H, L=S),
    Case("index_multiple", additive(lambda t, b, h, q, kv: t[b][q]), (randn(B, S),), L=S),
    Case("index_weird1", additive(lambda t, b, h, q, kv: t[0][b, h][q]), (randn(4, B, H, S),), H=H, L=S),
    Case("index_weird2", additive(lambda t, b, h, q, kv: t[b][h][WHICH, q]), (randn(B, H, 4, S),), H=H, L=S),
    Case("bias_seq_only", additive(lambda t, b, h, q, kv: t[q, kv]), (randn(S, S),), L=S),
    Case("bias_seq_batch", additive(lambda t, b, h, q, kv: t[b, q, kv]), (randn(B, S, S),), L=S),
    Case("bias_head_seq_batch", additive(lambda t, b, h, q, kv: t[b, h, q, kv]), (randn(B, H, S, S),), H=H, L=S),
    Case("rel_bias_table", additive(lambda t, b, h, q, kv: t[(q - kv) + S]), (randn(2 * S),), L=S),
    Case("relative_1d_abs", additive(lambda t, b, h, q, kv: t[torch.abs(q - kv)]), (randn(2 * S),), L=S),
    Case("rel_pos_1d_sum", additive(lambda t, b, h, q, kv: t[q + kv]), (randn(2 * S),), L=S),
    Case("rel_pos_2d_index_multiple", additive(lambda t, b, h, q, kv: t[q][kv]), (randn(S, S),), L=S),
    Case("flipped_indexed", additive(lambda t, b, h, q, kv: t[kv, q]), (randn(S, S),), L=S),
    Case("rel_pos_3d_transposed", additive(lambda t, b, h, q, kv: t[h, kv, q]), (randn(H, S, S),), H=H, L=S),
    Case("global_tokens", additive(lambda t, b, h, q, kv: t[kv]), (randn(S),), L=S),
    Case("weird_bias", additive(lambda t, b, h, q, kv: t[b, h, WHICH, q]), (randn(B, H, 4, S),), H=H, L=S),
    Case("indirect_bias", additive(lambda t, b, h, q, kv: t[INDIRECT[q]]), (randn(S),), L=S),
    Case("symmetric_bias", additive(lambda t, b, h, q, kv: t[q] + t[kv]), (randn(S),), L=S),
    Case("multiplicative_bias", multiplicative, (randn(S),), L=S),
    Case("local_window_bias", local_window, (randn(17),), L=S),
    Case("head_specific_gate", head_gate, (randn(H),), H=H),
    Case("distinct_biases", distinct_biases, (randn(S), randn(S)), L=S),
    Case("non_divisible_captured", offsets_qkv, (randn(151), randn(151)), L=151),
    Case("non_divisible_multiplier", multiplicative, (randn(131),), L=131),
    Case("block_mask_non_divisible", lambda: (None, lambda b, h, q, kv: SEQ_BLOCKS[q] == SEQ_BLOCKS[kv]), L=150),
    Case("document_masking_edge_case", lambda: (None, lambda b, h, q, kv: DOC_MASKS[b, q] == DOC_MASKS[b, kv]),
         H=1, L=S),
    Case("doc_mask_clamped", lambda: (None, lambda b, h, q, kv: CLAMP_DOCS[q.clamp(0, 119)] == CLAMP_DOCS[
        kv.clamp(0, 119)]), L=120),
    Case("free_symbol_rand_mask", lambda: (None, lambda b, h, q_idx, kv_idx: ~RAND_MASK[b, q_idx]), L=S, H=1),
    Case("partial_mask_mod", lambda: (None, functools.partial(padding_mask, input_lengths=INPUT_LENGTHS)),
         L=S, H=1),
]

test_forward, test_block_mask, test_create_mask, test_gradients = make_case_tests(SCORE_MODS)
