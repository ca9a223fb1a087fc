"""The table of back ends, and running a ``Call`` on one: the API's side of the arrow to codegen.

``BACKENDS`` names the module of each back end (imported on first use); each module has an
ordered ``PATHS`` table (``codegen.paths``). ``choose(backend, call)`` says which path serves a
call and why the earlier ones do not; ``run(backend, call)`` computes it. ``call_of`` builds the
``Call`` of traced graphs (the analysis facts included), as ``flex_attention`` does.
"""

from __future__ import annotations

import importlib
import importlib.util

from codegen.paths import Choice
from codegen.paths import choose as choose_path
from flexattn.block_mask import BlockMask
from flexattn.call import Call
from flexattn.errors import InputError
from flexattn.facts import analyse
from flexattn.ir import Graph

BACKENDS = {
    "reference": "codegen.reference",
    "torch": "codegen.torch_backend",
    "triton": "codegen.triton",
}


def backend_module(backend: str):
    """The module of ``backend`` (its ``PATHS``; ``compile_kernel`` for generating back ends).

    Raises ``InputError`` for a name not in ``BACKENDS``.
    """
    _check_name(backend)
    return importlib.import_module(BACKENDS[backend])


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")


def default_backend(device_type: str) -> str:
    """The back end ``backend="auto"`` picks for tensors on ``device_type``: "torch" on CPU."""
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch" if device_type == "cpu" else "reference"


def pick_backend(backend: str, device_type: str) -> str:
    """``backend``, or for "auto" the default of ``device_type``; ``InputError`` for an unknown name."""
    if backend == "auto":
        return default_backend(device_type)
    _check_name(backend)  # the module is imported when the call runs (Triton's when a Triton call does)
    return backend


def call_of(query, key, value, *, score_graph: Graph | None = None, score_buffers=(), mask_graph: Graph | None = None,
            mask_buffers=(), block_mask: BlockMask | None = None, scale: float | None = None, enable_gqa: bool = False,
            kernel_options=None, max_scores: bool = False) -> Call:
    """The ``Call`` of validated tensors and traced graphs, with its analysis facts (``flexattn.facts``).

    query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev); ``kernel_options`` already
    normalised (``flexattn.kernel_options.normalize``). Raises ``InputError`` for head counts that
    do not fit.

    Example::

        >>> mask = trace_mask_mod(causal)
        >>> call = call_of(q, k, v, mask_graph=mask.graph, mask_buffers=mask.buffers, block_mask=bm)
        >>> run("torch", call)[0].shape == q.shape
        True
    """
    return Call(query, key, value, score_graph=score_graph, score_buffers=tuple(score_buffers), mask_graph=mask_graph,
                mask_buffers=tuple(mask_buffers), block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                options=dict(kernel_options or {}), facts=analyse(score_graph, mask_graph, mask_buffers, block_mask, query.shape[0], query.shape[1]),
                max_scores=max_scores)


def choose(backend: str, call: Call) -> Choice:
    """The ``codegen.paths.Choice`` of ``backend`` for ``call`` (see ``codegen.paths.choose``)."""
    return choose_path(backend, backend_module(backend).PATHS, call)


def run(backend: str, call: Call):
    """``(out, lse, max_scores)`` of ``call`` on the path ``backend`` chooses for it."""
    try:
        return choose(backend, call).path.run(call)
    finally:
        call.release()
