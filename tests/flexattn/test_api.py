"""flex_attention / create_mask input validation: clear ValueErrors, never deep torch tracebacks."""

import pytest
import torch

import flexattn
from flexattn import BlockMaskError, InputError


def _qkv(B=1, Hq=2, Hkv=2, L=16, S=16, E=8, Ev=8, dtype=torch.float32):
    return torch.randn(B, Hq, L, E, dtype=dtype), torch.randn(B, Hkv, S, E, dtype=dtype), torch.randn(B, Hkv, S, Ev, dtype=dtype)


@pytest.mark.parametrize("make,message", [
    (lambda: (torch.randn(2, 16, 8),) + _qkv()[1:], "query must be 4-D"),
    (lambda: (_qkv()[0], torch.randn(2, 2, 16, 8), _qkv()[2]), "batch sizes differ"),
    (lambda: (_qkv()[0], torch.randn(1, 2, 20, 8), _qkv()[2]), "key and value lengths differ"),
    (lambda: (_qkv()[0], torch.randn(1, 2, 16, 4), _qkv()[2]), "head dims differ"),
    (lambda: _qkv(Hq=4, Hkv=2), "enable_gqa=True"),
    (lambda: (_qkv()[0], torch.randn(1, 2, 16, 0), torch.randn(1, 2, 16, 8)), "head dim 0"),
    (lambda: _qkv(L=0), "empty sequence"),
    (lambda: (_qkv()[0].long(),) + _qkv()[1:], "floating-point"),
])
def test_bad_inputs_raise_input_error(make, message):
    with pytest.raises(InputError, match=message):
        flexattn.flex_attention(*make())


def test_gqa_heads_must_divide():
    with pytest.raises(InputError, match="multiple of the key/value heads"):
        flexattn.flex_attention(*_qkv(Hq=3, Hkv=2), enable_gqa=True)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError) and issubclass(InputError, flexattn.FlexAttnError)


def test_block_mask_for_other_lengths_is_rejected():
    bm = flexattn.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 32, 32, BLOCK_SIZE=16)
    with pytest.raises(BlockMaskError, match=r"block_mask was created for .*\(1, 1, 32, 32\).*_adjust"):
        flexattn.flex_attention(*_qkv(), block_mask=bm)


def test_return_lse_and_return_aux_together_is_rejected():
    with pytest.raises(InputError, match="either return_lse or return_aux"):
        flexattn.flex_attention(*_qkv(), return_lse=True, return_aux=flexattn.AuxRequest(lse=True))


def test_unknown_backend_is_rejected():
    with pytest.raises(InputError, match="unknown backend"):
        flexattn.flex_attention(*_qkv(), backend="cuda-magic")


@pytest.mark.parametrize("sizes", [(1, 1, 0, 4), (1, 1, 4, -1), (0, 1, 4, 4)])
def test_create_mask_rejects_non_positive_sizes(sizes):
    with pytest.raises(InputError, match="must be a positive int"):
        flexattn.create_mask(lambda b, h, q, kv: q >= kv, *sizes)


def test_create_mask_of_a_score_mod_marks_minus_inf():
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score, -float("inf"))

    mask = flexattn.create_mask(score_mod, None, None, 4, 4)
    assert torch.equal(mask[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())


def test_mask_combinators():
    causal = lambda b, h, q, kv: q >= kv  # noqa: E731
    window = lambda b, h, q, kv: q - kv <= 2  # noqa: E731
    both = flexattn.create_mask(flexattn.and_masks(causal, window), 1, 1, 8, 8)
    either = flexattn.create_mask(flexattn.or_masks(causal, window), 1, 1, 8, 8)
    c, w = flexattn.create_mask(causal, 1, 1, 8, 8), flexattn.create_mask(window, 1, 1, 8, 8)
    assert torch.equal(both, c & w) and torch.equal(either, c | w)
    assert flexattn.create_mask(flexattn.noop_mask, 1, 1, 3, 5).all()
    assert flexattn.create_mask(flexattn.and_masks(), 1, 1, 3, 5).all()  # as torch's: keeps everything
    assert not flexattn.create_mask(flexattn.or_masks(), 1, 1, 3, 5).any()  # keeps nothing
    with pytest.raises(TypeError):
        flexattn.and_masks(3)


def test_block_mask_to_string_draws_tiles():
    bm = flexattn.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 64, 64, BLOCK_SIZE=16)
    assert bm.tile_string().splitlines()[1:] == ["░░      ", "██░░    ", "████░░  ", "██████░░"]
