"""Dilated sliding window: every DILATION-th key inside the window."""

from _common import run

WINDOW, DILATION = 512, 4


def dilated_sliding_window(b, h, q_idx, kv_idx):
    distance = q_idx - kv_idx
    return (distance >= 0) & (distance <= WINDOW) & (distance % DILATION == 0)


def main(size=2048):
    return run("dilated sliding window", mask_mod=dilated_sliding_window, size=size)


if __name__ == "__main__":
    main()
