"""The torch back end equals the dense reference on every mod of the shared set, forward and backward."""

import pytest
import torch

from backends import BACKENDS
import flexattn
from codegen.torch_backend import compile_kernel
from flexattn.api import mask_of
from flexattn.call import Call
from mods import MODS

B, H, L, S, E, EV, BLOCK = 2, 4, 77, 93, 8, 11, 16


def _run(backend, mods, q, k, v):
    """(out, lse, max_scores) of ``backend`` for built mods (params made leaves by the caller)."""
    score = flexattn.trace_score_mod(mods.score_mod) if mods.score_mod else None
    block_mask = None
    if mods.mask_mod is not None:
        block_mask = flexattn.create_block_mask(mods.mask_mod, B, H, q.shape[2], k.shape[2], BLOCK_SIZE=BLOCK)
    mask = mask_of(block_mask) if block_mask is not None else None
    run = BACKENDS[backend]
    return run(q, k, v, score_graph=score.graph if score else None, score_buffers=score.buffers if score else (),
               mask_graph=mask.graph if mask else None, mask_buffers=mask.buffers if mask else (),
               block_mask=block_mask, scale=None, enable_gqa=q.shape[1] != k.shape[1], kernel_options={})


def _inputs(hq=H, hkv=H, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(B, hq, L, E), make(B, hkv, S, E), make(B, hkv, S, EV)


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", MODS, ids=[c.name for c in MODS])
def test_forward_and_backward_match_the_reference(case, gqa):
    mods = case.build(L, S, H)
    for p in mods.params:
        p.requires_grad_()
    q, k, v = _inputs(H, 2 if gqa else H)
    out, lse, max_scores = _run("torch", mods, q, k, v)
    ref, ref_lse, ref_max = _run("reference", mods, q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(max_scores, ref_max, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    leaves = [q, k, v, *mods.params]
    ours = torch.autograd.grad(out, leaves, grad_out)
    theirs = torch.autograd.grad(ref, leaves, grad_out)
    for name, a, b in zip(["query", "key", "value"] + [f"param{i}" for i in range(len(mods.params))], ours, theirs):
        error = (a - b).abs().max() / b.abs().max().clamp_min(1e-12)
        assert error < 1e-4, f"{case.name}: grad of {name} off by {error:.2e}"


def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_grads():
    mods = next(c for c in MODS if c.name == "empty_rows").build(L, S, H)
    q, k, v = _inputs()
    out, lse, _ = _run("torch", mods, q, k, v)
    assert torch.all(out[:, :, :L // 2] == 0) and torch.all(torch.isneginf(lse[:, :, :L // 2]))
    (grad_q,) = torch.autograd.grad(out.sum(), [q])
    assert torch.all(grad_q[:, :, :L // 2] == 0) and torch.isfinite(grad_q).all()


@pytest.mark.parametrize("name", ["alibi", "bias_read_twice", "per_head_batch", "document"])
def test_gradcheck_float64(name):
    tiny_l, tiny_s, heads = 9, 13, 2
    mods = next(c for c in MODS if c.name == name).build(tiny_l, tiny_s, heads)
    params = [p.double().requires_grad_() for p in mods.params]
    score = flexattn.trace_score_mod(mods.score_mod) if mods.score_mod else None
    bm = flexattn.create_block_mask(mods.mask_mod, 1, heads, tiny_l, tiny_s, BLOCK_SIZE=4) if mods.mask_mod else None
    mask = mask_of(bm) if bm is not None else None
    kernel = compile_kernel(score.graph if score else None, mask.graph if mask else None)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, heads, tiny_l, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, heads, tiny_s, 3, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, heads, tiny_s, 2, dtype=torch.float64, generator=g, requires_grad=True)

    def attend(q, k, v, *params):
        return kernel(Call(q, k, v, score_graph=score.graph if score else None, score_buffers=params,
                           mask_graph=mask.graph if mask else None, mask_buffers=mask.buffers if mask else (),
                           block_mask=bm, options={"max_tiles": 2}))[0]

    assert torch.autograd.gradcheck(attend, (q, k, v, *params), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    mods = next(c for c in MODS if c.name == "alibi").build(L, S, H)
    q, k, v = (t.detach().to(dtype) for t in _inputs())
    out, lse, _ = _run("torch", mods, q, k, v)
    ref, ref_lse, _ = _run("reference", mods, q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)


def test_inside_a_user_torch_compile_gives_the_same_values_and_grads():
    mods = next(c for c in MODS if c.name == "relative_bias").build(L, S, H)
    table = mods.params[0].requires_grad_()
    bm = flexattn.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, L, S, BLOCK_SIZE=32)

    def layer(q, k, v):
        return flexattn.flex_attention(q, k, v, score_mod=mods.score_mod, block_mask=bm, backend="torch").sin()

    q, k, v = _inputs()
    eager = layer(q, k, v)
    compiled = torch.compile(layer, backend="eager")(q, k, v)
    torch.testing.assert_close(compiled, eager)
    ours = torch.autograd.grad(compiled.sum(), [q, k, v, table])
    theirs = torch.autograd.grad(eager.sum(), [q, k, v, table])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_source_is_generated_torch_code_with_constants_as_runtime_slots():
    window = 37
    graph = flexattn.trace_mask_mod(lambda b, h, q_idx, kv_idx: q_idx - kv_idx <= window).graph
    source = compile_kernel(None, graph).source
    assert "def mask_mod(b, h, q_idx, kv_idx, buffers, consts, cf):" in source
    assert "def forward(" in source and "def backward(" in source
    mask_body = source.split("def mask_mod")[1].split("\ndef ")[0]
    code = [line.split("#")[0] for line in mask_body.splitlines()[2:]]
    assert any("consts[0]" in line for line in code)
    assert not any("37" in line for line in code), "the window size must be a run-time slot, not a literal"


def test_loads_clamp_indices_at_padded_and_masked_positions():
    """A bias table shorter than the sequence: every read is clamped, as in the reference."""
    short = torch.randn(5)
    mods_score = lambda score, b, h, q_idx, kv_idx: score + short[kv_idx - q_idx]  # noqa: E731
    q, k, v = _inputs()
    score = flexattn.trace_score_mod(mods_score)
    out = compile_kernel(score.graph, None)(Call(q, k, v, score_graph=score.graph, score_buffers=score.buffers))[0]
    ref = BACKENDS["reference"](q, k, v, score_graph=score.graph, score_buffers=score.buffers)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_printer_fuses_score_plus_product_into_one_addcmul():
    mods = next(c for c in MODS if c.name == "alibi").build(L, S, H)
    source = compile_kernel(flexattn.trace_score_mod(mods.score_mod).graph, None).source
    score_mod = source.split("def score_mod")[1].split("\ndef ")[0]
    assert "torch.addcmul(" in score_mod and "(fused into its user below)" in score_mod
