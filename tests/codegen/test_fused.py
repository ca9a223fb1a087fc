"""The fused path of the torch back end (torch's CPU flash kernel on rectangles of FULL tiles and
batches of PARTIAL tiles) equals the dense reference, forward and backward, on random mask programs."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mask_programs import as_mask_mod, mask_expr

import flexattn
from codegen.torch_backend import fused, fused_paths, fused_plan
from codegen.torch_backend.tiles import loop_work
from flexattn import dispatch
from flexattn.analysis.diagonals import DiagonalKinds
from flexattn.api import mask_of
from flexattn.block_mask import LOWER, UPPER


SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])
POSITION_BIAS = torch.linspace(-2.0, 3.0, 100)
SEPARABLE = {  # score_mods whose bias splits into row x column factors (flexattn.analysis.separable)
    "alibi": lambda s, b, h, q, kv: s + SLOPES[h] * (kv - q),
    "linear": lambda s, b, h, q, kv: s - 0.01 * (q - kv) + 0.5,
    "key_bias": lambda s, b, h, q, kv: s + POSITION_BIAS[kv] * (h + 1),
    "product": lambda s, b, h, q, kv: s + 0.001 * q * kv - POSITION_BIAS[q],
    "rows_only": lambda s, b, h, q, kv: s + POSITION_BIAS[q] * 2.0,
}


def _call(q, k, v, bm, options, score_mod=None):
    mask = mask_of(bm) if bm is not None else None
    score = flexattn.trace_score_mod(score_mod) if score_mod is not None else None
    return dispatch.call_of(
        q, k, v, score_graph=score.graph if score else None, score_buffers=score.buffers if score else (),
        mask_graph=mask.graph if mask else None,
        mask_buffers=mask.buffers if mask else (), block_mask=bm, scale=None, enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=options)


def _run(backend, q, k, v, bm, options, score_mod=None):
    return dispatch.run(backend, _call(q, k, v, bm, options, score_mod))


shapes = dict(L=st.integers(1, 90), S=st.integers(1, 90), batch=st.integers(1, 2), kv_heads=st.integers(1, 2),
              group=st.sampled_from([1, 2]), block=st.sampled_from([8, 16, (8, 32), 32]), per_head=st.booleans(),
              expr=st.none() | mask_expr(1), seed=st.integers(0, 2**16),
              score=st.sampled_from([None, *SEPARABLE]))


def _inputs(L, S, batch, kv_heads, group, block, per_head, expr, seed, score=None, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, 8, generator=g).to(dtype).requires_grad_(grad)
               for h, n in ((kv_heads * group, L), (kv_heads, S), (kv_heads, S)))
    bm = None
    if expr is not None:
        B, H = (batch, kv_heads * group) if per_head else (None, None)
        bm = flexattn.create_block_mask(as_mask_mod(expr), B, H, L, S, BLOCK_SIZE=block)
    return q, k, v, bm


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), **shapes)
def test_forward_equals_reference(dtype, **kw):
    q, k, v, bm = _inputs(dtype=dtype, **kw)
    score_mod = SEPARABLE.get(kw["score"])
    options = {"BLOCK_SIZE": kw["block"], "SPLIT_KV": False, "FUSED": True}
    out, lse, max_scores = _run("torch", q, k, v, bm, options, score_mod)
    ref, ref_lse, _ = _run("reference", q, k, v, bm, {}, score_mod)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and max_scores is None  # the fused path ran
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(**shapes)
def test_backward_equals_reference(**kw):
    q, k, v, bm = _inputs(grad=True, **kw)
    score_mod = SEPARABLE.get(kw["score"])
    out, _, max_scores = _run("torch", q, k, v, bm, {"BLOCK_SIZE": kw["block"], "SPLIT_KV": False, "FUSED": True},
                              score_mod)
    ref, _, _ = _run("reference", q, k, v, bm, {}, score_mod)
    assert max_scores is None
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(kw["seed"]))
    ours = torch.autograd.grad(out, [q, k, v], grad_out)
    theirs = torch.autograd.grad(ref, [q, k, v], grad_out)
    for a, b in zip(ours, theirs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 20, 20, BLOCK_SIZE=8)
    assert torch.autograd.gradcheck(lambda q, k, v: _run("torch", q, k, v, bm, {"FUSED": True})[0], (q, k, v))


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_rectangles_cover_the_full_tiles_once(rows, cols, seed):
    full = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < 0.6
    covered = torch.zeros(rows, cols, dtype=torch.int64)
    for q0, q1, k0, k1 in fused_plan.full_rectangles(full):
        covered[q0:q1, k0:k1] += 1
    assert torch.equal(covered, full.long())


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_partial_batches_hold_each_tile_once_and_a_row_once_per_batch(rows, cols, seed):
    partial = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < 0.4
    seen = torch.zeros(rows, cols, dtype=torch.int64)
    for batch in fused_plan.partial_batches(partial):
        assert len(torch.unique(batch[:, 0])) == len(batch)
        seen[batch[:, 0], batch[:, 1]] += 1
    assert torch.equal(seen, partial.long())


def test_a_causal_mask_is_a_few_rectangles_and_one_batch_of_diagonal_tiles():
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 4096, 4096)
    unit, = fused_plan.plan_units(bm.tile_classes(), 1, 1)
    assert len(unit.rectangles) <= 32 and len(unit.batches) == 1


def test_causal_triangles_run_in_the_kernels_causal_mode():
    n = 1000  # the last, ragged tile stays a PARTIAL tile
    classes = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n).tile_classes()
    def shapes(tiles):  # every diagonal tile but the ragged last one is exactly causal
        return torch.where((tiles[:, 0] == tiles[:, 1]) & (tiles[:, 0] < 7), LOWER, 0)
    squares = fused_plan.triangle_squares(classes[0, 0], shapes)
    assert squares == [(0, 0, 4, LOWER), (4, 4, 2, LOWER)]  # a lone tile stays PARTIAL
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, requires_grad=True) for _ in range(3))
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n)
    out = _run("torch", q, k, v, bm, {"FUSED": True, "SPLIT_KV": False})[0]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_sliding_window_is_a_chain_of_causal_and_reversed_causal_squares():
    n, window = 2048, 512
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= window),
                                    None, None, n, n)
    shapes = DiagonalKinds(bm.traced_mask.graph, bm.traced_mask.buffers, 1, 1, n, n, 128)
    squares = fused_plan.triangle_squares(bm.tile_classes()[0, 0], shapes)
    assert {kind for *_, kind in squares} == {LOWER, UPPER}
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, requires_grad=True) for _ in range(3))
    out = _run("torch", q, k, v, bm, {"FUSED": True, "SPLIT_KV": False})[0]
    ref = _run("reference", q, k, v, bm, {})[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _why_not_pays(block_mask, B=1, H=1):
    L, S = block_mask.seq_lengths
    loop = loop_work(block_mask, B, H, L, S, block_mask.BLOCK_SIZE, 16)
    return fused_plan.why_not_pays(fused_plan.plan_units(block_mask.tile_classes(), B, H), block_mask.BLOCK_SIZE,
                                   L, S, loop)


def test_the_fused_kernel_is_chosen_where_it_pays():
    causal = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 4096, 4096)
    def band(width):
        return flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < width),
                                          None, None, 8192, 8192)

    assert _why_not_pays(causal) is None
    assert _why_not_pays(band(2048)) is None  # a wide band: long strips
    assert "MIN_TILES_OF_STRIPS" in _why_not_pays(band(256))


def test_the_cost_estimate_counts_the_loops_padding_and_the_fused_calls():
    # Per-head windows (MoA): the loop pads every head to the widest one of its row, the fused
    # plan computes each head's own tiles, so the fused path pays despite many PARTIAL tiles.
    n, spans = 4096, torch.tensor([64, 128, 256, 2048])
    per_head = flexattn.create_block_mask(
        lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & ((q_idx - kv_idx < spans[h]) | (kv_idx < 64)),
        None, 4, n, n)
    assert _why_not_pays(per_head, H=4) is None
    # Scattered 64 x 64 tiles with a per-head selection: one fused call per small rectangle costs more
    # than the loop's one piece per row.
    g = torch.Generator().manual_seed(0)
    n_blocks, causal_tiles = 128, torch.ones(128, 128, dtype=torch.bool).tril()
    scores = torch.rand(1, 4, n_blocks, n_blocks, generator=g).masked_fill(~causal_tiles, -1.0)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(4, dim=-1).indices, True)
    chosen = (chosen | torch.eye(n_blocks, dtype=torch.bool)) & causal_tiles
    chosen[..., 0] = True
    lists = lambda sel: (sel.sum(-1).int(), torch.argsort(~sel, dim=-1, stable=True).int())  # noqa: E731
    diagonal = torch.eye(n_blocks, dtype=torch.bool)
    scattered = flexattn.BlockMask.from_kv_blocks(*lists(chosen & diagonal), *lists(chosen & ~diagonal), BLOCK_SIZE=64,
                                                  mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    assert "estimated cost" in _why_not_pays(scattered, H=4)


def test_max_scores_request_takes_the_generated_loop():
    q = torch.randn(1, 2, 40, 8)
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 40, 40, BLOCK_SIZE=16)
    _, aux = flexattn.flex_attention(q, q, q, block_mask=bm, backend="torch",
                                     return_aux=flexattn.AuxRequest(max_scores=True))
    _, ref = flexattn.flex_attention(q, q, q, block_mask=bm, backend="reference",
                                     return_aux=flexattn.AuxRequest(max_scores=True))
    torch.testing.assert_close(aux.max_scores, ref.max_scores)


def test_inside_a_user_torch_compile_gives_the_same_values_and_grads():
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 64, 64, BLOCK_SIZE=16)

    def layer(q, k, v):
        return flexattn.flex_attention(q, k, v, block_mask=bm, backend="torch",
                                       kernel_options={"FUSED": True, "SPLIT_KV": False}).sin()

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g, requires_grad=True) for _ in range(3))
    eager = layer(q, k, v)
    compiled = torch.compile(layer, backend="eager")(q, k, v)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.sum(), [q, k, v]), torch.autograd.grad(eager.sum(), [q, k, v])):
        torch.testing.assert_close(a, b)


def test_packed_documents_run_one_call_per_document():
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 37, 163]))
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g, requires_grad=True) for _ in range(3))
    for causal in (True, False):
        def mask_mod(b, h, q_idx, kv_idx):
            same = ids[q_idx] == ids[kv_idx]
            return same & (q_idx >= kv_idx) if causal else same
        bm = flexattn.create_block_mask(mask_mod, None, None, 300, 300, BLOCK_SIZE=64)
        call = _call(q, k, v, bm, {})
        assert dispatch.choose("torch", call).path.name == "fused_documents"
        unit, = fused_paths.document_plan(call)[0]
        assert unit.segments == [(0, 100, 0, 100, causal), (100, 137, 100, 137, causal), (137, 300, 137, 300, causal)]
        out = flexattn.flex_attention(q, k, v, block_mask=bm, backend="torch")
        ref = flexattn.flex_attention(q, k, v, block_mask=bm, backend="reference")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        grad = torch.randn(out.shape, generator=g)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_plans_are_reused_per_block_mask_until_an_input_changes(monkeypatch):
    calls = []
    plan = fused_plan.plan
    monkeypatch.setattr(fused_plan, "plan", lambda *args, **kw: calls.append(args) or plan(*args, **kw))
    doc = torch.tensor([0] * 300 + [1] * 212)
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (doc[q_idx] < 5),
                                    None, None, 512, 512, BLOCK_SIZE=64)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 16, generator=g) for _ in range(3))
    first = _run("torch", q, k, v, bm, {"FUSED": True, "SPLIT_KV": False})[0]
    second = _run("torch", q, k, v, bm, {"FUSED": True, "SPLIT_KV": False})[0]
    assert len(calls) == 1 and torch.equal(first, second)
    doc[:] = 7  # the mask_mod's buffer changed in place: plan again (the BlockMask is now stale, not the plan)
    _run("torch", q, k, v, bm, {"FUSED": True, "SPLIT_KV": False})
    other = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 512, 512,
                                       BLOCK_SIZE=64)
    _run("torch", q, k, v, other, {"FUSED": True, "SPLIT_KV": False})
    assert len(calls) == 3


def test_separable_biases_run_on_causal_and_reversed_causal_squares():
    """ALiBi on a sliding window: the bias rides as extra q/k features through the kernel's
    causal mode (LOWER squares) and its causal mode on reversed sequences (UPPER squares)."""
    n, window = 1024, 256
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= window),
                                    None, None, n, n)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, n, 16, generator=g, requires_grad=True) for _ in range(3))
    call = _call(q, k, v, bm, {"FUSED": True, "SPLIT_KV": False}, SEPARABLE["alibi"])
    assert dispatch.choose("torch", call).path.name == "fused_tiles"
    squares = [square for unit in fused_paths.tile_plan(call, True)[0] for square in unit.squares]
    assert {kind for *_, kind in squares} == {LOWER, UPPER}
    out = dispatch.run("torch", call)[0]
    ref = _run("reference", q, k, v, bm, {}, SEPARABLE["alibi"])[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_kept_documents_plan_is_not_served_to_a_call_with_a_score_mod():
    """Plans are kept per BlockMask: a plan made for a mask-only call must not serve a later call on
    the same BlockMask with a separable score_mod (it ran without the bias: a silent divergence)."""
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([300, 200, 400, 124]))
    slope = torch.linspace(-0.5, 0.5, 2)
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx], 1, 1, 1024, 1024)
    q, k, v = (torch.randn(1, 2, 1024, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    flexattn.flex_attention(q, k, v, block_mask=bm)  # plans fused_documents for this BlockMask

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slope[h] * (kv_idx - q_idx)

    out = flexattn.flex_attention(q, k, v, score_mod=alibi, block_mask=bm)
    ref = flexattn.flex_attention(q, k, v, score_mod=alibi, block_mask=bm, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@given(st.integers(1, 300), st.sampled_from([16, 64, 128]), st.data())
@settings(max_examples=40, deadline=None)
def test_tiles_of_a_ragged_sequence_pads_only_the_picked_tiles(n, block, data):
    """A batch of tiles of an (B, H, N, D) tensor: the tiles of it padded with zero rows to whole
    tiles, without padding it (a ragged last tile is zero past N, the other tiles are views' copies)."""
    x = torch.randn(2, 3, n, 5)
    tiles = -(-n // block)
    index = torch.tensor(data.draw(st.lists(st.integers(0, tiles - 1), min_size=1, max_size=4)))
    padded = torch.nn.functional.pad(x, (0, 0, 0, -n % block)).view(2, 3, tiles, block, 5)
    expected = padded.index_select(2, index).transpose(1, 2).reshape(2 * len(index), 3, block, 5)
    assert torch.equal(fused._tiles_of(x, block, index), expected)


def test_a_ragged_last_kv_tile_equals_torch_flex_attention():
    """Speculative decoding's shape (a few queries over a long cache whose length is no multiple of
    the tile): the fused path, which pads only the tiles it picks, equals torch's flex_attention."""
    from torch.nn.attention import flex_attention as tfa

    L, S, prefix = 64, 1100, 1036

    def tree(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (kv_idx - prefix <= q_idx)

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, L, 16), torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
    bm = flexattn.create_block_mask(tree, None, None, L, S, BLOCK_SIZE=(64, 128))
    assert flexattn.explain_call(q, k, v, block_mask=bm, print_it=False).path.name == "fused_tiles"
    out, aux = flexattn.flex_attention(q, k, v, block_mask=bm, return_aux=flexattn.AuxRequest(lse=True))
    torch._dynamo.reset()  # torch's eager flex runs through dynamo
    theirs = tfa.create_block_mask(tree, None, None, L, S, device="cpu", BLOCK_SIZE=(64, 128))
    want, want_aux = tfa.flex_attention(q, k, v, block_mask=theirs, return_aux=tfa.AuxRequest(lse=True))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux.lse, want_aux.lse, rtol=1e-5, atol=1e-5)


def test_a_ragged_last_kv_tile_has_the_dense_gradients_through_out_and_lse():
    L, S, prefix = 64, 1100, 1036

    def tree(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (kv_idx - prefix <= q_idx)

    bm = flexattn.create_block_mask(tree, None, None, L, S, BLOCK_SIZE=(64, 128))
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(1, 2, n, 16, dtype=torch.float64, generator=g) for n in (L, S, S)]
    grads = {}
    for backend, options in (("torch", {"PATH": "fused_tiles"}), ("reference", None)):
        q, k, v = (x.clone().requires_grad_() for x in base)
        out, aux = flexattn.flex_attention(q, k, v, block_mask=bm, kernel_options=options, backend=backend,
                                           return_aux=flexattn.AuxRequest(lse=True))
        (out.sum() + (aux.lse * 0.5).sum()).backward()
        grads[backend] = (q.grad, k.grad, v.grad)
    for got, want in zip(grads["torch"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)
