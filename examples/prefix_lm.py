"""Prefix-LM: the prefix is attended bidirectionally, the rest causally."""

from _common import run

PREFIX = 300


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < PREFIX) | (q_idx >= kv_idx)


def main(size=2048):
    return run("prefix-LM", mask_mod=prefix_lm, size=size)


if __name__ == "__main__":
    main()
