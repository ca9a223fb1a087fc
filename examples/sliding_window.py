"""Sliding-window causal attention: each query sees the last WINDOW keys."""

from _common import run

WINDOW = 256


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOW)


def main(size=2048):
    return run("sliding window", mask_mod=sliding_window, size=size)


if __name__ == "__main__":
    main()
