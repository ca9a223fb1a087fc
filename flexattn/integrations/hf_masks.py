"""Block masks for transformers' mask functions (its ``AttentionMaskInterface`` entry for flexattn).

A model builds one mask per forward from a mask function (causal, sliding window, chunked, packed
documents through position_ids, a user's ``or_mask_function``/``and_mask_function``), the query and
key offsets of its cache, and a 2-D padding mask. Two builds, both exact about which positions
attend (the mask_mod is applied in every PARTIAL tile):

- small grids (decoding steps, short prompts: ``B * Q_LEN * KV_LEN <= DENSE_LIMIT``): the traced mask
  is evaluated at every position at once and each tile classified from the counts; one pass of a
  few vectorised ops, cheaper than any tile analysis at these sizes.
- larger grids: the mask without padding goes through ``create_block_mask(..., exact=False)``
  (symbolic, cached for the same mask and lengths), the padding's own tile classes come from the
  2-D mask by counting, and the two combine tile by tile with ``min``: a tile of an AND of two masks
  is EMPTY if either factor's is, FULL if both are, else PARTIAL, and EMPTY < PARTIAL < FULL.

The offsets become 0-dim int64 tensors, so every decoding step has the same mask program (one
trace, reused) and only the tensors' values change.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flexattn import passes
from flexattn.analysis import create_block_mask
from flexattn.block_mask import DEFAULT_BLOCK_SIZE, EMPTY, FULL, PARTIAL, BlockMask, TileAnalysis
from flexattn.mod_cache import cached_block_mask
from flexattn.semantics import evaluate, index_grid
from flexattn.trace import trace_mask_mod

# Above this many (b, q, kv) positions the symbolic build is cheaper than evaluating every position.
DENSE_LIMIT = 1 << 18
PADDING_BUCKET = 256


def _causal(batch_idx, head_idx, q_idx, kv_idx):
    return kv_idx <= q_idx


def _shifted(mask_function, q_offset: torch.Tensor, kv_offset: torch.Tensor):
    def shifted(batch_idx, head_idx, q_idx, kv_idx):
        return mask_function(batch_idx, head_idx, q_idx + q_offset, kv_idx + kv_offset)

    return shifted


def _with_padding(mask_mod, padding: torch.Tensor, kv_offset: torch.Tensor):
    def padded(batch_idx, head_idx, q_idx, kv_idx):
        return mask_mod(batch_idx, head_idx, q_idx, kv_idx) & padding[batch_idx, kv_idx + kv_offset]

    return padded


def tile_classes_of(allowed: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(B, H, Q, KV) bool -> (B, H, ceil(Q / block[0]), ceil(KV / block[1])) int8 EMPTY/PARTIAL/FULL.

    A ragged last tile is FULL when every position inside the lengths attends. Torch ops only, the
    same for every length: dynamo traces it (``hf_compiled``), on any device.

    Example::

        >>> tile_classes_of(torch.ones(1, 1, 3, 3, dtype=torch.bool).tril(), (2, 2))[0, 0].tolist()
        [[1, 0], [2, 2]]
    """
    nb, nh, Q, KV = allowed.shape
    (bq, bk), nq, nkv = block, math.ceil(Q / block[0]), math.ceil(KV / block[1])
    # Counted along keys, then along queries, each padded to whole tiles only where it is ragged (a
    # decoding step's single query is not padded to a tile of rows).
    keys = torch.nn.functional.pad(allowed.to(torch.int32), (0, nkv * bk - KV))
    per_row = keys.view(nb, nh, Q, nkv, bk).sum(-1, dtype=torch.int32)
    per_row = torch.nn.functional.pad(per_row, (0, 0, 0, nq * bq - Q))
    counts = per_row.view(nb, nh, nq, bq, nkv).sum(3, dtype=torch.int32)
    rows = torch.full((nq,), bq, dtype=torch.int32, device=allowed.device)
    cols = torch.full((nkv,), bk, dtype=torch.int32, device=allowed.device)
    rows[-1], cols[-1] = Q - (nq - 1) * bq, KV - (nkv - 1) * bk
    sizes = rows[:, None] * cols[None, :]
    return torch.where(counts == sizes, FULL, torch.where(counts > 0, PARTIAL, EMPTY)).to(torch.int8)


def _torch_lists(classes: torch.Tensor, code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's ordered lists of the tiles of class ``code`` per row: (count, indices: those tiles first, ascending)."""
    hit = classes == code
    order = torch.sort((~hit).to(torch.int8), dim=-1, stable=True).indices
    return hit.sum(-1, dtype=torch.int32), order.to(torch.int32)


def block_mask_of_classes(classes: torch.Tensor, block, seq_lengths, mask_mod, traced=None,
                          attended=None) -> BlockMask:
    """``BlockMask.from_tile_classes`` by four sorts (the lists are torch's layout), for small tile grids.

    ``classes``: (B, H, Q_BLOCKS, KV_BLOCKS) EMPTY/PARTIAL/FULL codes; ``traced``: mask_mod's
    trace, kept on the mask (attention does not trace it again); ``attended``: the mask at every
    position, from which ``classes`` were counted (``TileAnalysis.attended``). Example:
    ``block_mask_of_classes(torch.full((1, 1, 2, 2), FULL, dtype=torch.int8), (128, 128), (256, 256), None)``.
    """
    columns = classes.transpose(-1, -2)
    return BlockMask(seq_lengths, *_torch_lists(classes, PARTIAL), *_torch_lists(classes, FULL),
                     *_torch_lists(columns, PARTIAL), *_torch_lists(columns, FULL), block, mask_mod,
                     analysis=None if traced is None else TileAnalysis(mask_mod, traced, attended=attended))


def _tile_classes_numpy(allowed: torch.Tensor, block: tuple[int, int]) -> np.ndarray:
    """``tile_classes_of`` in numpy, for the eager build (a CPU mask): its grids are small (a
    decoding step, a short prompt, one row of padding), where each torch op's fixed cost is several
    times numpy's. Returns the classes as an int8 array."""
    nb, nh, Q, KV = allowed.shape
    (bq, bk), nq, nkv = block, math.ceil(Q / block[0]), math.ceil(KV / block[1])
    keys = allowed.numpy()
    if KV != nkv * bk:  # a ragged last tile: padded with positions that do not attend
        keys = np.concatenate([keys, np.zeros((nb, nh, Q, nkv * bk - KV), dtype=bool)], axis=-1)
    per_row = keys.reshape(nb, nh, Q, nkv, bk).sum(-1, dtype=np.int32)
    if Q != nq * bq:
        per_row = np.concatenate([per_row, np.zeros((nb, nh, nq * bq - Q, nkv), dtype=np.int32)], axis=2)
    counts = per_row.reshape(nb, nh, nq, bq, nkv).sum(3, dtype=np.int32)
    row_sizes = np.full(nq, bq, dtype=np.int32)
    col_sizes = np.full(nkv, bk, dtype=np.int32)
    row_sizes[-1], col_sizes[-1] = Q - (nq - 1) * bq, KV - (nkv - 1) * bk
    # EMPTY 0, PARTIAL 1, FULL 2: some position attends, plus every position attends.
    classes = (counts > 0).astype(np.int8) + (counts == row_sizes[:, None] * col_sizes[None, :])
    return classes


_CODES = np.array([PARTIAL, FULL], dtype=np.int8).reshape(2, 1, 1, 1, 1)


def _lists(classes: np.ndarray) -> list[torch.Tensor]:
    """torch's ordered lists per row of ``classes`` (B, H, rows, cols): [PARTIAL count, PARTIAL
    indices, FULL count, FULL indices], the tiles of the class first, ascending, then the others."""
    other = classes[None] != _CODES
    order = torch.from_numpy(np.argsort(other, axis=-1, kind="stable").astype(np.int32))
    counts = torch.from_numpy(classes.shape[-1] - other.sum(-1, dtype=np.int32))
    return [counts[0], order[0], counts[1], order[1]]


def _block_mask_of_numpy_classes(classes: np.ndarray, block, seq_lengths, mask_mod, traced, attended) -> BlockMask:
    """``block_mask_of_classes`` of numpy classes, by two sorts in numpy (the eager build)."""
    return BlockMask(seq_lengths, *_lists(classes), *_lists(classes.swapaxes(-1, -2)), block, mask_mod,
                     analysis=TileAnalysis(mask_mod, traced, attended=attended))


_batch_dependence: dict[int, tuple] = {}  # id(graph) -> (graph, reads b): a decoding step asks every step


def _reads_batch(graph) -> bool:
    entry = _batch_dependence.get(id(graph))
    if entry is None or entry[0] is not graph:
        entry = _batch_dependence[id(graph)] = (graph, "b" in passes.depends_on(graph))
    return entry[1]


def _attended(traced, B: int, q_len: int, kv_len: int) -> torch.Tensor:
    """(B or 1, 1, q_len, kv_len) bool: the mask at every position (B where it reads the batch)."""
    nb = B if _reads_batch(traced.graph) else 1
    buffers = [t.detach().to("cpu") for t in traced.buffers]
    allowed = evaluate(traced.graph, index_grid(nb, 1, q_len, kv_len), buffers).to(torch.bool)
    return allowed.expand(nb, 1, q_len, kv_len)


def build_block_mask(mask_function, batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                     padding: torch.Tensor | None = None, device="cpu",
                     block: tuple[int, int] = (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE)) -> BlockMask:
    """The BlockMask of ``mask_function`` at these offsets, and with a 2-D padding mask (B, >= kv_offset + KV).

    ``mask_function(b, h, q_idx, kv_idx)`` sees absolute positions (``q_idx + q_offset``); the
    BlockMask's mask_mod is the whole mask (offsets and padding in it). The same mask with equal
    tensor values gives the BlockMask built before (``flexattn.mod_cache.cached_block_mask``). Raises ``TraceError`` for
    a mask function flexattn cannot trace.

    Example::

        >>> build_block_mask(lambda b, h, q, kv: kv <= q, 1, 1, 300, q_offset=299).shape
        (1, 1, 1, 300)
    """
    cpu = lambda x: torch.as_tensor(x, dtype=torch.int64).to("cpu")  # noqa: E731
    q_off, kv_off = cpu(q_offset), cpu(kv_offset)
    base = _shifted(mask_function, q_off, kv_off)
    mask_mod = base if padding is None else _with_padding(base, padding.to("cpu", torch.bool), kv_off)
    dense = batch_size * q_length * kv_length <= DENSE_LIMIT  # in the key: the two builds differ in precision
    arguments = ("transformers", batch_size, q_length, kv_length, str(device), block, dense)
    return cached_block_mask(mask_mod, arguments, lambda: _build(mask_mod, base, padding, kv_off, *arguments[1:]),
                             trace_mask_mod)


def _build(mask_mod, base, padding, kv_off, batch_size, q_length, kv_length, device, block, dense) -> BlockMask:
    traced, attended = trace_mask_mod(mask_mod), None
    if dense:
        attended = _attended(traced, batch_size, q_length, kv_length)
        classes = _tile_classes_numpy(attended, block)
    else:
        classes = create_block_mask(base, batch_size, None, q_length, kv_length, BLOCK_SIZE=block,
                                    exact=False).tile_classes().cpu().numpy()
        if padding is not None:
            start = int(kv_off)
            keys = padding.to("cpu", torch.bool)[:, start:start + kv_length]
            classes = np.minimum(classes, _tile_classes_numpy(keys[:, None, None, :], (1, block[1])))
    # Kept with the mask (``BlockMask.attended_positions``): a decoding step's attention reads it
    # instead of evaluating the mask again in its first layer.
    block_mask = _block_mask_of_numpy_classes(classes, block, (q_length, kv_length), mask_mod, traced, attended)
    return block_mask if torch.device(device).type == "cpu" else block_mask.to(device)


# Models whose attention combines the mask with its own as a tensor and drops it when it is a
# BlockMask (transformers' code tests isinstance): they get transformers' dense eager mask, which
# flexattn's attention reads as a 4-D float mask.
TENSOR_MASK_MODELS = {"doge": "DogeAttention.prepare_dynamic_mask adds the mask to its dynamic mask only as a tensor"}


# Under torch.compile the mask is built eagerly (one graph break): dynamo must not trace flexattn's
# tracer and analysis, which read tensor values and Python frames.
@torch.compiler.disable
def block_mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                         mask_function=None, attention_mask: torch.Tensor | None = None, device="cpu",
                         **kwargs) -> BlockMask | torch.Tensor:
    """transformers' ``AttentionMaskInterface`` signature: the flexattn BlockMask of a model's mask
    (for a model of ``TENSOR_MASK_MODELS``, transformers' dense float mask (B, 1, q_length, kv_length)).

    ``attention_mask`` is the 2-D padding mask (B, past + Q_LEN), True/1 where a token is real; the
    other keyword arguments transformers passes (``config``, ``dtype``, ``use_vmap``,
    ``allow_is_causal_skip``) do not change a block mask. Returns a BlockMask of shape
    (B or 1, 1, q_length, kv_length). Raises ``TraceError`` for a mask function flexattn cannot trace.

    Example::

        >>> block_mask_interface(2, 8, 8, attention_mask=torch.tensor([[0] * 3 + [1] * 5, [1] * 8])).shape
        (2, 1, 8, 8)
    """
    if getattr(kwargs.get("config"), "model_type", None) in TENSOR_MASK_MODELS:
        from transformers.masking_utils import causal_mask_function, eager_mask

        return eager_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function or causal_mask_function,
                          attention_mask, device=device, **kwargs)
    padding = None
    if attention_mask is not None and not bool(attention_mask.all()):
        padding = attention_mask.to(torch.bool)
        # Padded with False to a multiple of PADDING_BUCKET (a static cache's free slots are padding
        # too): the mask's buffer keeps its shape over decoding steps, so its trace is reused.
        needed = max(kv_length + int(kv_offset), padding.shape[-1])
        padding = torch.nn.functional.pad(padding, (0, -(-needed // PADDING_BUCKET) * PADDING_BUCKET - padding.shape[-1]))
    return build_block_mask(mask_function or _causal, batch_size, q_length, kv_length, q_offset, kv_offset,
                            padding, device)
