"""The Triton back end against the dense reference, under TRITON_INTERPRET=1 on CPU tensors."""

import ast

# The interpreter must be chosen before any Triton kernel is defined (our modules are
# loaded lazily, at compile_kernel time, so setting it at import of this module is enough).

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton back end cannot run")

from backends import BACKENDS
from codegen.triton import compile_kernel
from flexattn.analysis import create_block_mask
from flexattn.trace import trace_mask_mod, trace_score_mod
from flexattn import AuxRequest, flex_attention
from lse_cases import BIAS, MASKS, SCORE_MODS, dense_attention, grads, make_case, sink_loss

H = 2
SLOPES = torch.tensor([0.5, 0.25])
DOC_ID = torch.tensor([0] * 40 + [1] * 50 + [2] * 70)
REL_BIAS = torch.randn(2 * 160, requires_grad=True)


def causal(b, h, q, kv):
    return q >= kv


def sliding(b, h, q, kv):
    return (q >= kv) & (q - kv <= 24)


def prefix_lm(b, h, q, kv):
    return (kv < 20) | (q >= kv)


def documents(b, h, q, kv):
    return DOC_ID[q] == DOC_ID[kv]


def empty_rows(b, h, q, kv):
    return (q % 7 != 3) & (kv <= q + 5)


def alibi(score, b, h, q, kv):
    return score + SLOPES[h] * (kv - q)


def softcap(score, b, h, q, kv):
    return 5.0 * torch.tanh(score / 5.0)


def rel_bias(score, b, h, q, kv):
    return score + REL_BIAS[q - kv + 160]


CASES = {
    "causal": (None, causal),
    "sliding window": (None, sliding),
    "prefix-lm": (None, prefix_lm),
    "documents": (None, documents),
    "empty rows": (None, empty_rows),
    "alibi": (alibi, causal),
    "softcap": (softcap, None),
    "relative bias": (rel_bias, causal),
}


def _run(backend, score_mod, mask_mod, q, k, v, block_size, enable_gqa=False):
    score = trace_score_mod(score_mod) if score_mod else None
    mask = trace_mask_mod(mask_mod) if mask_mod else None
    L, S = q.shape[2], k.shape[2]
    bm = create_block_mask(mask_mod, 1, q.shape[1], L, S, BLOCK_SIZE=block_size) if mask_mod else None
    return backend(q, k, v, score_graph=score.graph if score else None,
                   score_buffers=list(score.buffers) if score else [], mask_graph=mask.graph if mask else None,
                   mask_buffers=list(mask.buffers) if mask else [], block_mask=bm, scale=None,
                   enable_gqa=enable_gqa, kernel_options={"BLOCK_SIZE": block_size})


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", CASES)
def test_forward_backward_match_reference_fp32(name):
    torch.manual_seed(0)
    score_mod, mask_mod = CASES[name]
    L, S, D = (96, 160, 24) if name != "documents" else (160, 160, 32)
    q = torch.randn(1, H, L, D, requires_grad=True)
    k, v = (torch.randn(1, H, S, D, requires_grad=True) for _ in range(2))
    inputs = [q, k, v] + ([REL_BIAS] if name == "relative bias" else [])
    out, lse, _ = _run(BACKENDS["triton"], score_mod, mask_mod, q, k, v, 32)
    ref, ref_lse, _ = _run(BACKENDS["reference"], score_mod, mask_mod, q, k, v, 32)
    assert _relative(out, ref) < 1e-4
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-4)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    for g, w in zip(got, want):
        assert _relative(g, w) < 1e-4


def test_fully_masked_rows_give_zero_output_and_minus_inf_lse():
    q, k, v = (torch.randn(1, H, 64, 16) for _ in range(3))
    out, lse, _ = _run(BACKENDS["triton"], None, empty_rows, q, k, v, 32)
    assert torch.all(out[:, :, 3::7] == 0)
    assert torch.all(lse[:, :, 3::7] == float("-inf"))


# GQA, a padded head dim (48 -> 64), a mask-free softcap and a buffer gradient in 16-bit. bfloat16
# relies on the templates' _dot (the interpreter's tl.dot reads bf16 as its bit patterns); the
# interpreter's fp32 -> bf16 casts (P, dS, out) truncate where a GPU rounds to nearest even, so
# bf16 errors here (4e-3 to 7e-3) are about twice a GPU's, within 1e-2 all the same.
HALF_CASES = [("alibi", torch.bfloat16), ("softcap", torch.bfloat16), ("relative bias", torch.bfloat16),
              ("alibi", torch.float16)]


@pytest.mark.parametrize("name, dtype", HALF_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in HALF_CASES])
def test_half_precision_gqa_and_padded_head_dim_match_fp32_reference(name, dtype):
    torch.manual_seed(0)
    score_mod, mask_mod = CASES[name]
    q = torch.randn(1, 4, 80, 48, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 2, 80, 48, dtype=dtype, requires_grad=True) for _ in range(2))
    out = _run(BACKENDS["triton"], score_mod, mask_mod, q, k, v, 32, enable_gqa=True)[0]
    ref = _run(BACKENDS["reference"], score_mod, mask_mod, q.float(), k.float(), v.float(), 32, enable_gqa=True)[0]
    assert out.dtype == dtype and _relative(out, ref) < 1e-2
    grad = torch.randn_like(out)
    inputs = (q, k, v) + ((REL_BIAS,) if name == "relative bias" else ())
    for g, w in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad.float())):
        assert _relative(g, w) < 1e-2


@pytest.mark.parametrize("name", CASES)
def test_generated_source_parses_and_has_no_python_fallbacks(name):
    score_mod, mask_mod = CASES[name]
    kernel = compile_kernel(trace_score_mod(score_mod).graph if score_mod else None,
                            trace_mask_mod(mask_mod).graph if mask_mod else None, {})
    ast.parse(kernel.source)
    assert "torch." not in kernel.source and "import torch" not in kernel.source
    assert kernel.source.count("@triton.jit") >= 3


@pytest.mark.parametrize("score", ["none", "bias_on_masked_rows"])
def test_lse_gradients(score):
    """The lse is differentiable here too (tests/codegen/test_lse_gradients.py has the other back ends)."""
    q, k, v, sinks = make_case(5, 1, 2, 2, 20, 36, torch.float32)
    bias = BIAS.float().requires_grad_()
    score_mod, mask_mod = SCORE_MODS[score](bias), MASKS["causal"]
    block_mask = create_block_mask(mask_mod, None, None, 20, 36, BLOCK_SIZE=16)
    out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                                       return_aux=AuxRequest(lse=True), backend="triton")
    wrt = [q, k, v, sinks, bias]
    got = grads(sink_loss(out, aux.lse, sinks), wrt)
    want = grads(sink_loss(*dense_attention(*(t.double() for t in (q, k, v)), score_mod, mask_mod), sinks.double()), wrt)
    for name, a, b in zip("q k v sinks bias".split(), got, want):
        if b is not None:
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5, msg=name)
