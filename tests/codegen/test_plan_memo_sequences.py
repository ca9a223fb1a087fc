"""Random sequences of calls on shared BlockMasks and mods, with captured tensors and tile lists
changed in place between calls: every call of the torch back end (auto and each forced path that
takes it) equals the dense reference computed fresh. Guards the plans kept between calls
(``flexattn.memo``, ``BlockMask.derived``, the fused plans kept by tile classes) against serving a
plan made for other values."""

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexattn
from flexattn.errors import InputError

B, HQ, HKV, D = 2, 4, 2, 8
AUX = flexattn.AuxRequest(lse=True)
PATHS = (None, "fused_tiles", "fused_documents", "generated_loop", "decode_chunks", "small_dense")


def _world(L: int, S: int, block: int):
    """Mask mods over tensors the sequence changes in place, and score_mods likewise."""
    t = {"docs": torch.tensor([0] * (S // 2) + [1] * (S - S // 2)),
         "lengths": torch.tensor([S, S - 5]),
         "windows": torch.tensor([4, 9, 17, 40]),
         "slopes": torch.tensor([0.5, 0.25, 0.125, 1.0])}
    offset = S - L
    masks = {
        "causal_padding": lambda b, h, q, kv: (q + offset >= kv) & (kv < t["lengths"][b]),
        "documents": lambda b, h, q, kv: (t["docs"][q + offset] == t["docs"][kv]) & (q + offset >= kv),
        "per_head_window": lambda b, h, q, kv: (q + offset >= kv) & (q + offset - kv <= t["windows"][h]),
    }
    scores = {
        None: None,
        "alibi": lambda s, b, h, q, kv: s + t["slopes"][h] * (kv - q - offset),
        "softcap": lambda s, b, h, q, kv: 5.0 * torch.tanh(s / 5.0),
    }
    built = {name: flexattn.create_block_mask(mod, B, HQ, L, S, BLOCK_SIZE=block) for name, mod in masks.items()}
    return t, masks, scores, built


def _step(draw_op, state):
    t, masks, scores, built, qkv = state
    kind = draw_op[0]
    if kind == "mutate":
        name = draw_op[1]
        if name == "boundary":  # documents stay runs: the fused documents plan may still take them
            docs = t["docs"]
            docs.copy_((torch.arange(len(docs)) >= len(docs) // 2 + 16).long())
        else:
            x = t[name]
            x.copy_(torch.roll(x, 1) if name != "slopes" else x * 2)
        return
    if kind == "lists":
        bm = built[draw_op[1]]
        if bm.full_kv_num_blocks is not None:
            bm.full_kv_num_blocks[..., -1:] = 0  # the last row skips its FULL tiles now
        return
    if kind == "rebuild":
        name = draw_op[1]
        L, S = qkv[0].shape[-2], qkv[1].shape[-2]
        built[name] = flexattn.create_block_mask(masks[name], B, HQ, L, S, BLOCK_SIZE=built[name].BLOCK_SIZE[0])
        return
    _, mask_name, score_name, path = draw_op
    q, k, v = qkv
    kwargs = dict(block_mask=built[mask_name], score_mod=scores[score_name], enable_gqa=True)
    ref = flexattn.flex_attention(q, k, v, backend="reference", return_aux=AUX, **kwargs)
    try:
        out = flexattn.flex_attention(q, k, v, backend="torch", return_aux=AUX,
                                      kernel_options={"PATH": path} if path else None, **kwargs)
    except InputError as error:  # a forced path that cannot serve this call says so
        assert path is not None and "cannot serve" in str(error)
        return
    torch.testing.assert_close(out[0], ref[0], atol=2e-5, rtol=2e-5)
    finite = ref[1].lse.isfinite()
    assert torch.equal(finite, out[1].lse.isfinite())
    torch.testing.assert_close(out[1].lse[finite], ref[1].lse[finite], atol=2e-5, rtol=2e-5)


_MASKS = st.sampled_from(["causal_padding", "documents", "per_head_window"])
_OPS = st.one_of(
    st.tuples(st.just("call"), _MASKS, st.sampled_from([None, "alibi", "softcap"]), st.sampled_from(PATHS)),
    st.tuples(st.just("mutate"), st.sampled_from(["docs", "boundary", "lengths", "windows", "slopes"])),
    st.tuples(st.just("lists"), _MASKS),
    st.tuples(st.just("rebuild"), _MASKS),
)


@settings(max_examples=int(os.environ.get("FLEXATTN_SOAK", 25)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.sampled_from([(64, 64, 16), (1, 70, 16), (1, 160, 16), (48, 96, 32), (96, 96, 32), (256, 256, 32)]),
       ops=st.lists(_OPS, min_size=3, max_size=12))
def test_call_sequences_with_in_place_changes_match_the_reference(shape, ops):
    L, S, block = shape
    g = torch.Generator().manual_seed(L * 1000 + S)
    qkv = (torch.randn(B, HQ, L, D, generator=g), torch.randn(B, HKV, S, D, generator=g),
           torch.randn(B, HKV, S, D, generator=g))
    t, masks, scores, built = _world(L, S, block)
    state = (t, masks, scores, built, qkv)
    for op in ops + [("call", "causal_padding", None, None), ("call", "documents", "alibi", None)]:
        _step(op, state)
