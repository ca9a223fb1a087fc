"""create_block_mask: the BlockMask of a mask_mod, from the IR, in O(tiles).

1. Coarse to fine over tiles: the whole (q, kv) plane is cut into boxes of
   many tiles, each decided at once by ``intervals.evaluate_ranges`` (always
   true, always false, or unknown); only unknown boxes are cut again, down
   to single tiles. A causal mask at 1M tokens decides 67M tiles from a few
   thousand boxes along its diagonal.
2. Tiles still unknown are cut into boxes of positions the same way
   (``boxes.refine_tiles``), down to a few positions evaluated exactly
   (``exact=False`` skips this and keeps them PARTIAL, which is safe).
3. Classes follow torch exactly: a tile is FULL when every position of the
   padded tile is true (so a ragged edge tile is never FULL), EMPTY when no
   in-range position is true, PARTIAL otherwise.
4. torch's index lists are built from the decided boxes row by row
   (``index_lists.box_lists``), never from a dense tile plane: beyond the
   lists themselves, memory follows the boxes. The lists are the ceiling
   (``index_list_bytes``: one int32 per tile pair, four times); lists larger
   than the free memory raise ``BlockMaskError`` before anything is built.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn.attention import flex_attention as torch_flex

from flexattn import passes
from flexattn.analysis.boxes import SPLIT, Boxes, decide, refine_tiles
from flexattn.analysis.buffer_ranges import BufferRanges
from flexattn.block_mask import DEFAULT_BLOCK_SIZE, FULL, PARTIAL, BlockMask, TileAnalysis, pair, positive_int
from flexattn.errors import BlockMaskError
from flexattn.index_lists import box_lists
from flexattn.mod_cache import cached_block_mask
from flexattn.trace import trace_mask_mod

TOP_BOXES = 64  # boxes per side at the coarsest level (each a power of SPLIT tiles wide)


class _Tiles:
    """The tile grid, cut into boxes of ``side`` tiles (a power of SPLIT), and the non-empty boxes
    decided so far. No dense plane: memory follows the boxes, not Q_BLOCKS x KV_BLOCKS."""

    def __init__(self, nb, nh, nq, nkv, q_block, kv_block, Q_LEN, KV_LEN):
        self.side = 1
        while max(nq, nkv) > self.side * TOP_BOXES:
            self.side *= SPLIT
        self.n = (nb, nh, nq, nkv)
        self.block, self.length = (q_block, kv_block), (Q_LEN, KV_LEN)
        self.decided = []  # (6, N) arrays of (b * nh + h, q tile, q end, kv tile, kv end, class)

    def boxes(self, b, h, qi, ki, side) -> Boxes:
        """Index boxes of the tile boxes (qi, ki) of ``side`` tiles, clipped to the sequences."""
        (q_block, kv_block), (Q_LEN, KV_LEN) = self.block, self.length
        return Boxes(b, h, qi * side * q_block, np.minimum((qi + 1) * side * q_block, Q_LEN) - 1,
                     ki * side * kv_block, np.minimum((ki + 1) * side * kv_block, KV_LEN) - 1)

    def record(self, b, h, qi, ki, side, value) -> None:
        """Boxes (qi, ki) of ``side`` tiles, clipped to the grid, are of class ``value`` (or of ``value[i]``)."""
        _, nh, nq, nkv = self.n
        self.decided.append(np.stack(np.broadcast_arrays(
            b * nh + h, qi * side, np.minimum((qi + 1) * side, nq), ki * side, np.minimum((ki + 1) * side, nkv),
            value)))

    def lists(self, separate_full_blocks: bool, device):
        """torch's kv-major then q-major (num, indices) pairs of the PARTIAL then FULL tiles (FULL ones
        listed as PARTIAL, and no FULL lists, without ``separate_full_blocks``), shaped (nb, nh, ...)."""
        boxes = np.concatenate(self.decided, axis=1) if self.decided else np.zeros((6, 0), dtype=np.int64)
        nb, nh, nq, nkv = self.n
        if not separate_full_blocks:
            boxes[5, boxes[5] == FULL] = PARTIAL
        (Q_LEN, KV_LEN), (q_block, kv_block) = self.length, self.block
        for lo, end, n, ragged in ((1, 2, nq, Q_LEN % q_block), (3, 4, nkv, KV_LEN % kv_block)):
            if ragged:  # a ragged edge tile is never FULL (torch counts its padding as masked out)
                at_edge = (boxes[5] == FULL) & (boxes[end] == n)
                edge = boxes[:, at_edge]
                edge[lo], edge[5] = n - 1, PARTIAL
                boxes[end, at_edge] = n - 1
                boxes = np.concatenate([boxes[:, boxes[lo] < boxes[end]], edge], axis=1)
        codes = (PARTIAL, FULL) if separate_full_blocks else (PARTIAL,)
        out = []
        for order, (rows, cols) in (((0, 1, 2, 3, 4, 5), (nq, nkv)), ((0, 3, 4, 1, 2, 5), (nkv, nq))):
            for num, indices in box_lists(boxes[list(order)], (nb * nh, rows, cols), codes, device):
                out.append((num.view(nb, nh, rows), indices.view(nb, nh, rows, cols)))
        return out


def _classify_tiles(graph, load_range, plane: _Tiles):
    """Record every decided non-empty box on ``plane``; return the undecided tiles as (b, h, qi, ki),
    with the cuts the range evaluation suggests for them."""
    nb, nh, nq, nkv = plane.n
    side = plane.side
    b, h, qi, ki = (x.ravel() for x in np.meshgrid(
        *(np.arange(n, dtype=np.int64) for n in (nb, nh, math.ceil(nq / side), math.ceil(nkv / side))),
        indexing="ij"))
    while True:
        true, false, both, q_cut, kv_cut = decide(graph, load_range, plane.boxes(b, h, qi, ki, side),
                                                  want_cuts=side == 1, want_both=side == 1)
        unknown = ~(true | false | (both if side == 1 else false))
        # Indices, not bool masks: one nonzero serves all four fields.
        painted = [(true, FULL)] + ([(both, PARTIAL)] if side == 1 else [])  # a tile true and false is PARTIAL
        for decided, value in painted:
            at = np.flatnonzero(decided)
            plane.record(b[at], h[at], qi[at], ki[at], side, value)
        unknown = np.flatnonzero(unknown)
        b, h, qi, ki = b[unknown], h[unknown], qi[unknown], ki[unknown]
        if side == 1:
            return (b, h, qi, ki), tuple(None if cut is None else cut[unknown] for cut in (q_cut, kv_cut))
        side //= SPLIT
        part = np.arange(SPLIT)
        qi = np.repeat(qi[:, None] * SPLIT + part, SPLIT)  # child (i, j) of a box: q part i, kv part j
        ki = np.tile(ki[:, None] * SPLIT + part, SPLIT).ravel()
        b, h = (np.repeat(x, SPLIT * SPLIT) for x in (b, h))
        inside = np.flatnonzero((qi * side < nq) & (ki * side < nkv))
        b, h, qi, ki = b[inside], h[inside], qi[inside], ki[inside]


def index_list_bytes(B: int, H: int, Q_LEN: int, KV_LEN: int, BLOCK_SIZE=DEFAULT_BLOCK_SIZE,
                     separate_full_blocks: bool = True) -> int:
    """Bytes of the int32 index lists torch's layout gives a (B, H, Q_LEN, KV_LEN) mask.

    ``kv_indices`` is (B, H, Q_BLOCKS, KV_BLOCKS) and ``q_indices`` its transpose, with
    their counts; ``separate_full_blocks`` doubles it (the ``full_*`` lists). This is the
    ceiling of ``create_block_mask``: the lists grow with the square of the length
    whatever the mask, so they, not the analysis, bound the lengths a BLOCK_SIZE allows.

    Example::

        >>> index_list_bytes(1, 1, 2**20, 2**20)  # 8192 x 8192 tiles, 4 lists: 1 GiB
        1073872896
    """
    q_block, kv_block = pair(BLOCK_SIZE)
    nq, nkv = math.ceil(Q_LEN / q_block), math.ceil(KV_LEN / kv_block)
    return 4 * B * H * (2 * nq * nkv + nq + nkv) * (2 if separate_full_blocks else 1)


def _available_bytes(device) -> int | None:
    """Memory free for new tensors on ``device`` (MemAvailable on CPU), or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def _check_list_memory(B, H, Q_LEN, KV_LEN, block, separate_full_blocks, device) -> None:
    """Raise ``BlockMaskError`` before any allocation when the index lists cannot fit on ``device``."""
    need, free = index_list_bytes(B, H, Q_LEN, KV_LEN, block, separate_full_blocks), _available_bytes(device)
    if free is None or need <= free:
        return
    scale = 2
    while index_list_bytes(B, H, Q_LEN, KV_LEN, (block[0] * scale, block[1] * scale), separate_full_blocks) > free:
        scale *= 2
    raise BlockMaskError(
        f"create_block_mask(B={B}, H={H}, Q_LEN={Q_LEN}, KV_LEN={KV_LEN}, BLOCK_SIZE={block}) needs {need:,} bytes "
        f"({need / 2**30:.1f} GiB) for torch's index lists (kv_indices and q_indices hold one int32 per tile "
        f"pair, Q_BLOCKS x KV_BLOCKS = {math.ceil(Q_LEN / block[0])} x {math.ceil(KV_LEN / block[1])}, per batch "
        f"and head), but {device} has {free:,} bytes available. Use a larger BLOCK_SIZE, e.g. "
        f"BLOCK_SIZE=({block[0] * scale}, {block[1] * scale}), or pass separate_full_blocks=False to halve it.")


# Under torch.compile a block mask is built eagerly (one graph break): dynamo must not trace
# flexattn's tracer and analysis, which read tensor values and Python frames.
@torch.compiler.disable
def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=DEFAULT_BLOCK_SIZE, _compile=False,
                      separate_full_blocks: bool = True, compute_dq_write_order: bool = False,
                      dq_kv_order: bool = True, *, exact: bool = True) -> BlockMask:
    """The BlockMask of ``mask_mod`` (same content as torch's ``create_block_mask``, same arguments).

    Tiles are decided symbolically from the traced IR (affine index forms,
    interval rules, buffer range summaries), coarse to fine; only tiles it
    cannot decide are cut further, down to positions evaluated exactly. The
    lists are built from the decided boxes, row by row: apart from the lists
    themselves (``index_list_bytes``), memory follows the boxes, not the tiles.

    Args:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
        B, H: batch and heads (None: 1, broadcast). Q_LEN, KV_LEN: sequence lengths.
        device: where the lists go (None: the current accelerator, else CPU, as torch).
        BLOCK_SIZE: an int or a (q, kv) pair.
        _compile: accepted for torch's signature and ignored: nothing here needs compiling.
        separate_full_blocks: False lists FULL tiles with the partial ones and gives no
            ``full_*`` lists (mask_mod applied in every visited tile), as torch.
        compute_dq_write_order, dq_kv_order: torch's dQ write-order metadata for its
            deterministic FLASH backward (``dq_kv_order`` True: descending kv order).
        exact: False keeps undecided tiles PARTIAL (flexattn only).

    The same mask (same fingerprint: ``flexattn.mod_cache``), arguments and captured tensor values
    give the BlockMask built before, with this call's mask_mod.

    Returns a ``BlockMask`` with ``kv_num_blocks`` (B, H, ceil(Q_LEN/q_block)),
    ``kv_indices`` (B, H, ceil(Q_LEN/q_block), ceil(KV_LEN/kv_block)) etc. and
    ``stats`` saying how many tiles were decided symbolically and refined.

    Raises ``BlockMaskError`` for non-positive or non-int sizes or BLOCK_SIZE, a
    non-bool ``dq_kv_order``, or lists larger than the memory ``device`` has free
    (before allocating them; the message gives the bytes and a BLOCK_SIZE that fits);
    ``TraceError`` for a mod that cannot be traced or does not return bool.

    Example::

        >>> bm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 4096, 4096)
        >>> bm.kv_num_blocks.shape
        torch.Size([1, 1, 32])
    """
    device = (torch.accelerator.current_accelerator() or "cpu") if device is None else device
    B, H, Q_LEN, KV_LEN = (positive_int(name, n) for name, n in (
        ("B", 1 if B is None else B), ("H", 1 if H is None else H), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)))
    q_block, kv_block = pair(BLOCK_SIZE)
    if not isinstance(dq_kv_order, bool):
        raise BlockMaskError(f"dq_kv_order must be a bool in create_block_mask (as torch), got {dq_kv_order!r}; "
                             f"pass a tensor order to BlockMask.from_kv_blocks instead")
    _check_list_memory(B, H, Q_LEN, KV_LEN, (q_block, kv_block), separate_full_blocks, device)
    arguments = (B, H, Q_LEN, KV_LEN, str(device), (q_block, kv_block), separate_full_blocks, compute_dq_write_order,
                 dq_kv_order, exact)
    return cached_block_mask(mask_mod, arguments, lambda: _build(mask_mod, *arguments), trace_mask_mod)


def _build(mask_mod, B, H, Q_LEN, KV_LEN, device, block, separate_full_blocks, compute_dq_write_order, dq_kv_order,
           exact) -> BlockMask:
    q_block, kv_block = block
    traced = trace_mask_mod(mask_mod)
    deps = passes.depends_on(traced.graph)
    nb, nh = (B if "b" in deps else 1), (H if "h" in deps else 1)
    nq, nkv = math.ceil(Q_LEN / q_block), math.ceil(KV_LEN / kv_block)
    buffers = [t.detach().to("cpu") for t in traced.buffers]
    load_range = BufferRanges(buffers)
    plane = _Tiles(nb, nh, nq, nkv, q_block, kv_block, Q_LEN, KV_LEN)
    (b, h, qi, ki), cuts = _classify_tiles(traced.graph, load_range, plane)
    classes, refined = np.full(len(b), PARTIAL, dtype=np.int64), 0
    if exact and len(b):
        ragged = ((qi == nq - 1) & (Q_LEN % q_block != 0)) | ((ki == nkv - 1) & (KV_LEN % kv_block != 0))
        classes, refined = refine_tiles(traced.graph, buffers, load_range, plane.boxes(b, h, qi, ki, 1), ragged, cuts)
    plane.record(b, h, qi, ki, 1, classes)
    lists = [tuple(t.expand(B, H, *t.shape[2:]).contiguous() if t.shape[:2] != (B, H) else t for t in pair)
             for pair in plane.lists(separate_full_blocks, device)]
    kv, full_kv, q, full_q = lists if separate_full_blocks else (lists[0], (None, None), lists[1], (None, None))
    total = nb * nh * nq * nkv
    stats = {"tiles": total, "decided_symbolically": total - refined if exact else total - len(b),
             "subdivided": len(b) if exact else 0, "refined": refined,
             "left_partial": 0 if exact else len(b), "depends_on": sorted(deps)}
    block_mask = BlockMask((Q_LEN, KV_LEN), *kv, *full_kv, *q, *full_q, (q_block, kv_block), mask_mod,
                           analysis=TileAnalysis(mask_mod, traced, stats))
    if compute_dq_write_order:
        block_mask.dq_write_order, block_mask.dq_write_order_full = \
            torch_flex._compute_dq_write_order_from_block_mask(block_mask, dq_kv_order=dq_kv_order)
        block_mask.dq_kv_order_spt = dq_kv_order
    return block_mask
