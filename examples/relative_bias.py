"""A learned relative-position bias table, trained one step: the table gets a gradient."""

import time

import torch

import flexattn

HEADS = 4


def main(size=512):
    table = torch.zeros(HEADS, 2 * size - 1, requires_grad=True)  # bias per head and distance

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + size - 1]

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, size, 64, generator=g, requires_grad=True) for _ in range(3))
    block_mask = flexattn.create_block_mask(causal, None, None, size, size)
    optimizer = torch.optim.SGD([table], lr=1.0)
    start = time.perf_counter()
    out = flexattn.flex_attention(q, k, v, score_mod=relative_bias, block_mask=block_mask)
    loss = out.square().mean()
    loss.backward()
    step_ms = (time.perf_counter() - start) * 1e3
    reference_grad, = torch.autograd.grad(
        flexattn.flex_attention(q, k, v, score_mod=relative_bias, block_mask=block_mask,
                                backend="reference").square().mean(), table)
    error = (table.grad - reference_grad).abs().max().item()
    print(f"relative bias: L={size}, fwd+bwd {step_ms:.1f} ms, |grad table| {table.grad.norm():.3e}, "
          f"max |grad - reference grad| {error:.1e}")
    assert error < 1e-5 and table.grad.abs().sum() > 0
    optimizer.step()
    return table


if __name__ == "__main__":
    main()
