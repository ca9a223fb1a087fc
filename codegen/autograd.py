"""The one autograd Function every differentiable path runs through.

A path hands ``differentiable`` an implementation with two methods:

* ``forward(q, k, v, score_buffers) -> (out, lse, max_scores or None)``;
* ``backward(q, k, v, out, lse, grad_out, grad_lse, score_buffers, slots) -> (dq, dk, dv, grads)``:
  ``grad_lse`` may be None (the lse is unused), ``grads`` the gradients of ``score_buffers[i]``
  for ``i`` in ``slots`` (the buffers autograd asks about), in that order.

Gradients flow to q, k, v and the score buffers from out and lse; max_scores is not
differentiable, as in torch.
"""

from __future__ import annotations

import torch


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, q, k, v, *score_buffers):
        out, lse, max_scores = impl.forward(q, k, v, score_buffers)
        ctx.impl = impl
        ctx.save_for_backward(q, k, v, out, lse, *score_buffers)
        if max_scores is not None:
            ctx.mark_non_differentiable(max_scores)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return out, lse, max_scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse, _grad_max):
        q, k, v, out, lse, *score_buffers = ctx.saved_tensors
        slots = [i for i in range(len(score_buffers)) if ctx.needs_input_grad[4 + i]]
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        dq, dk, dv, grads = ctx.impl.backward(q, k, v, out, lse, grad_out, grad_lse, score_buffers, slots)
        by_slot = dict(zip(slots, grads))
        return (None, dq, dk, dv, *(by_slot.get(i) for i in range(len(score_buffers))))


def differentiable(impl, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_buffers=()):
    """``impl.forward(q, k, v, score_buffers)`` recorded for autograd (see the module docstring).

    Example::

        >>> out, lse, max_scores = differentiable(launch, q, k, v, call.score_buffers)
    """
    return _Attention.apply(impl, q, k, v, *score_buffers)
