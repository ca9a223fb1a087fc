"""flexattn: attention variants as two small Python functions, compiled to fused kernels.

Write a ``score_mod(score, b, h, q_idx, kv_idx)`` and/or a
``mask_mod(b, h, q_idx, kv_idx)`` exactly as for
``torch.nn.attention.flex_attention``; flexattn traces them into an IR,
derives the block mask symbolically and runs a generated kernel.
"""

from flexattn.errors import (BlockMaskError, FlexAttnError, LoweringError, PagedCacheError, SlicedBlockMaskError,
                             TraceError)
from flexattn.ir import DType, Graph, Node, Op
from flexattn.masks import and_masks, noop_mask, or_masks
from flexattn.block_mask import BlockMask
from flexattn.trace import TracedMod, trace, trace_mask_mod, trace_score_mod
from flexattn.analysis import create_block_mask
from flexattn.compile import CompiledAttention, compile
from flexattn.paged import PagedAttention, PagedKVCache
from flexattn.lse import merge_attention
from flexattn.api import AuxOutput, AuxRequest, InputError, create_mask, explain_call, flex_attention

__all__ = [
    "AuxOutput", "AuxRequest", "BlockMask", "CompiledAttention", "BlockMaskError", "DType", "FlexAttnError", "Graph",
    "InputError", "LoweringError", "Node", "Op", "PagedAttention", "PagedCacheError", "PagedKVCache",
    "SlicedBlockMaskError", "TraceError", "TracedMod", "and_masks", "compile", "create_block_mask", "create_mask",
    "explain_call", "flex_attention", "merge_attention", "noop_mask", "or_masks", "trace", "trace_mask_mod",
    "trace_score_mod",
]
