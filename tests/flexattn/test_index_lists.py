"""torch's block index lists from runs: equal to the stable-argsort definition."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexattn.index_lists import ordered_lists, ordered_to_dense, transpose_ordered


def _by_argsort(selected: torch.Tensor):
    """torch's definition: selected columns first, both groups ascending (stable descending sort)."""
    num = selected.sum(-1, dtype=torch.int32)
    indices = torch.argsort(selected.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, indices


@settings(max_examples=150, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), rows=st.integers(1, 9), cols=st.integers(1, 40),
       density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), seed=st.integers(0, 2**16))
def test_lists_equal_the_argsort_definition(lead, rows, cols, density, seed):
    g = torch.Generator().manual_seed(seed)
    codes = (torch.rand(*lead, rows, cols, generator=g) * 3 * density).floor().to(torch.int8)
    for code, (num, indices) in zip((0, 1, 2), ordered_lists(codes, (0, 1, 2))):
        expected_num, expected_indices = _by_argsort(codes == code)
        assert torch.equal(num, expected_num) and torch.equal(indices, expected_indices)
        assert torch.equal(ordered_to_dense(num, indices, cols).bool(), codes == code)
    for code, (num, indices) in zip((0, 1, 2), ordered_lists(codes, (0, 1, 2), transposed=True)):
        expected_num, expected_indices = _by_argsort(codes.transpose(-2, -1) == code)
        assert torch.equal(num, expected_num) and torch.equal(indices, expected_indices)


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_transpose_equals_lists_of_the_transposed_matrix(rows, cols, seed):
    dense = torch.rand(2, rows, cols, generator=torch.Generator().manual_seed(seed)) < 0.4
    num, indices = ordered_lists(dense.to(torch.int8), (1,))[0]
    assert torch.equal(transpose_ordered(num, indices)[1], _by_argsort(dense.transpose(-2, -1))[1])
