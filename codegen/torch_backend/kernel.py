"""A compiled torch kernel: the generated module bound to constants, with autograd.

``Kernel.__call__`` plans the block-sparse rows (``tiles.plan_rows``), runs
the generated ``forward`` and, when gradients are needed, wraps it in an
``autograd.Function`` whose backward runs the generated ``backward``.

Inside a user's ``torch.compile``d function the kernel is a graph break
(``torch.compiler.disable``): it runs eagerly between the compiled graphs,
and gradients still flow through its autograd.Function. The disabled entry
is made on first use while ``torch._dynamo`` is loaded (only then can a
caller be compiling), because importing it costs about a second.
"""

from __future__ import annotations

import math
import sys

import torch

from codegen.torch_backend.tiles import plan_rows
from flexattn.block_mask import DEFAULT_BLOCK_SIZE, _pair
from flexattn.errors import LoweringError

DEFAULT_MAX_TILES = 16


def check_heads(Hq: int, Hkv: int, enable_gqa: bool) -> None:
    """Raise ``LoweringError`` unless Hq == Hkv, or GQA is enabled and Hq is a multiple of Hkv."""
    if Hq != Hkv and not (enable_gqa and Hq % Hkv == 0):
        raise LoweringError(f"query has {Hq} heads and key/value {Hkv}: grouped-query attention needs "
                            "enable_gqa=True and a query head count that is a multiple of the KV heads")


class _BlockSparseAttention(torch.autograd.Function):
    """out, lse, max_scores of attention; grads of out and lse for q, k, v and floating score
    buffers (max_scores is not differentiable, as in torch)."""

    @staticmethod
    def forward(ctx, call, q, k, v, *score_buffers):
        out, lse, max_scores = call.forward(q, k, v, score_buffers)
        ctx.call = call
        ctx.save_for_backward(q, k, v, out, lse, *score_buffers)
        ctx.mark_non_differentiable(max_scores)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return out, lse, max_scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse, _grad_max):
        q, k, v, out, lse, *score_buffers = ctx.saved_tensors
        slots = [i for i, buf in enumerate(score_buffers) if ctx.needs_input_grad[4 + i]]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_q, grad_k, grad_v, grad_buffers = ctx.call.backward(
            q, k, v, out, lse, grad_out, grad_lse, score_buffers, slots)
        by_slot = dict(zip(slots, grad_buffers))
        grads_of_buffers = [by_slot.get(i) for i in range(len(score_buffers))]
        return (None, grad_q, grad_k, grad_v, *grads_of_buffers)


class _Call:
    """Everything one call needs besides the tensors autograd tracks."""

    def __init__(self, namespace, rows, kv_block, scale, consts, mask_buffers):
        self.namespace, self.rows, self.kv_block, self.scale = namespace, rows, kv_block, scale
        self.score_consts, self.mask_consts = consts
        self.mask_buffers = mask_buffers

    def forward(self, q, k, v, score_buffers):
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse, max_scores = self.namespace["forward"](
            q.to(compute), k.to(compute), v.to(compute), self.rows, self.kv_block, self.scale,
            score_buffers, self.score_consts, self.mask_buffers, self.mask_consts)
        return out.to(q.dtype), lse, max_scores

    def backward(self, q, k, v, out, lse, grad_out, grad_lse, score_buffers, slots):
        compute = lse.dtype
        grad_q, grad_k, grad_v, grad_buffers = self.namespace["backward"](
            q.to(compute), k.to(compute), v.to(compute), out.to(compute), lse, grad_out.to(compute),
            None if grad_lse is None else grad_lse.to(compute), self.rows, self.kv_block, self.scale,
            score_buffers, slots, self.score_consts,
            self.mask_buffers, self.mask_consts)
        grad_buffers = [g.to(score_buffers[i].dtype) for i, g in zip(slots, grad_buffers)]
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_buffers


class Kernel:
    """A generated kernel; ``source`` is its Python source.

    Call as ``kernel(query, key, value, *, score_buffers, mask_buffers,
    block_mask, scale, enable_gqa) -> (out, lse, max_scores)`` with query
    (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev); out is
    (B, Hq, L, Ev) in query's dtype, lse/max_scores (B, Hq, L) float32
    (float64 for float64 inputs). ``block_mask`` None attends everywhere.
    ``score_constants``/``mask_constants`` override the constants of the
    graphs the kernel was compiled from (see ``printer.constants_of``).

    Raises ``LoweringError`` when the head counts do not fit (GQA needs Hq a
    multiple of Hkv and ``enable_gqa=True``).
    """

    def __init__(self, namespace: dict, options: dict, score_constants: list, mask_constants: list,
                 has_score_mod: bool):
        self.namespace = namespace
        self.options = options
        self.score_constants, self.mask_constants = score_constants, mask_constants
        self.has_score_mod = has_score_mod

    @property
    def source(self) -> str:
        return self.namespace["__source__"]

    def __call__(self, query, key, value, **kwargs):
        return outside_compiled_graphs(Kernel.run)(self, query, key, value, **kwargs)

    def run(self, query, key, value, *, score_buffers=(), mask_buffers=(), block_mask=None, scale=None,
            enable_gqa=False, score_constants=None, mask_constants=None):
        """The kernel call (see the class docstring), without the torch.compile guard."""
        check_heads(query.shape[1], key.shape[1], enable_gqa)
        L, S = query.shape[2], key.shape[2]
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
        if block_mask is not None:
            block_size = block_mask.BLOCK_SIZE
        else:
            block_size = _pair(self.options.get("BLOCK_SIZE", DEFAULT_BLOCK_SIZE))
        rows = plan_rows(block_mask, L, S, block_size, int(self.options.get("max_tiles", DEFAULT_MAX_TILES)))
        consts = (self.score_constants if score_constants is None else list(score_constants),
                  self.mask_constants if mask_constants is None else list(mask_constants))
        call = _Call(self.namespace, rows, block_size[1], scale, consts, tuple(mask_buffers))
        score_buffers = tuple(score_buffers)
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (query, key, value, *score_buffers))
        if not needs_grad:
            return call.forward(query, key, value, score_buffers)
        return _BlockSparseAttention.apply(call, query, key, value, *score_buffers)


_disabled: dict = {}


def outside_compiled_graphs(fn):
    """``fn``, behind ``torch.compiler.disable`` once torch._dynamo is loaded (only then can a
    caller be compiling): a graph break for a compiling caller, plain ``fn`` otherwise."""
    if "torch._dynamo" not in sys.modules:
        return fn
    if fn not in _disabled:
        _disabled[fn] = torch.compiler.disable(fn)
    return _disabled[fn]
