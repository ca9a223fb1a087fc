"""Tensor-valued traced values (flexattn.vectors, flexattn.reductions): results equal torch's
create_mask (torch's vmap is the oracle), and what cannot be unrolled is a TraceError at the user's line."""

import inspect

import pytest
import torch
from torch.nn.attention import flex_attention as tfa

import flexattn
from flexattn import TraceError, trace_mask_mod, trace_score_mod
from flexattn.vectors import MAX_ELEMENTS

G = torch.Generator().manual_seed(3)
TABLE = torch.randint(-5, 9, (2, 6, 5), generator=G)
FLOATS = torch.randn(40, 3, generator=G)
SORTED = torch.tensor([3, 9, 9, 20, 31])
ORDER = torch.randperm(5, generator=G)
SHUFFLED = SORTED.clone()
SHUFFLED[ORDER] = SORTED.clone()
BIG = torch.arange(4 * (MAX_ELEMENTS + 1)).view(4, MAX_ELEMENTS + 1)


def same_as_torch(mod, B=2, H=2, L=40, S=40):
    got = flexattn.create_mask(mod, B, H, L, S)
    want = tfa.create_mask(mod, B, H, L, S, device="cpu")
    assert torch.equal(got, want), f"{int((got != want).sum())} entries differ from torch's create_mask"


MODS = {
    "negative_constant_index": lambda b, h, q, kv: TABLE[b, -1, q % 5] <= kv % 9,
    "computed_vector_traced_index": lambda b, h, q, kv: (TABLE[b] * 2)[q % 6, kv % 5] > 3,
    "slices_and_none": lambda b, h, q, kv: (TABLE[b, 1:4, None, kv % 5] > q % 7).sum((0, 1)) >= 2,
    "ellipsis_last": lambda b, h, q, kv: TABLE[b][..., q % 5].amax() >= kv % 10,
    "tensor_index": lambda b, h, q, kv: TABLE[b, torch.stack([q % 6, kv % 6]), 0].prod() > 0,
    "torch_max_of_two": lambda b, h, q, kv: torch.max(q, kv) - torch.min(q, kv) < 9,
    "sorter": lambda b, h, q, kv: torch.searchsorted(SHUFFLED, q, sorter=ORDER) == torch.searchsorted(SORTED, kv),
    "out_int32": lambda b, h, q, kv: torch.bucketize(q, SORTED, out_int32=True, right=True) >= (kv // 8),
    "float_searchsorted": lambda b, h, q, kv: torch.searchsorted(FLOATS[:, 0].sort().values, q * 0.05 - 1) < kv,
    "count_nonzero_flip": lambda b, h, q, kv: torch.count_nonzero(TABLE[b].flip(0)[q % 6] > 0) > kv % 4,
    "iterate_rows": lambda b, h, q, kv: sum(row[kv % 5] for row in TABLE[b]) > q % 11,
    "argmin_all": lambda b, h, q, kv: TABLE[b, h].argmin() == (q + kv) % 30,
}


@pytest.mark.parametrize("name", MODS)
def test_tensor_values_equal_torch(name):
    same_as_torch(MODS[name])


def test_score_mod_vector_reductions_equal_torch():
    def score_mod(score, b, h, q, kv):
        rows = FLOATS[q] * FLOATS[kv]
        return score + rows.sum() + rows.amin(-1) - torch.norm(FLOATS[q] - FLOATS[kv], p=1)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=G) for _ in range(3))
    got = flexattn.flex_attention(q, k, v, score_mod=score_mod)
    want = tfa.flex_attention(q, k, v, score_mod=score_mod)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _expect(fn, tracer, needle: str, *words: str):
    with pytest.raises(TraceError) as info:
        tracer(fn)
    lines, start = inspect.getsourcelines(fn)
    line = start + next(i for i, text in enumerate(lines) if needle in text)
    message = str(info.value)
    assert f"{__file__}:{line}" in message, message
    for word in words:
        assert word in message, message


def test_too_large_a_vector_names_the_line_and_the_fix():
    def mask_mod(b, h, q_idx, kv_idx):
        row = BIG[b]
        return (row == kv_idx).any()
    _expect(mask_mod, trace_mask_mod, "(row == kv_idx)", f"at most {MAX_ELEMENTS}", "captured")


def test_a_row_of_any_length_is_searched_without_unrolling():
    def mask_mod(b, h, q_idx, kv_idx):
        return torch.searchsorted(BIG[b], q_idx) == torch.searchsorted(BIG[b], kv_idx)
    same_as_torch(mask_mod, B=4, H=1, L=70, S=70)


def test_refusals_name_the_line():
    def mean_of_ints(score, b, h, q_idx, kv_idx):
        return score + TABLE[b, h].mean()
    _expect(mean_of_ints, trace_score_mod, ".mean()", "floating point", ".float()")

    def two_dimensional_sequence(b, h, q_idx, kv_idx):
        return torch.searchsorted(TABLE[0], q_idx) > 0
    _expect(two_dimensional_sequence, trace_mask_mod, "torch.searchsorted", "1-D sorted sequence", "offsets[b]")

    def dot_of_mismatched(score, b, h, q_idx, kv_idx):
        return score + torch.dot(FLOATS[q_idx], FLOATS[0, :2])
    _expect(dot_of_mismatched, trace_score_mod, "torch.dot", "two 1-D tensors of one length")

    def out_of_bounds(b, h, q_idx, kv_idx):
        return TABLE[b, 7, 0] > q_idx
    _expect(out_of_bounds, trace_mask_mod, "TABLE[b, 7, 0]", "out of bounds")
