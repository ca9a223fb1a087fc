"""Property tests: the torch back end equals the dense reference on random mods, shapes, dtypes, block sizes."""

import operator

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends import BACKENDS
import flexattn
from codegen.torch_backend.tiles import plan_rows
from flexattn.api import mask_of

MASK_TERMS = [
    lambda c: (lambda b, h, q, kv: q >= kv),
    lambda c: (lambda b, h, q, kv: (q - kv).abs() <= c),
    lambda c: (lambda b, h, q, kv: kv < c),
    lambda c: (lambda b, h, q, kv: (q // (c + 1)) == (kv // (c + 1))),
    lambda c: (lambda b, h, q, kv: ((q + kv + h) % (c % 4 + 2)) != 0),
    lambda c: (lambda b, h, q, kv: q * 2 >= kv + c - b),
]
SCORE_TERMS = [
    lambda c: (lambda s, b, h, q, kv: s + 0.05 * c * (kv - q)),
    lambda c: (lambda s, b, h, q, kv: (c + 1.0) * torch.tanh(s / (c + 1.0))),
    lambda c: (lambda s, b, h, q, kv: torch.where(q > kv + c, s * 0.5, s - 0.1 * h)),
    lambda c: (lambda s, b, h, q, kv: s + torch.sin(q.float()) * 0.3 - (kv % (c + 1)).float() * 0.1),
    lambda c: (lambda s, b, h, q, kv: torch.maximum(s, torch.zeros_like(s) - c)),
]


@st.composite
def mask_mods(draw):
    terms = [MASK_TERMS[draw(st.integers(0, len(MASK_TERMS) - 1))](draw(st.integers(0, 20)))
             for _ in range(draw(st.integers(1, 2)))]
    combine = draw(st.sampled_from([operator.and_, operator.or_]))

    def mask_mod(b, h, q, kv):
        result = terms[0](b, h, q, kv)
        for term in terms[1:]:
            result = combine(result, term(b, h, q, kv))
        return result
    return mask_mod


@st.composite
def score_mods(draw):
    first = SCORE_TERMS[draw(st.integers(0, len(SCORE_TERMS) - 1))](draw(st.integers(0, 9)))
    second = SCORE_TERMS[draw(st.integers(0, len(SCORE_TERMS) - 1))](draw(st.integers(0, 9)))
    return lambda s, b, h, q, kv: second(first(s, b, h, q, kv), b, h, q, kv)


def _both(q, k, v, score_mod, mask_mod, block_size, per_head, max_tiles):
    score = flexattn.trace_score_mod(score_mod) if score_mod else None
    bm = None
    if mask_mod is not None:
        B, H = (q.shape[0], q.shape[1]) if per_head else (None, None)
        bm = flexattn.create_block_mask(mask_mod, B, H, q.shape[2], k.shape[2], BLOCK_SIZE=block_size)
    mask = mask_of(bm) if bm is not None else None
    args = dict(score_graph=score.graph if score else None, score_buffers=score.buffers if score else (),
                mask_graph=mask.graph if mask else None, mask_buffers=mask.buffers if mask else (),
                block_mask=bm, scale=None, enable_gqa=q.shape[1] != k.shape[1])
    ours = BACKENDS["torch"](q, k, v, kernel_options={"max_tiles": max_tiles, "BLOCK_SIZE": block_size}, **args)
    theirs = BACKENDS["reference"](q, k, v, kernel_options={}, **args)
    return ours, theirs


@settings(max_examples=40, deadline=None)
@given(
    L=st.integers(1, 70), S=st.integers(1, 70), batch=st.integers(1, 2), kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]), block_size=st.sampled_from([8, 16, (8, 16), 32]),
    max_tiles=st.integers(1, 4), per_head=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    score_mod=st.none() | score_mods(), mask_mod=st.none() | mask_mods(), seed=st.integers(0, 2**16),
)
def test_forward_equals_reference(L, S, batch, kv_heads, group, block_size, max_tiles, per_head, dtype,
                                  score_mod, mask_mod, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, L, 8, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, S, 8, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, S, 5, generator=g).to(dtype)
    ours, theirs = _both(q, k, v, score_mod, mask_mod, block_size, per_head, max_tiles)
    (out, lse, max_scores), (ref, ref_lse, ref_max) = ours, theirs
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(max_scores, ref_max, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    L=st.integers(1, 40), S=st.integers(1, 40), group=st.sampled_from([1, 2]), block_size=st.sampled_from([8, 16]),
    max_tiles=st.integers(1, 3), per_head=st.booleans(), score_mod=st.none() | score_mods(),
    mask_mod=st.none() | mask_mods(), seed=st.integers(0, 2**16),
)
def test_backward_equals_reference(L, S, group, block_size, max_tiles, per_head, score_mod, mask_mod, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2 * group, L, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, S, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, S, 4, generator=g, requires_grad=True)
    (out, _, _), (ref, _, _) = _both(q, k, v, score_mod, mask_mod, block_size, per_head, max_tiles)
    grad_out = torch.randn(out.shape, generator=g)
    ours = torch.autograd.grad(out, [q, k, v], grad_out)
    theirs = torch.autograd.grad(ref, [q, k, v], grad_out)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    blocks=st.integers(1, 6), tail=st.integers(0, 7), batch=st.integers(1, 2), kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]), shared_in_group=st.booleans(), causal=st.booleans(),
    same_visits=st.booleans(), max_tiles=st.integers(1, 3), seed=st.integers(0, 2**16),
)
def test_selected_tiles_per_kv_head_equal_reference_forward_and_backward(blocks, tail, batch, kv_heads, group,
                                                                         shared_in_group, causal, same_visits,
                                                                         max_tiles, seed):
    # A run-time selection of KV tiles (NSA-like, ``from_kv_blocks``), uneven per row and head; when
    # every query head of a group selects alike, the loop keeps one list per KV head. FULL tiles
    # are drawn whatever the mask_mod says there (they are attended whole); with same_visits every
    # (b, h) visits the same tiles, FULL for some and PARTIAL for others (the loop's shared pieces).
    g = torch.Generator().manual_seed(seed)
    n, block = blocks * 8 + tail, 8
    nb = -(-n // block)
    heads = kv_heads if shared_in_group else kv_heads * group
    chosen = torch.rand(batch, heads, nb, nb, generator=g) < 0.5
    if same_visits:
        chosen = chosen[:1, :1].expand(batch, heads, nb, nb)
    full = chosen & (torch.rand(chosen.shape, generator=g) < 0.5)
    if shared_in_group:
        chosen, full = (x.repeat_interleave(group, dim=1) for x in (chosen, full))
    lists = lambda sel: (sel.sum(-1).int(), torch.argsort(~sel, dim=-1, stable=True).int())  # noqa: E731
    bm = flexattn.BlockMask.from_kv_blocks(*lists(chosen & ~full), *lists(full), BLOCK_SIZE=block,
                                           mask_mod=(lambda b, h, q, kv: q >= kv) if causal else None,
                                           seq_lengths=(n, n))
    if shared_in_group:
        rows = plan_rows(bm, n, n, (block, block), max_tiles, group)
        assert {p.tiles.shape[1] for row in rows for p in row.pieces if p.tiles.dim() == 3} <= {kv_heads}
    q = torch.randn(batch, kv_heads * group, n, 8, generator=g, requires_grad=True)
    k = torch.randn(batch, kv_heads, n, 8, generator=g, requires_grad=True)
    v = torch.randn(batch, kv_heads, n, 4, generator=g, requires_grad=True)
    outs = [flexattn.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, backend=backend,
                                    kernel_options={"max_tiles": max_tiles, "PATH": "generated_loop"}
                                    if backend == "torch" else None)
            for backend in ("torch", "reference")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    grad_out = torch.randn(outs[0].shape, generator=g)
    ours, theirs = (torch.autograd.grad(out, [q, k, v], grad_out) for out in outs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
