"""flex_attention inside torch.compile(fullgraph=True): one custom op, same values and gradients as eager.

torch._dynamo (and so flexattn.custom_op) is imported inside the tests: importing it imports Triton
(the suite's TRITON_INTERPRET setting is in tests/conftest.py).
"""

import importlib

import pytest
import torch

import flexattn


def _dynamo():
    return importlib.import_module("torch._dynamo.testing"), importlib.import_module("torch._dynamo.utils")


def _custom_op():
    return importlib.import_module("flexattn.custom_op")


class SlopedAttention(torch.nn.Module):
    """A learnable ALiBi-like slope per head, read by the score_mod from ``self``."""

    def __init__(self, heads: int):
        super().__init__()
        self.slope = torch.nn.Parameter(torch.linspace(-0.5, 0.5, heads))

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score + self.slope[h] * (q_idx - kv_idx)

    def forward(self, q, k, v, block_mask=None):
        return flexattn.flex_attention(q, k, v, score_mod=self.score_mod, block_mask=block_mask) * 2


def _grads(module, fn, *inputs, **kw):
    inputs = [t.detach().requires_grad_() for t in inputs]
    module.zero_grad()
    out = fn(*inputs, **kw)
    out.square().sum().backward()
    return out.detach(), [t.grad for t in inputs] + [module.slope.grad.clone()]


def test_compiled_module_matches_eager_without_graph_breaks_or_recompiles():
    testing, utils = _dynamo()
    custom_op = _custom_op()
    torch._dynamo.reset()
    utils.counters.clear()
    module, backend = SlopedAttention(4), testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=backend, fullgraph=True, dynamic=True)
    plans = []
    for length in (24, 40, 72):
        q, k, v = (torch.randn(2, 4, length, 8, generator=torch.Generator().manual_seed(length + i)) for i in range(3))
        out_c, grads_c = _grads(module, compiled, q, k, v)
        plans.append(dict(custom_op._PLANS))
        out_e, grads_e = _grads(module, module, q, k, v)
        torch.testing.assert_close(out_c, out_e)
        for got, want in zip(grads_c, grads_e):
            torch.testing.assert_close(got, want)
    assert backend.frame_count == 1  # no recompile for new lengths
    assert not utils.counters["graph_break"]
    assert plans[0] == plans[1] == plans[2]  # the mods were traced while compiling, by flexattn, not per call


def test_compiled_with_a_block_mask_and_gqa():
    _dynamo()
    torch._dynamo.reset()
    module = SlopedAttention(4)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    causal = flexattn.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 40, 40, BLOCK_SIZE=16)
    q = torch.randn(1, 4, 40, 8)
    k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)

    def gqa(mod):
        return lambda q, k, v: flexattn.flex_attention(q, k, v, score_mod=mod.score_mod, block_mask=causal,
                                                       enable_gqa=True)

    out_c, grads_c = _grads(module, torch.compile(gqa(module), backend="aot_eager", fullgraph=True), q, k, v)
    out_e, grads_e = _grads(module, gqa(module), q, k, v)
    torch.testing.assert_close(out_c, out_e)
    for got, want in zip(grads_c, grads_e):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(compiled(q, q, q, block_mask=causal), module(q, q, q, block_mask=causal))


def test_routable_mods():
    custom_op = _custom_op()
    module = SlopedAttention(2)
    assert custom_op.routable(module.score_mod, None)
    assert custom_op.routable(None, None)
    assert not custom_op.routable(lambda s, b, h, q, kv: s, None)  # closures take the eager path


@pytest.mark.parametrize("aux", [True, False])
def test_lse_under_compile(aux):
    _dynamo()
    torch._dynamo.reset()
    module = SlopedAttention(2)

    def call(q):
        if aux:
            return flexattn.flex_attention(q, q, q, score_mod=module.score_mod,
                                           return_aux=flexattn.AuxRequest(lse=True))[1].lse
        return flexattn.flex_attention(q, q, q, score_mod=module.score_mod)

    q = torch.randn(1, 2, 16, 8)
    torch.testing.assert_close(torch.compile(call, backend="aot_eager", fullgraph=True)(q), call(q))


def test_ops_fake_layouts_match_the_real_ones_for_strided_inputs():
    """inductor checks each op's outputs against its fake's strides: a key that is a transposed view
    (as transformers' are) must get a gradient laid out as the fake says."""
    custom_op = _custom_op()
    module = SlopedAttention(2)
    number, score_buffers, _ = custom_op.plan(module.score_mod, None, "torch")
    q = torch.randn(1, 6, 2, 4).transpose(1, 2)  # (B, H, L, E) with strides of (B, L, H, E)
    k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 6, 2, 4).transpose(1, 2)
    args = (q, k, v, list(score_buffers), [], [], [], torch.randn(1, 2, 6, 4), torch.zeros(1, 2, 6), number, 0.5,
            False)
    torch.library.opcheck(torch.ops.flexattn.attention_backward, args, test_utils=("test_faketensor",))
    torch.library.opcheck(torch.ops.flexattn.attention, args[:7] + args[9:], test_utils=("test_faketensor",))
