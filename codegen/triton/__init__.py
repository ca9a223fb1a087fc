"""The Triton back end: mods printed into FlashAttention-style Triton templates.

``compile_kernel(score_graph, mask_graph, options) -> Kernel`` generates (and
caches in memory, keyed by the graphs' structure without constants or buffer
shapes) a Triton module with a forward kernel, dq / dk,dv backward kernels
and split-KV decoding kernels (``codegen.triton.decode``); ``attention(...)``
is the ``codegen.BACKENDS["triton"]`` entry point, with autograd for query,
key, value and the score_mod's floating-point buffers. Decoding shapes (Q_LEN
<= ``split_kv.MAX_Q_LEN``, nothing needing gradients) take the split-KV
kernels, as in the torch back end.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import torch

from flexattn.ir import Graph

from codegen import split_kv
from codegen.triton.kernel import Kernel
from codegen.triton.printer import constant_args
from codegen.triton.source import kernel_source, score_grad_buffers

# structural key -> (source, module); constants are kernel arguments, so they are not in the key.
_MODULES: dict[str, tuple[str, object]] = {}
_SOURCE_DIR = tempfile.mkdtemp(prefix="flexattn_triton_")


def kernel_key(score_graph: Graph | None, mask_graph: Graph | None, options: dict) -> str:
    """The in-memory cache key: both graphs' structure (no constants, no buffer lengths) and options."""
    keys = [g.structural_key(constants=False, shapes=False) if g is not None else "none"
            for g in (score_graph, mask_graph)]
    return "-".join(keys) + "-" + repr(sorted(options.items()))


def _load(source: str, name: str):
    # triton.jit reads a kernel's source from its file, so the module lives on disk.
    path = os.path.join(_SOURCE_DIR, f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"flexattn_triton_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_kernel(score_graph: Graph | None, mask_graph: Graph | None, options: dict | None = None) -> Kernel:
    """A Triton kernel for these mods (cached), bound to these graphs' constants.

    Options: ``BLOCK_SIZE`` (sparse block when ``block_mask`` is None, default
    128), ``FWD_BLOCK_M``/``FWD_BLOCK_N``/``BWD_BLOCK_M``/``BWD_BLOCK_N`` (tiles).
    Raises ``LoweringError`` for an op the printer cannot lower.

    Example::

        >>> kernel = compile_kernel(None, trace_mask_mod(causal).graph, {})
        >>> out, lse, max_scores = kernel(q, k, v, score_buffers=(), mask_buffers=(),
        ...                               block_mask=bm, scale=None, enable_gqa=False)
    """
    options = dict(options or {})
    key = kernel_key(score_graph, mask_graph, options)
    if key not in _MODULES:
        source = kernel_source(score_graph, mask_graph)
        _MODULES[key] = (source, _load(source, f"k{len(_MODULES)}"))
    source, module = _MODULES[key]
    return Kernel(source, module, constant_args(score_graph), constant_args(mask_graph),
                  score_grad_buffers(score_graph), options)


class _Attention(torch.autograd.Function):
    """Forward with the Triton kernel; backward with the dq and dk/dv kernels, for the gradients
    of out and lse (max_scores is not differentiable, as in torch)."""

    @staticmethod
    def forward(ctx, kernel, call, query, key, value, *score_buffers):
        out, lse, max_scores = kernel(query, key, value, score_buffers=score_buffers, **call)
        ctx.kernel, ctx.call = kernel, call
        ctx.save_for_backward(query, key, value, out, lse, *score_buffers)
        ctx.mark_non_differentiable(max_scores)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return out, lse, max_scores

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_max):
        query, key, value, out, lse, *score_buffers = ctx.saved_tensors
        wants = ctx.needs_input_grad[5:]
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        dq, dk, dv, grads = ctx.kernel.backward(query, key, value, out, lse, grad_out, grad_lse=grad_lse,
                                                score_buffers=score_buffers, buffer_grads=any(wants), **ctx.call)
        buffer_grads = [g.to(b.dtype) if (g is not None and want) else None
                        for g, b, want in zip(grads, score_buffers, wants)]
        return (None, None, dq, dk, dv, *buffer_grads)


def attention(query, key, value, *, score_graph, score_buffers, mask_graph, mask_buffers, block_mask,
              scale, enable_gqa, kernel_options):
    """Back-end entry point (see ``codegen.BACKENDS``): compile (cached) and run, differentiably.

    Decoding shapes take ``Kernel.decode`` (split-KV, forward only) instead of
    the general forward; ``kernel_options={"SPLIT_KV": False}`` turns that off.
    """
    kernel = compile_kernel(score_graph, mask_graph, kernel_options)
    call = dict(mask_buffers=tuple(mask_buffers), block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    # At any KV length (the torch back end needs 8 KV tiles before its per-chunk overhead pays): the
    # decode kernel reads each K/V tile once per KV head, the general forward once per query head in
    # tiles padded to BLOCK_M query rows, and the merge is one small launch.
    if split_kv.applies(query, key, value, score_buffers, kernel_options):
        return kernel.decode(query, key, value, score_buffers=score_buffers, **call)
    return _Attention.apply(kernel, call, query, key, value, *score_buffers)


__all__ = ["Kernel", "attention", "compile_kernel", "kernel_key"]
