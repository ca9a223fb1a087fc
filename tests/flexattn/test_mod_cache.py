"""The trace and BlockMask caches are never stale: rebinding, in-place changes and value reads re-trace."""

import torch

import flexattn
from flexattn import mod_cache

WINDOW = 3


def _window_mask(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx < WINDOW) & (q_idx >= kv_idx)


def _dense(fn, n=8):
    return flexattn.create_mask(fn, 1, 1, n, n)[0, 0]


def _expected_window(w, n=8):
    q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (q - kv < w) & (q >= kv)


def test_a_rebound_closure_variable_is_traced_again():
    window = 2

    def mask(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx < window) & (q_idx >= kv_idx)

    assert torch.equal(_dense(mask), _expected_window(2))
    window = 5
    assert torch.equal(_dense(mask), _expected_window(5))


def test_a_reassigned_global_is_traced_again():
    global WINDOW
    assert torch.equal(_dense(_window_mask), _expected_window(3))
    WINDOW = 6
    try:
        assert torch.equal(_dense(_window_mask), _expected_window(6))
    finally:
        WINDOW = 3


def _biased(bias):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx, kv_idx]

    return score_mod


def test_new_tensors_of_the_same_shape_reuse_the_trace_with_their_values():
    first, second = torch.randn(8, 8), torch.randn(8, 8)
    a, b = flexattn.trace_score_mod(_biased(first)), flexattn.trace_score_mod(_biased(second))
    assert a.graph is b.graph  # one trace
    assert a.buffers[0] is first and b.buffers[0] is second
    q = torch.randn(1, 1, 8, 4)
    for bias in (first, second):
        want = flexattn.flex_attention(q, q, q, score_mod=_biased(bias), backend="reference")
        got = flexattn.flex_attention(q, q, q, score_mod=_biased(bias))
        torch.testing.assert_close(got, want)
        scores = (q @ q.transpose(-1, -2)) / 2 + bias
        torch.testing.assert_close(got, scores.softmax(-1) @ q)


def test_a_tensor_changed_in_place_is_read_fresh():
    bias = torch.zeros(8, 8)
    mod = _biased(bias)
    q = torch.randn(1, 1, 8, 4)
    before = flexattn.flex_attention(q, q, q, score_mod=mod)
    bias[:, :4] = -1e9
    after = flexattn.flex_attention(q, q, q, score_mod=mod)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ((q @ q.transpose(-1, -2)) / 2 + bias).softmax(-1) @ q)


def test_a_value_read_into_the_trace_pins_it_to_that_tensor_and_version():
    limit = torch.tensor(2)

    def mask(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < int(limit)  # the value becomes a constant of the trace

    assert torch.equal(_dense(mask), torch.arange(8)[:, None] - torch.arange(8)[None, :] < 2)
    limit.fill_(4)
    assert torch.equal(_dense(mask), torch.arange(8)[:, None] - torch.arange(8)[None, :] < 4)
    limit = torch.tensor(1)  # another tensor with the same shape
    assert torch.equal(_dense(mask), torch.arange(8)[:, None] - torch.arange(8)[None, :] < 1)


class _Holder:
    def __init__(self):
        self.w = 2

    def mask(self, b, h, q_idx, kv_idx):
        return (q_idx - kv_idx < self.w) & (q_idx >= kv_idx)


def test_bound_methods_are_not_cached():
    holder = _Holder()
    assert mod_cache.fingerprint(holder.mask) is None
    assert torch.equal(_dense(holder.mask), _expected_window(2))
    holder.w = 4
    assert torch.equal(_dense(holder.mask), _expected_window(4))


def _padded(padding):
    def mask(b, h, q_idx, kv_idx):
        return padding[b, kv_idx] & (q_idx >= kv_idx)

    return mask


def test_block_masks_are_reused_for_equal_values_and_rebuilt_for_changed_ones():
    padding = torch.ones(2, 256, dtype=torch.bool)
    padding[0, :130] = False
    first = flexattn.create_block_mask(_padded(padding), 2, None, 256, 256)
    again = flexattn.create_block_mask(_padded(padding.clone()), 2, None, 256, 256)
    assert again.kv_num_blocks is first.kv_num_blocks  # reused
    assert again.mask_mod is not first.mask_mod  # with this call's mask_mod (and so its tensors)
    q = torch.randn(2, 1, 256, 8)
    torch.testing.assert_close(flexattn.flex_attention(q, q, q, block_mask=again),
                               flexattn.flex_attention(q, q, q, block_mask=first))
    padding[0, :] = True
    changed = flexattn.create_block_mask(_padded(padding), 2, None, 256, 256)
    fresh = flexattn.create_block_mask(lambda b, h, q, kv: q >= kv, 2, None, 256, 256)
    assert torch.equal(changed.to_dense(), fresh.to_dense().expand_as(changed.to_dense()))
    assert not torch.equal(changed.to_dense(), first.to_dense())


def _two(first, second):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + first[q_idx, kv_idx] - second[q_idx, kv_idx]

    return score_mod


def test_one_tensor_in_two_cells_is_not_confused_with_two_tensors():
    shared, other = torch.randn(8, 8), torch.randn(8, 8)
    q = torch.randn(1, 1, 8, 4)
    flexattn.flex_attention(q, q, q, score_mod=_two(shared, shared))  # one buffer in this trace
    got = flexattn.flex_attention(q, q, q, score_mod=_two(shared, other))
    want = flexattn.flex_attention(q, q, q, score_mod=_two(shared, other), backend="reference")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, ((q @ q.transpose(-1, -2)) / 2 + shared - other).softmax(-1) @ q)
