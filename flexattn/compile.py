"""``flexattn.compile``: trace the mods once and get a callable kernel with its generated source.

Example::

    >>> def causal(b, h, q_idx, kv_idx):
    ...     return q_idx >= kv_idx
    >>> attend = flexattn.compile(mask_mod=causal)
    >>> print(attend.source)          # the generated torch code
    >>> bm = flexattn.create_block_mask(causal, None, None, 1024, 1024)
    >>> out = attend(q, k, v, block_mask=bm)
"""

from __future__ import annotations

import math

import torch

from flexattn.api import InputError, validate_inputs
from flexattn.block_mask import DEFAULT_BLOCK_SIZE, PARTIAL, BlockMask, pair
from flexattn.call import Call
from flexattn.dispatch import BACKENDS, backend_module
from flexattn.errors import LoweringError
from flexattn.trace import TracedMod, trace_mask_mod, trace_score_mod


class CompiledAttention:
    """Attention with fixed mods, compiled by one back end.

    ``source`` is the generated code; ``kernel`` the back end's kernel object.
    The captured tensors the mods read are the ones seen when tracing.
    """

    def __init__(self, score: TracedMod | None, mask: TracedMod | None, backend: str, options: dict):
        self.score, self.mask, self.backend, self.options = score, mask, backend, options
        if backend not in BACKENDS:
            raise LoweringError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
        module = backend_module(backend)
        if not hasattr(module, "compile_kernel"):
            raise LoweringError(f"backend {backend!r} does not generate kernels")
        graphs = (score.graph if score else None, mask.graph if mask else None)
        self.kernel = module.compile_kernel(*graphs) if backend == "torch" else module.compile_kernel(*graphs, options)

    @property
    def source(self) -> str:
        return self.kernel.source

    def __call__(self, query, key, value, block_mask: BlockMask | None = None, scale: float | None = None,
                 enable_gqa: bool = False, return_lse: bool = False):
        """out (B, Hq, L, Ev) in query's dtype, and lse (B, Hq, L) when ``return_lse``.

        ``block_mask`` None with a mask_mod applies the mask_mod everywhere
        (every tile PARTIAL); give ``create_block_mask(mask_mod, ...)`` to skip
        empty tiles. Raises ``InputError`` for shapes that do not fit, or a
        block_mask with partial tiles when no mask_mod was compiled in.
        """
        out_dtype = query.dtype
        query, key, value = validate_inputs(query, key, value, enable_gqa,
                                            block_mask.kv_num_blocks.shape[0] if block_mask is not None else None)
        L, S = query.shape[2], key.shape[2]
        if block_mask is None and self.mask is not None:
            block_mask = _every_tile_partial(L, S, self.options.get("BLOCK_SIZE", DEFAULT_BLOCK_SIZE))
        elif block_mask is not None:
            block_mask.check_lengths(L, S)
            if self.mask is None and bool(block_mask.kv_num_blocks.any()):
                raise InputError("this block_mask has partial tiles but no mask_mod was compiled in; "
                                 "use flexattn.compile(..., mask_mod=block_mask.mask_mod)")
        call = Call(query, key, value, score_graph=self.score.graph if self.score else None,
                    score_buffers=self.score.buffers if self.score else (),
                    mask_graph=self.mask.graph if self.mask else None,
                    mask_buffers=self.mask.buffers if self.mask else (), block_mask=block_mask, scale=scale,
                    enable_gqa=enable_gqa, options=self.options)
        if self.backend == "torch":  # the generated loop takes the Call
            out, lse, _ = self.kernel(call)
        else:
            out, lse, _ = self.kernel(query, key, value, score_buffers=call.score_buffers,
                                      mask_buffers=call.mask_buffers, block_mask=block_mask, scale=call.scale,
                                      enable_gqa=enable_gqa)
        out = out.to(out_dtype)
        return (out, lse) if return_lse else out


def _every_tile_partial(q_len: int, kv_len: int, block_size) -> BlockMask:
    q_block, kv_block = pair(block_size)
    classes = torch.full((1, 1, math.ceil(q_len / q_block), math.ceil(kv_len / kv_block)), PARTIAL,
                         dtype=torch.int8)
    return BlockMask.from_tile_classes(classes, (q_block, kv_block), (q_len, kv_len))


def compile(score_mod=None, mask_mod=None, *, backend: str = "torch", **options) -> CompiledAttention:
    """Trace ``score_mod``/``mask_mod`` and compile them with ``backend`` (cached by structure).

    Options go to the back end (torch: ``max_tiles``, ``BLOCK_SIZE``).
    Returns a ``CompiledAttention``, called as ``kernel(query, key, value,
    block_mask=None, scale=None, enable_gqa=False, return_lse=False)``.

    Raises ``TraceError`` for a mod that cannot be traced and ``LoweringError``
    for an unknown back end or an op it cannot lower.

    Example::

        >>> attend = flexattn.compile(lambda s, b, h, q, kv: s + (kv - q) * 0.1)
        >>> attend(q, k, v).shape == q.shape
        True
    """
    score = trace_score_mod(score_mod) if score_mod is not None else None
    mask = trace_mask_mod(mask_mod) if mask_mod is not None else None
    return CompiledAttention(score, mask, backend, dict(options))
