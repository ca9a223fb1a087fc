"""flexattn's compiler back ends: one module (or package) per target.

Every back end is called the same way (``BACKENDS[name](query, key, value,
*, score_graph, score_buffers, mask_graph, mask_buffers, block_mask, scale,
enable_gqa, kernel_options) -> (out, lse, max_scores)``) and sees only IR
graphs, buffer tensors and the BlockMask, never the user's callables.
"""

from __future__ import annotations


def _reference(*args, **kwargs):
    from codegen import reference

    return reference.attention(*args, **kwargs)


BACKENDS = {
    "reference": _reference,
}


def default_backend(device_type: str) -> str:
    """The back end ``backend="auto"`` picks for tensors on ``device_type``."""
    return "reference"
