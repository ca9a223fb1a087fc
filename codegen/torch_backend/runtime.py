"""Tensor helpers the generated kernels call: tiling, gathering tiles, grouped matmuls.

Shapes: ``q`` (B, Hq, L, E); ``k`` (B, Hkv, S, E); ``v`` (B, Hkv, S, Ev);
``G = Hq // Hkv`` query heads share one KV head (GQA; query head ``h`` reads
KV head ``h // G``). A piece's chunk of gathered keys is (B, Hkv, N, E) when
all (b, h) visit the same tiles ("shared") and (B, Hq, N, E) otherwise.
"""

from __future__ import annotations

import torch


def pad_to_tiles(x: torch.Tensor, kv_block: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, KV_BLOCKS * kv_block, D), zero rows after S (a view when S divides)."""
    extra = -x.shape[2] % kv_block
    return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra else x


def gather(x: torch.Tensor, piece, kv_block: int, group: int) -> torch.Tensor:
    """The rows of the padded ``x`` (B, Hkv, S_pad, D) that ``piece`` visits, as one chunk.

    Returns (B, Hkv, N, D) for shared tiles (a view when they are consecutive) and lists per KV
    head, or (B, Hq, N, D) for lists per query head, N = tiles * kv_block.
    """
    B, Hkv, S_pad, D = x.shape
    if piece.span is not None:
        first, stop = piece.span
        return x[:, :, first * kv_block:stop * kv_block]
    tiled = x.view(B, Hkv, S_pad // kv_block, kv_block, D)
    if piece.tiles.dim() == 1:
        return tiled.index_select(2, piece.tiles).flatten(2, 3)
    tiles, batch, kv_head = _listed(piece, B, Hkv, group)
    return tiled[batch, kv_head, tiles].flatten(2, 3)


def _listed(piece, B: int, Hkv: int, group: int):
    """Per-(b, h) tiles (B, H, n) and the batch and KV head indices to gather them with: H = Hkv for
    lists per KV head (or one list for all heads), else H = Hq and each query head reads its KV head."""
    n = piece.tiles.shape[-1]
    per_kv_head = piece.tiles.shape[1] in (1, Hkv)
    H = Hkv if per_kv_head else Hkv * group
    kv_head = torch.arange(H) if per_kv_head else torch.arange(H) // group
    return piece.tiles.expand(B, H, n), torch.arange(B).view(B, 1, 1), kv_head.view(1, H, 1)


def scatter_add(grad: torch.Tensor, chunk_grad: torch.Tensor, piece, kv_block: int, group: int) -> None:
    """Add ``chunk_grad`` (the grad of a ``gather`` result) into the padded ``grad`` (B, Hkv, S_pad, D).

    Query heads of one KV head add into the same rows (GQA); padded slots add zeros.
    """
    B, Hkv, S_pad, D = grad.shape
    if piece.span is not None:
        first, stop = piece.span
        grad[:, :, first * kv_block:stop * kv_block] += chunk_grad
        return
    tiled = grad.view(B, Hkv, S_pad // kv_block, kv_block, D)
    n = piece.tiles.shape[-1]
    if piece.tiles.dim() == 1:
        tiled.index_add_(2, piece.tiles, chunk_grad.view(B, Hkv, n, kv_block, D))
        return
    tiles, batch, kv_head = _listed(piece, B, Hkv, group)
    flat = (batch * Hkv + kv_head) * (S_pad // kv_block) + tiles
    tiled.view(-1, kv_block, D).index_add_(0, flat.flatten(), chunk_grad.reshape(-1, kv_block, D))


def query_key(q: torch.Tensor, k_chunk: torch.Tensor, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Hq, r, E) @ k_chunk^T -> (B, Hq, r, N); GQA groups share one matmul per KV head.

    With a flat ``workspace`` the result is written into its front (reusing one
    allocation across pieces is measurably faster on CPU than a fresh tensor each time).
    """
    B, Hq, r, E = q.shape
    Hk, N = k_chunk.shape[1], k_chunk.shape[2]
    rows = (Hq // Hk) * r
    out = workspace[:B * Hk * rows * N].view(B, Hk, rows, N) if workspace is not None else None
    grouped = torch.matmul(q.reshape(B, Hk, rows, E), k_chunk.transpose(-2, -1), out=out)
    return grouped.view(B, Hq, r, N)


def weights_value(p: torch.Tensor, v_chunk: torch.Tensor) -> torch.Tensor:
    """p (B, Hq, r, N) @ v_chunk -> (B, Hq, r, Ev)."""
    B, Hq, r, N = p.shape
    Hk = v_chunk.shape[1]
    if Hk == Hq:
        return p @ v_chunk
    return (p.reshape(B, Hk, (Hq // Hk) * r, N) @ v_chunk).view(B, Hq, r, -1)


def grad_chunk(ds: torch.Tensor, q: torch.Tensor, group_heads: int) -> torch.Tensor:
    """ds^T @ q: ds (B, Hq, r, N), q (B, Hq, r, E) -> (B, group_heads, N, E).

    With ``group_heads`` KV heads (shared chunks) the query heads of one group
    are summed by the matmul itself.
    """
    B, Hq, r, N = ds.shape
    if group_heads == Hq:
        return ds.transpose(-2, -1) @ q
    g = Hq // group_heads
    return ds.reshape(B, group_heads, g * r, N).transpose(-2, -1) @ q.reshape(B, group_heads, g * r, -1)
