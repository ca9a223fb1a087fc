"""The compiled generic path of the torch back end: the eager loop's per-tile work as compiled kernels.

``kernel_for(...)`` is the whole interface: for a call that reaches the
generic block-sparse loop it returns a ``kernel.Kernel`` whose per-tile
elementwise work (score_mod, mask, online softmax; the backward's dS through
the score_mod) runs as ``torch.compile``d C++ (``source``, ``loop``), or None
while that kernel is still compiling in the background, when compilation
failed (a one-time warning says why) or when ``kernel_options["COMPILED"]``
is False: the caller then runs the eager kernel. Matmuls stay on BLAS.
``kernel_options["COMPILED"]``: ``"auto"`` (default) tiered as above for calls with a score_mod
(mask-only calls keep the eager loop, faster there), the compilation
requested from a signature's ``tier.COMPILE_AFTER_CALLS``-th call on (a mod called a few times,
a test or a one-off script, never starts the compiler, which competes with the calls it serves
for the CPU and the GIL), and only for calls that compute at least ``MIN_COMPILED_SCORES`` scores
(small calls gain a few percent of a short call, less than the compiler's time costs the calls
it slows while it runs);
``True`` waits for the compiled kernel (benchmarks, tests); ``False`` never
compiles. A kernel an earlier process compiled (``tier.on_disk``) is loaded on
the caller's thread at its signature's first call, which it serves (about a
second; no tracing, ``artefacts``); a damaged file is compiled again in the
background. The environment variable ``FLEXATTN_COMPILED=0`` makes the default
``"auto"`` behave as False (the test suite sets it: tests of this path ask
for it explicitly). See ``tier`` for the cache and the signatures compiled
per kernel.
"""

from __future__ import annotations

import functools
import os

from codegen.cache import kernel_key
from codegen.torch_backend.compiled import tier
from codegen.torch_backend.compiled.tier import STATS
from codegen.torch_backend.kernel import Kernel, rows_of
from flexattn.call import Call
from flexattn.errors import LoweringError
from flexattn.ir import constants_of

MIN_COMPILED_SCORES = 1 << 21  # "auto" compiles calls computing this many scores (tiles x tile area x B x H)


def kernel_for(call: Call) -> Kernel | str:
    """The compiled kernel for ``call``, or the reason the eager loop serves it instead (see the
    module docstring): a ``Kernel`` called as ``kernel(call) -> (out, lse, max_scores)``.

    Example::

        >>> kernel = kernel_for(call)  # call.options["COMPILED"] True: waits for the compiler
        >>> out, lse, max_scores = kernel(call)
    """
    mode = call.options.get("COMPILED", "auto")
    if mode is False:
        return "kernel_options COMPILED=False"
    if call.forces("compiled_loop"):
        mode = True  # forced: wait for the compiler
    if mode == "auto" and call.score_graph is None:
        # Mask-only calls: the eager loop computes scores in log2 units with fewer passes, and was
        # faster than the compiled kernel on every mask-only call measured (docs/performance.md).
        return "no score_mod: the eager loop is faster on mask-only calls (COMPILED=True compiles anyway)"
    if mode == "auto" and os.environ.get("FLEXATTN_COMPILED", "").lower() in ("0", "false", "no", "off"):
        return "FLEXATTN_COMPILED=0 in the environment"
    if mode == "auto":
        scores = computed_scores(call)
        if scores < MIN_COMPILED_SCORES:
            return (f"the call computes {scores} scores < MIN_COMPILED_SCORES ({MIN_COMPILED_SCORES}): "
                    "compiling would cost more than it saves (kernel_options COMPILED=True forces it)")
    # The tile source depends on the mods only (tile sizes are run-time values).
    key = kernel_key(call.score_graph, call.mask_graph)
    slots = [i for i, t in enumerate(call.score_buffers) if t.requires_grad] if call.needs_grad else None
    sig = tier.signature(call.query, call.score_buffers, call.mask_buffers, call.block_mask, slots)
    if mode == "auto":  # counted before the tile source is printed: a mod called a few times costs nothing
        calls = tier.count_call(key, sig)
        if calls < tier.COMPILE_AFTER_CALLS and not tier.on_disk(key, sig):
            return (f"call {calls} of this mod and signature; its kernel is compiled from call "
                    f"{tier.COMPILE_AFTER_CALLS} on (the eager loop serves until then)")
    try:
        item = tier.entry(key, call.score_graph, call.mask_graph)
    except LoweringError as error:
        return f"the tile printer cannot lower this mod ({error})"
    state = tier.state(item, sig)
    if state is None and tier.on_disk(key, sig) and tier.load_now(item, sig):  # an earlier process compiled it
        state = tier.READY
    if state is None:
        tier.request(item, sig, functools.partial(_build, item, sig, call, slots))
    if mode is True and state != tier.READY:
        state = tier.wait(item, sig)
    if state == tier.FAILED:
        tier.warn_once(item, sig)
        return f"compiling its kernel failed ({tier.error_of(item, sig)}); the eager loop serves it"
    if state != tier.READY:
        return "its compiled kernel is being built in the background; the eager loop serves meanwhile"
    return Kernel(item.namespace_for(sig), constants_of(call.score_graph), constants_of(call.mask_graph))


def computed_scores(call: Call) -> int:
    """How many scores the loop computes for ``call``: its non-empty tiles times the tile area,
    over every batch and query head (all of L x S without a BlockMask)."""
    B, Hq, _, L, S = call.shape
    mask = call.block_mask
    if mask is None:
        return B * Hq * L * S
    tiles = mask.derived("visited tiles", (), lambda: int(mask.kv_num_blocks.sum()) + (
        0 if mask.full_kv_num_blocks is None else int(mask.full_kv_num_blocks.sum())))
    mask_b, mask_h = mask.kv_num_blocks.shape[:2]
    return tiles * mask.BLOCK_SIZE[0] * mask.BLOCK_SIZE[1] * (B // mask_b) * (Hq // mask_h)


def _build(item, sig, call: Call, slots):
    """The background job: ``tier.build``, its compile examples from the call's rows planned as
    ``Kernel.run`` plans them."""
    def examples():
        return tier.examples(item, call.query, call.key, call.value, rows_of(call), call.block_size[1], call.scale,
                             tuple(call.score_buffers), constants_of(call.score_graph), tuple(call.mask_buffers),
                             constants_of(call.mask_graph), slots)
    tier.build(item, sig, examples)


def wait_all() -> None:
    """Block until every queued compilation is done (benchmarks measuring time-to-compiled).

    Example: ``flexattn.flex_attention(q, k, v, score_mod=softcap); wait_all()``.
    """
    tier.drain()


__all__ = ["STATS", "kernel_for", "wait_all"]
