"""How the decode paths read K/V: views of the cache, copies of tiles, or the cache as a table of rows.

* ``tile_source`` / ``read_tiles``: a run of consecutive tiles is a view of the cache; scattered
  tiles are copied once (``copy_tiles``), into per-thread buffers kept between calls.
* ``row_table``: the cache as one table of rows, for the CPU kernels of ``cpu_kernels``, which
  read each sequence's positions where they lie (``reads_in_place`` says where they can).
* ``keys_major_scores``: scores of a few queries against many keys.
"""

from __future__ import annotations

import threading

import torch

from codegen.torch_backend.decode.cpu_kernels import kernels_ready

# Copied tiles and batched scores land in per-thread buffers kept between calls: a fresh buffer of
# tens of MB is returned to the OS when freed and page-faulted in again on every decode step,
# which costs several times the copy itself (docs/performance.md).
_workspace = threading.local()


def keys_major_scores(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Scores (batch, M, N) of queries (batch, M, E), already scaled, against keys (batch, N, E),
    stored keys-major.

    With M a handful of rows (G * L), the tall (N x E) @ (E x M) matmul runs faster on CPU than
    (M x E) @ (E x N); the result is its transposed view, which elementwise ops and the later
    matmul with V take as it is. Callers scale the few queries, not the many scores.
    """
    return torch.bmm(keys, queries.transpose(1, 2)).transpose(1, 2)


def reads_in_place(x: torch.Tensor) -> str | None:
    """Why the CPU kernels cannot read x (B, Hkv, S, D) in place (None when they can): they read a
    CPU tensor of float32/float64 whose rows are contiguous and evenly spaced (so that
    ``row_table`` is a view), once they are loaded (``cpu_kernels.kernels_ready``)."""
    if x.device.type != "cpu":
        return f"K/V are on {x.device.type}: the kernels that read them in place run on the CPU"
    if not _table_layout(x):
        return "K/V rows are not contiguous, evenly spaced float32/float64 rows (a table view would copy)"
    if not kernels_ready():
        return "the CPU kernels are still loading (in a background thread)"
    return None


def _table_layout(x: torch.Tensor) -> bool:
    row = x.stride(2)
    return (x.dtype in (torch.float32, torch.float64) and x.stride(3) == 1 and row == x.shape[3]
            and x.stride(0) % row == 0 and x.stride(1) % row == 0)


def row_table(x: torch.Tensor):
    """x (B, Hkv, S, D) (a shared pool: batch stride 0) as one table of rows: ``(table (R, D), base (B, Hkv))``,
    position n of (b, h) being row ``base[b, h] + n``; a view of x's memory. None where x's rows are not
    contiguous, evenly spaced rows of float32/float64 (then a table would copy)."""
    B, Hkv, S, D = x.shape
    row = x.stride(2)
    if not _table_layout(x):
        return None
    base = (torch.arange(B, device=x.device).view(B, 1) * (x.stride(0) // row)
            + torch.arange(Hkv, device=x.device).view(1, Hkv) * (x.stride(1) // row))
    table = torch.as_strided(x, (int(base.max()) + S, D), (row, 1), x.storage_offset())
    return table, base


def tile_source(tiles: torch.Tensor, kv_block: int, S: int):
    """Where the keys of ``tiles`` (ascending, not empty) are, and their positions (N,): a slice of
    the cache when the tiles are consecutive, else the tiles and positions to copy."""
    first, last = int(tiles[0]), int(tiles[-1])
    if last - first + 1 == tiles.numel():
        positions = slice(first * kv_block, min((last + 1) * kv_block, S))
        return positions, torch.arange(positions.start, positions.stop, device=tiles.device)
    kv_idx = (tiles.view(-1, 1) * kv_block + torch.arange(kv_block, device=tiles.device)).flatten()
    kv_idx = kv_idx[kv_idx < S]
    return (tiles, kv_idx), kv_idx


def read_tiles(x: torch.Tensor, source, kv_block: int, slot: int) -> torch.Tensor:
    """Keys or values (H, N, D) from x (H, S, D) at a ``tile_source``: a view, or a copy into buffer ``slot``."""
    if isinstance(source, slice):
        return x[:, source]
    return copy_tiles(x, *source, kv_block, slot)


def copy_tiles(x: torch.Tensor, tiles: torch.Tensor, kv_idx: torch.Tensor, kv_block: int, slot: int) -> torch.Tensor:
    """Positions ``kv_idx`` (those of ``tiles``) of x (H, S, D), copying whole tiles when the layout allows
    (into this thread's reused buffer ``slot``, valid until the next copy into it)."""
    H, S, D = x.shape
    if S % kv_block == 0 and x.stride(2) == 1 and x.stride(1) == D:
        # Each tile is one contiguous run of kv_block * D values: copy runs, not positions.
        out = reused_buffer(slot, H * len(tiles) * kv_block * D, x.dtype, x.device).view(H, len(tiles), kv_block * D)
        return torch.index_select(x.view(H, S // kv_block, kv_block * D), 1, tiles, out=out).view(H, -1, D)
    return x.index_select(1, kv_idx)


def reused_buffer(slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``numel`` elements of ``dtype`` on ``device``, reused by this thread's later calls.

    Grows to the largest size asked for and is kept for the thread's lifetime (at most the K or V
    tiles one sequence of one decode step reads, or a batch's scores: ``batch.BATCH_SCORES_BUDGET``).
    """
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (slot, dtype, device)
    if key not in buffers or buffers[key].numel() < numel:
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key][:numel]
