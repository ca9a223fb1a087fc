"""transformers' block masks inside ``torch.compile``: built by tensor ops dynamo traces, no graph break.

Outside compilation a model's mask goes through ``hf_masks.block_mask_interface`` (flexattn's
tracer and tile analysis, which read tensor values and Python frames: dynamo must not trace them).
While dynamo compiles, ``compiled_block_mask`` builds the same mask from ops dynamo can put in its
graph, with symbolic lengths (one graph for every sequence length):

- the mask function (transformers' causal, sliding-window, packed-sequence closures, and their
  ``and_masks``/``or_masks``: all index arithmetic on tensors) is called once on broadcast index
  tensors, as transformers' own non-vmap sdpa mask does, and ANDed with the 2-D padding mask:
  ``allowed`` (B or 1, 1, Q_LEN, KV_LEN) bool, exact at every position;
- tile classes are counted from ``allowed`` (``hf_masks.tile_classes_of``) and sorted into torch's
  tile lists (``hf_masks.block_mask_of_classes``): tensors of the graph;
- the BlockMask's mask_mod is ``ReboundMaskMod(_lookup, [allowed])``: a constant function of
  flexattn that reads ``allowed[b, q_idx, kv_idx]``, rebound to the graph's ``allowed``. Its
  pytree (``flexattn.custom_op``) carries ``allowed`` and the lengths as graph inputs of the
  attention op, and the function as a constant, so the attention op applies exactly this mask in
  PARTIAL tiles, whatever closures transformers built it from.

The cost is a dense (B, Q_LEN, KV_LEN) bool mask per forward, as transformers' sdpa and eager masks
have; the eager path's symbolic tile analysis for long sequences is not traceable by dynamo.
"""

from __future__ import annotations

import torch

from flexattn.block_mask import DEFAULT_BLOCK_SIZE, BlockMask
from flexattn.integrations.hf_masks import block_mask_of_classes, tile_classes_of
from flexattn.trace import ReboundMaskMod

# The tensor ``_lookup`` reads when traced by itself; a BlockMask always rebinds it to its own mask.
_ALLOWED = torch.ones(1, 1, 1, dtype=torch.bool)


def _lookup(b, h, q_idx, kv_idx):
    return _ALLOWED[b, q_idx, kv_idx]


def compiled_block_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                        attention_mask: torch.Tensor | None, device,
                        block: tuple[int, int] = (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE)) -> BlockMask:
    """The BlockMask of ``mask_function`` at these offsets and 2-D padding mask, from traceable ops only.

    ``mask_function(b, h, q_idx, kv_idx)`` sees absolute positions (``q_idx + q_offset``) as
    broadcast int64 tensors; ``attention_mask`` (B, >= kv_offset + kv_length), True/1 where a token is
    real; offsets are ints or 0-dim tensors. Returns a BlockMask of shape (B or 1, 1, q_length,
    kv_length) whose mask_mod reads the dense mask (see the module docstring).

    Example::

        >>> compiled_block_mask(2, 8, 8, 0, 0, lambda b, h, q, kv: kv <= q, None, "cpu").shape
        (1, 1, 8, 8)
    """
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.int64, device=device)
    q = (torch.arange(q_length, device=device) + q_offset).view(1, 1, -1, 1)
    kv = (torch.arange(kv_length, device=device) + kv_offset).view(1, 1, 1, -1)
    allowed = mask_function(b, h, q, kv)
    if attention_mask is not None:
        padding = attention_mask.to(device=device, dtype=torch.bool)
        last = padding.shape[-1] - 1  # keys past the padding mask (a static cache's free slots) are padding
        allowed = allowed & padding[b, kv.clamp(max=last)] & (kv <= last)
    allowed = allowed.expand(allowed.shape[0], 1, q_length, kv_length)
    classes = tile_classes_of(allowed, block)
    dense = allowed[:, 0].expand(batch_size, q_length, kv_length)
    return block_mask_of_classes(classes, block, (q_length, kv_length), ReboundMaskMod(_lookup, [dense]))
