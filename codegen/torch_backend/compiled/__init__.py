"""The compiled generic path of the torch back end: the eager loop's per-tile work as compiled kernels.

``kernel_for(...)`` is the whole interface: for a call that reaches the
generic block-sparse loop it returns a ``kernel.Kernel`` whose per-tile
elementwise work (score_mod, mask, online softmax; the backward's dS through
the score_mod) runs as ``torch.compile``d C++ (``source``, ``loop``), or None
while that kernel is still compiling in the background, when compilation
failed (a one-time warning says why) or when ``kernel_options["COMPILED"]``
is False: the caller then runs the eager kernel. Matmuls stay on BLAS.
``kernel_options["COMPILED"]``: ``"auto"`` (default) tiered as above;
``True`` waits for the compiled kernel (benchmarks, tests); ``False`` never
compiles. The environment variable ``FLEXATTN_COMPILED=0`` makes the default
``"auto"`` behave as False (the test suite sets it: tests of this path ask
for it explicitly). See ``tier`` for the cache and the signatures compiled
per kernel.
"""

from __future__ import annotations

import functools
import os

import torch

from codegen.torch_backend.compiled import tier
from codegen.torch_backend.compiled.tier import STATS
from codegen.torch_backend.kernel import DEFAULT_MAX_TILES, Kernel, check_heads
from codegen.torch_backend.printer import constants_of
from codegen.torch_backend.tiles import plan_rows
from flexattn.block_mask import DEFAULT_BLOCK_SIZE, _pair
from flexattn.errors import LoweringError


def kernel_for(score_graph, mask_graph, kernel_options: dict, kernel_key, query, key, value, *, score_buffers,
               mask_buffers, block_mask, scale: float, enable_gqa: bool) -> Kernel | None:
    """The compiled kernel for this call, or None where the eager kernel serves (see the module docstring).

    ``kernel_key(score_graph, mask_graph, options)`` is the eager kernel's cache key; ``kernel_options``
    without the dispatch-only keys are the kernel's options. Shapes as ``kernel.Kernel``. Raises
    ``LoweringError`` for head counts that do not fit (as the eager kernel does); an op the printer
    cannot lower returns None (the eager kernel raises it).

    Example::

        >>> kernel = kernel_for(graph, None, {"COMPILED": True}, kernel_key, q, k, v, score_buffers=(),
        ...                     mask_buffers=(), block_mask=bm, scale=0.125, enable_gqa=False)
        >>> out, lse, max_scores = kernel(q, k, v, score_buffers=(), mask_buffers=(), block_mask=bm, scale=0.125)
    """
    mode = kernel_options.get("COMPILED", "auto")
    if mode == "auto" and os.environ.get("FLEXATTN_COMPILED", "").lower() in ("0", "false", "no", "off"):
        return None
    if mode is False:
        return None
    check_heads(query.shape[1], key.shape[1], enable_gqa)
    options = {name: value for name, value in kernel_options.items()
               if name in ("BLOCK_SIZE", "max_tiles")}
    try:
        # The tile source depends on the mods only (tile sizes are run-time values).
        item = tier.entry(kernel_key(score_graph, mask_graph, {}), score_graph, mask_graph)
    except LoweringError:
        return None
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, *score_buffers))
    slots = [i for i, t in enumerate(score_buffers) if t.requires_grad] if needs_grad else None
    sig = tier.signature(query, score_buffers, mask_buffers, block_mask, slots)
    state = tier.state(item, sig)
    if state is None:
        consts = (constants_of(score_graph), constants_of(mask_graph))
        tier.request(item, sig, functools.partial(
            _compile, item, query, key, value, block_mask, options, scale, tuple(score_buffers),
            tuple(mask_buffers), consts, slots))
    if mode is True and state != tier.READY:
        state = tier.wait(item, sig)
    if state == tier.FAILED:
        tier.warn_once(item, sig)
    if state != tier.READY:
        return None
    STATS["served"] += 1
    return Kernel(item.namespace_for(), options, constants_of(score_graph), constants_of(mask_graph),
                  has_score_mod=score_graph is not None)


def _compile(item, query, key, value, block_mask, options, scale, score_buffers, mask_buffers, consts, slots):
    """The background job: plan the call's rows as ``Kernel.run`` does, then ``tier.warm_up``."""
    block = block_mask.BLOCK_SIZE if block_mask is not None else _pair(options.get("BLOCK_SIZE", DEFAULT_BLOCK_SIZE))
    rows = plan_rows(block_mask, query.shape[2], key.shape[2], block, int(options.get("max_tiles", DEFAULT_MAX_TILES)))
    tier.warm_up(item, query, key, value, rows, block[1], scale, score_buffers, consts[0], mask_buffers, consts[1],
                 slots)


def wait_all() -> None:
    """Block until every queued compilation is done (benchmarks measuring time-to-compiled).

    Example: ``flexattn.flex_attention(q, k, v, score_mod=softcap); wait_all()``.
    """
    tier.drain()


__all__ = ["STATS", "kernel_for", "wait_all"]
