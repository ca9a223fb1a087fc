"""The Triton back end: mods printed into FlashAttention-style Triton templates.

``compile_kernel(score_graph, mask_graph, options) -> Kernel`` generates (and caches in memory,
keyed by ``codegen.cache.kernel_key``, the graphs' structure without constants or buffer shapes,
plus the options) a Triton module with a forward kernel, dq / dk,dv backward kernels and
split-KV decoding kernels (``codegen.triton.decode``). ``PATHS`` is its table of paths: decoding
shapes (``codegen.decoding``) take the split-KV kernels, every other call the block-sparse
kernels, with autograd for query, key, value and the score_mod's floating-point buffers.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

from codegen.autograd import differentiable
from codegen.cache import kernel_key
from codegen.decoding import why_not_decoding
from codegen.paths import Path
from codegen.triton.kernel import Kernel
from codegen.triton.printer import constant_args
from codegen.triton.source import kernel_source, score_grad_buffers
from flexattn.call import Call
from flexattn.ir import Graph

# key -> (source, module); constants are kernel arguments, so they are not in the key.
_MODULES: dict[str, tuple[str, object]] = {}
_SOURCE_DIR: list[str] = []  # the directory of generated modules, made on first use


def _load(source: str, name: str):
    # triton.jit reads a kernel's source from its file, so the module lives on disk.
    if not _SOURCE_DIR:
        _SOURCE_DIR.append(tempfile.mkdtemp(prefix="flexattn_triton_"))
    path = os.path.join(_SOURCE_DIR[0], f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"flexattn_triton_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_kernel(score_graph: Graph | None, mask_graph: Graph | None, options: dict | None = None) -> Kernel:
    """A Triton kernel for these mods (cached), bound to these graphs' constants.

    Options: ``BLOCK_SIZE`` (sparse block when ``block_mask`` is None, default
    128), ``FWD_BLOCK_M``/``FWD_BLOCK_N``/``BWD_BLOCK_M``/``BWD_BLOCK_N`` (tiles),
    ``SPLIT_KV_CHUNK`` (decoding). Raises ``LoweringError`` for an op the printer cannot lower.

    Example::

        >>> kernel = compile_kernel(None, trace_mask_mod(causal).graph, {})
        >>> out, lse, max_scores = kernel(q, k, v, score_buffers=(), mask_buffers=(),
        ...                               block_mask=bm, scale=None, enable_gqa=False)
    """
    options = dict(options or {})
    key = kernel_key(score_graph, mask_graph) + repr(sorted(options.items()))
    if key not in _MODULES:
        source = kernel_source(score_graph, mask_graph)
        _MODULES[key] = (source, _load(source, f"k{len(_MODULES)}"))
    source, module = _MODULES[key]
    return Kernel(source, module, constant_args(score_graph), constant_args(mask_graph),
                  score_grad_buffers(score_graph), options)


def _kernel(call: Call) -> Kernel:
    return compile_kernel(call.score_graph, call.mask_graph, dict(call.options))


def _mods(call: Call) -> dict:
    return dict(mask_buffers=call.mask_buffers, block_mask=call.block_mask, scale=call.scale,
                enable_gqa=call.enable_gqa)


class _Launch:
    """The block-sparse kernels as ``codegen.autograd`` runs them."""

    def __init__(self, kernel: Kernel, call: Call):
        self.kernel, self.mods = kernel, _mods(call)

    def forward(self, q, k, v, score_buffers):
        return self.kernel(q, k, v, score_buffers=score_buffers, **self.mods)

    def backward(self, q, k, v, out, lse, grad_out, grad_lse, score_buffers, slots):
        dq, dk, dv, grads = self.kernel.backward(q, k, v, out, lse, grad_out.contiguous(), grad_lse=grad_lse,
                                                 score_buffers=score_buffers, buffer_grads=bool(slots), **self.mods)
        return dq, dk, dv, [None if grads[i] is None else grads[i].to(score_buffers[i].dtype) for i in slots]


class SplitKV(Path):
    name = "decode_split_kv"
    summary = ("split-KV decoding kernels: the query heads of a KV head in one tile, KV splits merged by "
               "log-sum-exp (at any KV length: each K/V tile is read once per KV head)")

    def why_not(self, call: Call) -> str | None:
        return why_not_decoding(call)

    def run(self, call: Call):
        return _kernel(call).decode(call.query, call.key, call.value, score_buffers=call.score_buffers,
                                    **_mods(call))


class BlockSparse(Path):
    name = "block_sparse"
    summary = "the block-sparse FlashAttention kernels (forward, dq and dk/dv backward)"

    def why_not(self, call: Call) -> str | None:
        return None  # serves every call

    def run(self, call: Call):
        return differentiable(_Launch(_kernel(call), call), call.query, call.key, call.value, call.score_buffers)


PATHS: tuple[Path, ...] = (SplitKV(), BlockSparse())

__all__ = ["Kernel", "PATHS", "compile_kernel"]
