"""Swin window attention: non-overlapping M x M windows, the shifted windows with their region ids, and the
learned relative position bias.

Liu et al., 2021 ("Swin Transformer"): on an H x W feature map, W-MSA attends
within each M x M window, softmax(Q K^T / sqrt(d) + B) V, with B read from a
learned (2M - 1) x (2M - 1) table per head at the relative offset of the two
tokens. SW-MSA first rolls the map by (-M/2, -M/2); windows that then hold
tokens from different image regions get a mask (Swin's code adds -100) between
tokens of different regions, the regions being the 3 x 3 slices
[0, -M), [-M, -M/2), [-M/2, end) of each axis. Here the user rolls the map
with torch.roll and attends over its raster order; the mask_mod is "same window
and same region" (a captured region-id tensor), the score_mod the bias table.
"""

import torch

import flexattn
from _dense import check, dense_scores, qkv, randn, report, torch_flex_error

HEADS, DIM, M = 4, 32, 7


def region_ids(height, width, shift):
    """Swin's img_mask: a region id per token of the rolled map (all 0 without a shift)."""
    ids = torch.zeros(height, width, dtype=torch.long)
    if shift:
        cuts = lambda n: (slice(0, n - M), slice(n - M, n - shift), slice(n - shift, None))  # noqa: E731
        for r, rows in enumerate(cuts(height)):
            for c, cols in enumerate(cuts(width)):
                ids[rows, cols] = 3 * r + c
    return ids.flatten()


def make_swin(width, region, table):
    # --- the user's code -----------------------------------------------------------------
    def window_mask(b, h, q_idx, kv_idx):
        q_row, q_col, kv_row, kv_col = q_idx // width, q_idx % width, kv_idx // width, kv_idx % width
        same_window = (q_row // M == kv_row // M) & (q_col // M == kv_col // M)
        return same_window & (region[q_idx] == region[kv_idx])

    def relative_bias(score, b, h, q_idx, kv_idx):
        d_row = (q_idx // width) % M - (kv_idx // width) % M
        d_col = (q_idx % width) % M - (kv_idx % width) % M
        return score + table[h, d_row + M - 1, d_col + M - 1]
    # --------------------------------------------------------------------------------------

    return window_mask, relative_bias


def windows(x, height, width):
    """Swin's window_partition: (B, H, height * width, D) -> (B, H, windows, M * M, D)."""
    B, H, _, D = x.shape
    x = x.view(B, H, height // M, M, width // M, M, D).transpose(3, 4)
    return x.reshape(B, H, -1, M * M, D)


def dense_swin(q, k, v, table, height, width, shift):
    """Swin's own computation: attention inside each window, bias from relative_position_index, -100 mask."""
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + M - 1  # (M*M, M*M, 2)
    bias = table[:, relative[..., 0], relative[..., 1]]  # (H, M*M, M*M)
    ids = windows(region_ids(height, width, shift).view(1, 1, -1, 1), height, width)[0, 0, :, :, 0]
    mask = torch.where(ids[:, :, None] == ids[:, None, :], 0.0, -100.0).to(q.dtype)  # (windows, M*M, M*M)
    scores = dense_scores(windows(q, height, width), windows(k, height, width)) + bias[None, :, None] + mask
    out = torch.softmax(scores, dim=-1) @ windows(v, height, width)  # (B, H, windows, M*M, D)
    B, H, _, _, D = out.shape
    out = out.view(B, H, height // M, width // M, M, M, D).transpose(3, 4)
    return out.reshape(B, H, height * width, D)


def main(size=56 * 56):
    side = max(2, round(size ** 0.5 / M)) * M  # a side x (side + M) map: non-square, windows tile it
    height, width = side, side + M
    n = height * width
    q, k, v = qkv(1, HEADS, n, DIM)
    table = randn(HEADS, 2 * M - 1, 2 * M - 1, seed=5)
    results = {}
    for shift in (0, M // 2):
        def roll(x, shift=shift):  # the user rolls the feature map; the attention never sees the roll
            return torch.roll(x.unflatten(2, (height, width)), (-shift, -shift), (2, 3)).flatten(2, 3)
        region = region_ids(height, width, shift)
        window_mask, relative_bias = make_swin(width, region, table)
        block_mask = flexattn.create_block_mask(window_mask, None, None, n, n)
        errors = check(lambda q, k, v, t: flexattn.flex_attention(q, k, v, score_mod=make_swin(width, region, t)[1],
                                                                   block_mask=block_mask),
                       lambda q, k, v, t: dense_swin(q, k, v, t, height, width, shift),
                       [roll(q), roll(k), roll(v), table])
        ours = flexattn.flex_attention(roll(q), roll(k), roll(v), score_mod=relative_bias, block_mask=block_mask)
        theirs = torch_flex_error(ours, roll(q), roll(k), roll(v), score_mod=relative_bias, mask_mod=window_mask)
        name = f"Swin {'shifted ' if shift else ''}window attention {height}x{width}, M={M}"
        results["shifted" if shift else "windows"] = report(name, n, block_mask, errors, theirs)
    return results


if __name__ == "__main__":
    main()
