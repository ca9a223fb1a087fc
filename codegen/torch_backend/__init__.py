"""The torch back end: IR -> generated block-sparse flash attention in torch code.

``compile_kernel(score_graph, mask_graph, options)`` returns a ``Kernel``
whose ``source`` is the generated module (the mods printed as torch
expressions over tile index tensors, and the block-sparse forward/backward
loops of ``template``). Kernels are cached in memory and on disk
(``codegen.cache``) by the graphs' structural keys *without* constant values
or buffer shapes, plus the options: constants and buffers are run-time
arguments, so a new window size, document layout or bias table reuses the
kernel; so do new sequence lengths and batch sizes. The kernel does not
depend on the input dtype (the compute float is chosen at run time).

This generated code runs eagerly, so a new mod's first call is fast; the
compiled generic path (``compiled``: the per-tile elementwise work as
``torch.compile``d C++, built in a background thread) takes over once its
kernel is ready (see docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import math
import linecache
from pathlib import Path

import torch

from codegen import split_kv
from codegen.cache import KERNELS
from codegen.torch_backend import compiled, fused
from codegen.torch_backend.kernel import Kernel, check_heads, outside_compiled_graphs
from codegen.torch_backend.printer import constants_of
from codegen.torch_backend.template import kernel_source
from flexattn.analysis.separable import separate
from flexattn.block_mask import DEFAULT_BLOCK_SIZE, _pair
from flexattn.ir import Graph

# Kernels written by another version of the generator are stale (rebuilt, never used).
_GENERATOR_FILES = ("template.py", "printer.py", "runtime.py", "tiles.py")


def _generator_version() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _GENERATOR_FILES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


GENERATOR_VERSION = _generator_version()
_DISPATCH_OPTIONS = ("FUSED", "OUTPUT_MAX_SCORES", "SPLIT_KV", "SPLIT_KV_CHUNK", "COMPILED")


def kernel_key(score_graph: Graph | None, mask_graph: Graph | None, options: dict) -> str:
    """The cache key: structure of both mods (no constants, no buffer shapes) + options."""
    parts = [
        score_graph.structural_key(constants=False, shapes=False) if score_graph is not None else "-",
        mask_graph.structural_key(constants=False, shapes=False) if mask_graph is not None else "-",
        repr(sorted((str(k), repr(v)) for k, v in options.items())),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _load(source: str, filename: str) -> dict:
    """Execute generated source as a module namespace (registered so tracebacks show its lines)."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": f"flexattn_kernel_{Path(filename).stem}", "__source__": source}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def compile_kernel(score_graph: Graph | None, mask_graph: Graph | None, options: dict | None = None) -> Kernel:
    """A kernel for these mods (cached), bound to these graphs' constants.

    Returns a ``Kernel``; call it as ``kernel(query, key, value, *,
    score_buffers, mask_buffers, block_mask, scale, enable_gqa) -> (out, lse,
    max_scores)``. Options: ``max_tiles`` (KV tiles per gathered chunk,
    default 16), ``BLOCK_SIZE`` (tile size when ``block_mask`` is None,
    default 128). Raises ``LoweringError`` for an op the printer cannot lower.

    Example::

        >>> kernel = compile_kernel(None, trace_mask_mod(causal).graph, {})
        >>> out, lse, max_scores = kernel(q, k, v, score_buffers=(), mask_buffers=(),
        ...                               block_mask=bm, scale=None, enable_gqa=False)
    """
    # Options that only choose a path are not part of the kernel (nor of its cache key).
    options = {name: value for name, value in (options or {}).items() if name not in _DISPATCH_OPTIONS}
    key = kernel_key(score_graph, mask_graph, options)
    namespace = KERNELS.get("torch", key, GENERATOR_VERSION,
                            build=lambda: kernel_source(score_graph, mask_graph), load=_load)
    return Kernel(namespace, options, constants_of(score_graph), constants_of(mask_graph),
                  has_score_mod=score_graph is not None)


def attention(query, key, value, *, score_graph, score_buffers, mask_graph, mask_buffers, block_mask,
              scale, enable_gqa, kernel_options):
    """Back-end entry point (see ``codegen.BACKENDS``): compile (cached) and run.

    Decoding shapes (a few query rows against a long cache, no gradients) take
    the split-KV path instead, which reads each KV tile once per KV head.
    Without a score_mod, or with one that adds a separable bias (and without a
    request for max_scores), attention runs on torch's fused CPU flash kernel
    (``fused``: per document, causal triangles, rectangles of FULL tiles,
    batches of PARTIAL tiles) when its plan pays (``fused_plan.pays``);
    ``kernel_options={"FUSED": True}`` / ``False`` forces it / the generated
    loop. max_scores is then None.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if _is_decode(query, key, value, score_buffers, block_mask, kernel_options):
        return split_kv.decode_attention(
            query, key, value, score_graph=score_graph, score_buffers=score_buffers, mask_graph=mask_graph,
            mask_buffers=mask_buffers, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
            kernel_options=kernel_options)
    # A score_mod that adds a separable bias (ALiBi) runs fused too, unless its buffers need grads.
    buffers_need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in score_buffers)
    bias = separate(score_graph) if score_graph is not None and not buffers_need_grad else None
    if fused.fusable(query, key, value, score_graph, bias, kernel_options):
        check_heads(query.shape[1], key.shape[1], enable_gqa)
        block = _pair(block_mask.BLOCK_SIZE if block_mask is not None
                      else kernel_options.get("BLOCK_SIZE", DEFAULT_BLOCK_SIZE))
        result = outside_compiled_graphs(fused.attention)(
            query, key, value, block_mask=block_mask, mask_graph=mask_graph, mask_buffers=mask_buffers,
            block_size=block, scale=scale, force=kernel_options.get("FUSED") is True, bias=bias,
            score_buffers=score_buffers)
        if result is not None:
            return result
    # --- compiled generic path (issue 18): its kernel once compiled in the background, else the eager loop.
    kernel = compiled.kernel_for(score_graph, mask_graph, kernel_options, kernel_key, query, key, value,
                                 score_buffers=score_buffers, mask_buffers=mask_buffers, block_mask=block_mask,
                                 scale=scale, enable_gqa=enable_gqa)
    if kernel is None:
        kernel = compile_kernel(score_graph, mask_graph, kernel_options)
    return kernel(query, key, value, score_buffers=score_buffers, mask_buffers=mask_buffers,
                  block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _is_decode(query, key, value, score_buffers, block_mask, kernel_options) -> bool:
    """Split-KV pays when Q_LEN <= 16 and KV_LEN spans at least 8 KV tiles (measured; docs/performance.md)."""
    block = block_mask.BLOCK_SIZE if block_mask is not None else kernel_options.get("BLOCK_SIZE", DEFAULT_BLOCK_SIZE)
    return (split_kv.applies(query, key, value, score_buffers, kernel_options)
            and key.shape[2] >= 8 * _pair(block)[1])


__all__ = ["Kernel", "attention", "compile_kernel", "kernel_key"]
