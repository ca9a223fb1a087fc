"""The generated loop: compile (cached) and call, with autograd.

``compile_kernel(score_graph, mask_graph)`` returns a ``Kernel`` whose ``source`` is the generated
module (the mods printed as torch expressions over tile index tensors, and the block-sparse
forward/backward loops of ``template``). Kernels are cached in memory and on disk
(``codegen.cache``) by the graphs' structural keys *without* constant values or buffer shapes:
constants and buffers are run-time arguments, so a new window size, document layout or bias
table reuses the kernel; so do new sequence lengths, batch sizes and options. The kernel does not
depend on the input dtype (the compute float is chosen at run time).

``Kernel(call)`` plans the block-sparse rows (``tiles.plan_rows``), runs the generated
``forward`` and, when gradients are needed, records it with ``codegen.autograd`` so that the
backward runs the generated ``backward``. The generated code runs eagerly, not wrapped in
``torch.compile``: eager already spends its time in matmul/exp kernels on this code, and
compiling costs seconds on a first call (docs/performance.md).

Inside a user's ``torch.compile``d function the kernel is a graph break (``torch.compiler.disable``):
it runs eagerly between the compiled graphs, and gradients still flow through it. The disabled
entry is made on first use while ``torch._dynamo`` is loaded (only then can a caller be compiling),
because importing it is slow.
"""

from __future__ import annotations

import hashlib
import linecache
import sys
from pathlib import Path

import torch

from codegen.autograd import differentiable
from codegen.cache import KERNELS, kernel_key
from codegen.torch_backend.template import kernel_source
from codegen.torch_backend.tiles import plan_rows
from flexattn.call import Call, compute_dtype
from flexattn.ir import Graph, constants_of
from flexattn.memo import Memo

DEFAULT_MAX_TILES = 16
# Kernels written by another version of the generator are stale (rebuilt, never used).
_GENERATOR_FILES = ("template.py", "printer.py", "runtime.py", "tiles.py")


def _generator_version() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _GENERATOR_FILES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:16]


GENERATOR_VERSION = _generator_version()


def _load(source: str, filename: str) -> dict:
    """Execute generated source as a module namespace (registered so tracebacks show its lines)."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": f"flexattn_kernel_{Path(filename).stem}", "__source__": source}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def compile_kernel(score_graph: Graph | None, mask_graph: Graph | None) -> "Kernel":
    """The generated loop for these mods (cached), bound to these graphs' constants.

    Returns a ``Kernel``; call it with a ``flexattn.call.Call`` -> ``(out, lse, max_scores)``.
    Raises ``LoweringError`` for an op the printer cannot lower.

    Example::

        >>> kernel = compile_kernel(None, trace_mask_mod(causal).graph)
        >>> out, lse, max_scores = kernel(call)
    """
    namespace = KERNELS.get("torch", kernel_key(score_graph, mask_graph), GENERATOR_VERSION,
                            build=lambda: kernel_source(score_graph, mask_graph), load=_load)
    return Kernel(namespace, constants_of(score_graph), constants_of(mask_graph))


class _Launch:
    """One run of the generated loop: its rows of pieces, KV tile size, scale, the graphs'
    constants and the mask buffers (everything besides the tensors autograd tracks)."""

    def __init__(self, namespace, rows, kv_block, scale, consts, mask_buffers):
        self.namespace, self.rows, self.kv_block, self.scale = namespace, rows, kv_block, scale
        self.score_consts, self.mask_consts = consts
        self.mask_buffers = mask_buffers

    def forward(self, q, k, v, score_buffers):
        compute = compute_dtype(q.dtype)
        out, lse, max_scores = self.namespace["forward"](
            q.to(compute), k.to(compute), v.to(compute), self.rows, self.kv_block, self.scale,
            score_buffers, self.score_consts, self.mask_buffers, self.mask_consts)
        return out.to(q.dtype), lse, max_scores

    def backward(self, q, k, v, out, lse, grad_out, grad_lse, score_buffers, slots):
        compute = lse.dtype
        grad_q, grad_k, grad_v, grad_buffers = self.namespace["backward"](
            q.to(compute), k.to(compute), v.to(compute), out.to(compute), lse, grad_out.to(compute),
            None if grad_lse is None else grad_lse.to(compute), self.rows, self.kv_block, self.scale,
            score_buffers, slots, self.score_consts, self.mask_buffers, self.mask_consts)
        grad_buffers = [g.to(score_buffers[i].dtype) for i, g in zip(slots, grad_buffers)]
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_buffers


class Kernel:
    """A generated loop; ``source`` is its Python source.

    ``kernel(call) -> (out, lse, max_scores)``: out (B, Hq, L, Ev) in query's dtype, lse and
    max_scores (B, Hq, L) in the compute float (``flexattn.call.compute_dtype``).
    ``kernel_options``: ``max_tiles`` (KV tiles per gathered piece, default 16); without a
    BlockMask every tile of ``BLOCK_SIZE`` (default 128) is FULL.
    """

    def __init__(self, namespace: dict, score_constants: list, mask_constants: list):
        self.namespace = namespace
        self.constants = (score_constants, mask_constants)

    @property
    def source(self) -> str:
        return self.namespace["__source__"]

    def __call__(self, call: Call):
        return outside_compiled_graphs(Kernel.run)(self, call)

    def run(self, call: Call):
        """The kernel call (see the class docstring), without the torch.compile guard."""
        launch = _Launch(self.namespace, rows_of(call), call.block_size[1], call.scale, self.constants,
                         call.mask_buffers)
        if not call.needs_grad:
            return launch.forward(call.query, call.key, call.value, call.score_buffers)
        return differentiable(launch, call.query, call.key, call.value, call.score_buffers)


_UNMASKED_ROWS = Memo(limit=64)  # the rows of calls without a BlockMask, by shapes


def rows_of(call: Call) -> list:
    """``tiles.plan_rows`` of the call: kept with its BlockMask (``BlockMask.derived``), or by shapes
    without one; a plan depends on the mask's tile lists, the lengths, the tile size, max_tiles and
    the GQA group."""
    _, _, _, L, S = call.shape
    block_mask, block_size = call.block_mask, call.block_size
    key = (L, S, block_size, int(call.options.get("max_tiles", DEFAULT_MAX_TILES)), call.group)
    compute = lambda: plan_rows(block_mask, *key)  # noqa: E731
    if block_mask is None:
        return _UNMASKED_ROWS.get(key, (), (), compute)
    return block_mask.derived("rows", key, compute)


_disabled: dict = {}


def outside_compiled_graphs(fn):
    """``fn``, behind ``torch.compiler.disable`` once torch._dynamo is loaded (only then can a
    caller be compiling): a graph break for a compiling caller, plain ``fn`` otherwise."""
    if "torch._dynamo" not in sys.modules:
        return fn
    if fn not in _disabled:
        _disabled[fn] = torch.compiler.disable(fn)
    return _disabled[fn]
