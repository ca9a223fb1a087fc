"""2-D neighbourhood attention (NATTEN): pixels on a WIDTH-wide image attend to a KERNEL x KERNEL window."""

import torch

from _common import run

WIDTH, KERNEL = 32, 7


def natten(b, h, q_idx, kv_idx):
    q_row, q_col = q_idx // WIDTH, q_idx % WIDTH
    kv_row, kv_col = kv_idx // WIDTH, kv_idx % WIDTH
    return (torch.abs(q_row - kv_row) <= KERNEL // 2) & (torch.abs(q_col - kv_col) <= KERNEL // 2)


def main(size=WIDTH * 64):
    return run("NATTEN", mask_mod=natten, size=size)


if __name__ == "__main__":
    main()
