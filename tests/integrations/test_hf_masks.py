"""Block masks of transformers-style masks (flexattn.integrations.hf_masks) against dense evaluation."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexattn
from flexattn.block_mask import EMPTY, FULL
from flexattn.integrations import hf_masks


def _window(w):
    def mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - w)

    return mask


@settings(max_examples=25, deadline=None)
@given(q_len=st.integers(1, 70), past=st.integers(0, 60), window=st.integers(1, 80), pad=st.integers(0, 40),
       block=st.sampled_from([8, 16]), dense=st.booleans())
def test_tiles_are_sound_and_attention_matches_the_dense_mask(q_len, past, window, pad, block, dense):
    kv_len = past + q_len
    padding = torch.ones(2, kv_len, dtype=torch.bool)
    padding[1, :min(pad, kv_len - 1)] = False
    limit = hf_masks.DENSE_LIMIT
    hf_masks.DENSE_LIMIT = limit if dense else 0  # both builds: dense evaluation, symbolic + padding tiles
    try:
        bm = hf_masks.build_block_mask(_window(window), 2, q_len, kv_len, q_offset=past, padding=padding,
                                       block=(block, block))
    finally:
        hf_masks.DENSE_LIMIT = limit
    q_idx, kv_idx = torch.arange(q_len)[:, None] + past, torch.arange(kv_len)[None, :]
    allowed = ((kv_idx <= q_idx) & (kv_idx > q_idx - window))[None, None] & padding[:, None, None, :]
    exact = hf_masks.tile_classes_of(allowed, (block, block))
    classes = bm.tile_classes().expand_as(exact)
    assert torch.all((classes != EMPTY) | (exact == EMPTY)) and torch.all((classes != FULL) | (exact == FULL))
    if dense:
        assert torch.equal(classes, exact)
    assert torch.equal(flexattn.create_mask(bm.mask_mod, 2, 1, q_len, kv_len), allowed)
    q = torch.randn(2, 2, q_len, 8, dtype=torch.float64)
    k = torch.randn(2, 2, kv_len, 8, dtype=torch.float64)
    want = torch.where(allowed, (q @ k.transpose(-1, -2)) / 8 ** 0.5, float("-inf")).softmax(-1).nan_to_num() @ k
    torch.testing.assert_close(flexattn.flex_attention(q, k, k, block_mask=bm), want)


def test_lists_have_torchs_layout():
    classes = torch.tensor([[[[2, 1, 0, 1], [0, 0, 2, 2]]]], dtype=torch.int8)
    ours = hf_masks.block_mask_of_classes(classes, (4, 4), (8, 16), None)
    theirs = flexattn.BlockMask.from_tile_classes(classes, (4, 4), (8, 16))
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert torch.equal(ours.tile_classes(), classes)


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 40), st.integers(1, 300)),
       block=st.tuples(st.sampled_from([1, 4, 16]), st.sampled_from([4, 16, 128])), density=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_the_eager_builds_numpy_lists_equal_the_traceable_torch_ones(shape, block, density, seed):
    """The eager build counts and sorts in numpy (``_tile_classes_numpy``); the compiled one in torch."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.rand(shape, generator=generator) < density
    allowed[..., : shape[-1] // 3] = True  # some FULL tiles too
    classes = hf_masks.tile_classes_of(allowed, block)
    numpy_classes = hf_masks._tile_classes_numpy(allowed, block)
    assert torch.equal(torch.from_numpy(numpy_classes), classes)
    ours = hf_masks._block_mask_of_numpy_classes(numpy_classes, block, shape[2:], None, None, None)
    theirs = hf_masks.block_mask_of_classes(classes, block, shape[2:], None)
    for name in ours._TENSOR_ATTRS[:8]:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


@settings(max_examples=20, deadline=None)
@given(past=st.integers(1, 300), q_len=st.integers(1, 4), pad=st.integers(0, 40), heads=st.sampled_from([(2, 2), (4, 2)]),
       nan_pads=st.booleans())
def test_decoding_reads_the_positions_the_dense_build_kept_until_a_buffer_changes(past, q_len, pad, heads, nan_pads):
    kv_len = past + q_len
    padding = torch.ones(2, kv_len, dtype=torch.bool)
    padding[0, :min(pad, kv_len - 1)] = False
    bm = hf_masks.build_block_mask(_window(64), 2, q_len, kv_len, q_offset=past, padding=padding, block=(16, 16))
    traced = bm.traced_mask
    allowed = flexattn.create_mask(bm.mask_mod, 2, 1, q_len, kv_len)
    assert torch.equal(bm.attended_positions(traced.buffers), allowed)
    Hq, Hkv = heads
    q = torch.randn(2, Hq, q_len, 8, dtype=torch.float64)
    k, v = torch.randn(2, Hkv, kv_len, 8, dtype=torch.float64), torch.randn(2, Hkv, kv_len, 8, dtype=torch.float64)
    if nan_pads:  # keys no row reads may hold anything
        unread = ~allowed[:, 0].any(dim=1)
        k[unread[:, None].expand(2, Hkv, kv_len)] = float("nan")
        v[unread[:, None].expand(2, Hkv, kv_len)] = float("nan")

    def check(mask):
        ke, ve = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
        scores = torch.where(mask, (q @ ke.nan_to_num().transpose(-1, -2)) / 8 ** 0.5, float("-inf"))
        want = scores.softmax(-1).nan_to_num() @ ve.nan_to_num()
        out = flexattn.flex_attention(q, k, v, block_mask=bm, enable_gqa=Hq != Hkv, kernel_options={"PATH": "small_dense"})
        torch.testing.assert_close(out, want)

    check(allowed)
    # A captured tensor written in place: the kept positions no longer hold, the mask is evaluated again.
    padding_buffer = next(t for t in traced.buffers if t.dtype == torch.bool)
    padding_buffer[1, kv_len - 1] = False
    assert bm.attended_positions(traced.buffers) is None
    changed = allowed.clone()
    changed[1, :, :, kv_len - 1] = False
    # flex attention's meaning: FULL tiles stay whole, the mask_mod applies in PARTIAL ones
    classes = bm.tile_classes()[:, :, torch.arange(q_len) // 16][..., torch.arange(kv_len) // 16]
    check(torch.where(classes == FULL, allowed, changed))
