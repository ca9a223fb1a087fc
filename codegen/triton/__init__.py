"""The Triton back end: mods printed into FlashAttention-style Triton templates.

``compile_kernel(score_graph, mask_graph, options) -> Kernel`` generates (and caches in memory and
on disk, in ``codegen.cache`` like the torch back end's, keyed by the graphs' structure without
constants or buffer shapes) a Triton module with a forward kernel, dq / dk,dv backward kernels and
split-KV decoding kernels (``codegen.triton.decode``). ``PATHS`` is its table of paths: decoding
shapes (``codegen.decoding``) take the split-KV kernels, every other call the block-sparse
kernels, with autograd for query, key, value and the score_mod's floating-point buffers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
import pathlib

from codegen.autograd import differentiable
from codegen.cache import KERNELS, kernel_key
from codegen.decoding import why_not_decoding
from codegen.paths import Path, ServesEveryCall
from codegen.triton.kernel import Kernel
from codegen.triton.printer import constant_args
from codegen.triton.source import kernel_source, score_grad_buffers
from flexattn.call import Call
from flexattn.ir import Graph

# Entries written by another version of these files are stale (rebuilt, never used).
_GENERATOR_FILES = ("templates.py", "printer.py", "source.py", "decode.py")
GENERATOR_VERSION = hashlib.sha256(b"".join((pathlib.Path(__file__).parent / name).read_bytes()
                                            for name in _GENERATOR_FILES)).hexdigest()[:16]
_SCRATCH: list[str] = []  # a directory for modules the disk cache could not hold, made on first use


def load_kernel_module(source: str, filename: str):
    """The generated source imported as a module from a file, since triton.jit reads a kernel's
    source from its file: the cache's entry ``filename`` when it holds this source, else a file in a
    temporary directory."""
    path = pathlib.Path(filename)
    if not (path.suffix == ".py" and path.is_file() and path.read_text().endswith(source)):
        if not _SCRATCH:
            _SCRATCH.append(tempfile.mkdtemp(prefix="flexattn_triton_"))
        path = pathlib.Path(_SCRATCH[0]) / f"{path.stem}.py"
        path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"flexattn_triton_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__flexattn_source__ = source  # without the cache's header line
    return module


def compile_kernel(score_graph: Graph | None, mask_graph: Graph | None, options: dict | None = None) -> Kernel:
    """A Triton kernel for these mods (cached in memory and on disk by ``codegen.cache``, keyed by
    the graphs' structure), bound to these graphs' constants and ``options``.

    Options: ``BLOCK_SIZE`` (sparse block when ``block_mask`` is None, default
    128), ``FWD_BLOCK_M``/``FWD_BLOCK_N``/``BWD_BLOCK_M``/``BWD_BLOCK_N`` (tiles),
    ``SPLIT_KV_CHUNK`` (decoding). Raises ``LoweringError`` for an op the printer cannot lower.

    Example::

        >>> kernel = compile_kernel(None, trace_mask_mod(causal).graph, {})
        >>> out, lse, max_scores = kernel(q, k, v, score_buffers=(), mask_buffers=(),
        ...                               block_mask=bm, scale=None, enable_gqa=False)
    """
    module = KERNELS.get("triton", kernel_key(score_graph, mask_graph), GENERATOR_VERSION,
                         build=lambda: kernel_source(score_graph, mask_graph), load=load_kernel_module)
    return Kernel(module.__flexattn_source__, module, constant_args(score_graph), constant_args(mask_graph),
                  score_grad_buffers(score_graph), dict(options or {}))


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


class BlockSparse(ServesEveryCall):
    name = "block_sparse"
    summary = "the block-sparse FlashAttention kernels (forward, dq and dk/dv backward)"

    def run(self, call: Call):
        return differentiable(_Launch(_kernel(call), call), call.query, call.key, call.value, call.score_buffers)


PATHS: tuple[Path, ...] = (SplitKV(), BlockSparse())

__all__ = ["Kernel", "PATHS", "compile_kernel"]
