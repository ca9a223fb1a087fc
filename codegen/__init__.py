"""flexattn's compiler back ends: one module (or package) per target.

Every back end is called the same way (``BACKENDS[name](query, key, value,
*, score_graph, score_buffers, mask_graph, mask_buffers, block_mask, scale,
enable_gqa, kernel_options) -> (out, lse, max_scores)``) and sees only IR
graphs, buffer tensors and the BlockMask, never the user's callables.
``max_scores`` may be None unless ``kernel_options["OUTPUT_MAX_SCORES"]`` is
set (``flex_attention`` sets it when ``return_aux`` asks for max_scores).

Back ends that generate kernels also expose ``compile_kernel(score_graph,
mask_graph, options) -> Kernel`` in their module; ``compile_kernel`` below
dispatches to it. Modules are imported lazily, on first use.
"""

from __future__ import annotations

import importlib
import importlib.util

# Back end name -> the module that implements it (``attention`` and, for
# generating back ends, ``compile_kernel``).
_MODULES = {
    "reference": "codegen.reference",
    "torch": "codegen.torch_backend",
    "triton": "codegen.triton",
}


def _module(backend: str):
    if backend not in _MODULES:
        from flexattn.errors import LoweringError

        raise LoweringError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, _MODULES))}")
    return importlib.import_module(_MODULES[backend])


def _lazy(backend: str):
    def run(*args, **kwargs):
        return _module(backend).attention(*args, **kwargs)

    run.__name__ = f"{backend}_attention"
    return run


BACKENDS = {name: _lazy(name) for name in _MODULES}


def compile_kernel(backend: str, score_graph, mask_graph, options: dict | None = None):
    """Compile (or fetch from the cache) ``backend``'s kernel for these IR graphs.

    Returns the back end's ``Kernel`` (``.source`` is the generated code).
    Raises ``LoweringError`` for an unknown or non-generating back end.

    Example::

        >>> kernel = compile_kernel("torch", None, trace_mask_mod(causal).graph, {})
    """
    module = _module(backend)
    if not hasattr(module, "compile_kernel"):
        from flexattn.errors import LoweringError

        raise LoweringError(f"backend {backend!r} does not generate kernels")
    return module.compile_kernel(score_graph, mask_graph, dict(options or {}))


def default_backend(device_type: str) -> str:
    """The back end ``backend="auto"`` picks for tensors on ``device_type``: "torch" on CPU."""
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch" if device_type == "cpu" else "reference"
