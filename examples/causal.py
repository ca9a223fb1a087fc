"""Causal attention: each query sees itself and the past."""

from _common import run


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def main(size=2048):
    return run("causal", mask_mod=causal, size=size)


if __name__ == "__main__":
    main()
