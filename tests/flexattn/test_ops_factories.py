"""Tensor factories, type helpers and torch's own mask combinators in traced mods, against torch.

Under torch's flex_attention a mod sees 0-dim tensors (it is vmapped), so the reference is the
same function under ``torch.vmap``.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as tfa

from flexattn.errors import TraceError
from flexattn.ir import Op
from flexattn.semantics import evaluate, index_grid
from flexattn.trace import trace_mask_mod, trace_score_mod
from op_samples import close, evaluate_values, sample, trace_values

# Each takes an int32, a float32 and a bool operand.
CASES = {
    "new_ones": lambda x, y, z: x.new_ones(()) + x,
    "new_zeros_dtype": lambda x, y, z: x.new_zeros((), dtype=torch.float32) + x,
    "new_full": lambda x, y, z: x.new_full((), 7) * x,
    "new_tensor": lambda x, y, z: x.new_tensor(3) + x,
    "new_ones_bool": lambda x, y, z: z.new_ones(size=(), dtype=torch.bool, device=z.device) & z,
    "full_float": lambda x, y, z: torch.full((), 2.5) * x,
    "full_int": lambda x, y, z: torch.full((), 3) + x,
    "ones_dtype": lambda x, y, z: torch.ones((), dtype=torch.int32) + x,
    "zeros": lambda x, y, z: torch.zeros([]) + y,
    "tensor_bool": lambda x, y, z: torch.tensor(True) & z,
    "tensor_float_dtype": lambda x, y, z: torch.tensor(2, dtype=torch.float32) * x,
    "scalar_tensor": lambda x, y, z: torch.scalar_tensor(2) * x,
    "type_as": lambda x, y, z: x.type_as(y) + y,
    "to_other": lambda x, y, z: x.to(y) / 3,
    "to_dtype": lambda x, y, z: y.to(torch.int32),
    "to_device_and_dtype": lambda x, y, z: y.to("cpu", torch.int64),
    "zeros_like": lambda x, y, z: torch.zeros_like(x) + y,
    "ones_like_dtype": lambda x, y, z: torch.ones_like(y, dtype=torch.bool) & z,
    "full_like": lambda x, y, z: torch.full_like(x, 4) * x,
    "masked_fill": lambda x, y, z: y.masked_fill(z, float("-inf")),
    "where_method": lambda x, y, z: y.where(z, x),
}


@pytest.mark.parametrize("name", CASES)
def test_factory_equals_torch_under_vmap(name):
    fn = CASES[name]
    tensors = [sample(torch.int32, 0), sample(torch.float32, 1, special=False), sample(torch.bool, 2)]
    want = torch.vmap(fn)(*tensors)
    graph, buffers = trace_values(fn, tensors)
    got = evaluate_values(graph, buffers)
    assert got.dtype == want.dtype and close(got, want).all()


@pytest.mark.parametrize("factory", [lambda x: x.new_empty(()), lambda x: torch.empty(()), lambda x: x.new_zeros([])])
def test_empty_factories_are_zero_constants(factory):
    graph, _ = trace_values(lambda x: factory(x), [sample(torch.int64, 0)])
    assert graph.output.op is Op.CONST and graph.output.arg == 0


def test_factories_of_real_shapes_stay_real_tensors():
    traced = trace_score_mod(lambda s, b, h, q, kv: s + torch.arange(4.0)[q % 4] + torch.ones(3)[h])
    assert len(traced.buffers) == 2


COMBINED = {
    "and": tfa.and_masks(lambda b, h, q, kv: q >= kv, lambda b, h, q, kv: q - kv <= 5),
    "or": tfa.or_masks(lambda b, h, q, kv: q >= kv, lambda b, h, q, kv: kv < 3),
    "noop": tfa.noop_mask,
    "and_noop": tfa.and_masks(tfa.noop_mask, lambda b, h, q, kv: (q + kv) % 3 == 0),
}


@pytest.mark.parametrize("name", COMBINED)
def test_torchs_mask_combinators_trace_and_fold(name):
    mask = COMBINED[name]
    graph = trace_mask_mod(mask).graph
    assert not any(n.op is Op.CONST and isinstance(n.arg, bool) for n in graph.nodes) or len(graph.nodes) == 1
    got = evaluate(graph, index_grid(1, 2, 12, 10), []).expand(1, 2, 12, 10)
    assert torch.equal(got, tfa.create_mask(mask, 1, 2, 12, 10, device="cpu"))


@pytest.mark.parametrize("mod, words", [
    (lambda s, b, h, q, kv: s + torch.special.i0(s), "torch.special.i0 is not supported"),
    (lambda s, b, h, q, kv: s + s.cumsum(0), ".cumsum is not supported"),
    (lambda s, b, h, q, kv: F.relu(s, inplace=True), "inplace=True"),
    (lambda s, b, h, q, kv: s + q.new_ones((2,)), "traced values are scalars"),
    (lambda s, b, h, q, kv: torch.div(s, 2, rounding_mode="round"), "rounding_mode='round'"),
    (lambda s, b, h, q, kv: torch.exp(s, out=s), "no keyword arguments"),
    (lambda s, b, h, q, kv: torch.where(q, s, 0.0), "needs a bool condition"),
    (lambda s, b, h, q, kv: s.erf_(), "in-place"),
])
def test_unsupported_uses_name_the_construct(mod, words):
    with pytest.raises(TraceError, match=None) as info:
        trace_score_mod(mod)
    assert words in str(info.value)
