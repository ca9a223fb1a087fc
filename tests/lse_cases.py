"""Losses that use the returned log-sum-exp, and a dense float64 autograd of attention to check
their gradients (shared by the lse-gradient tests of every back end)."""

import torch

SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])
BIAS = torch.randn(4, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
SCORE_MODS = {  # each built from the bias table it may read (a leaf, for its gradient)
    "none": lambda table: None,
    "alibi": lambda table: lambda s, b, h, q, kv: s + SLOPES[h] * (kv - q),  # separable: the fused path
    "softcap": lambda table: lambda s, b, h, q, kv: 5.0 * torch.tanh(s / 5.0),  # the generated loop
    "bias_table": lambda table: lambda s, b, h, q, kv: s + table[h, kv],
    # Query row 0 masked by the score_mod itself, then the table's bias added to every score.
    "bias_on_masked_rows": lambda table: lambda s, b, h, q, kv: torch.where(q > 0, s, float("-inf")) + table[h, kv],
}
MASKS = {
    "none": None,
    "causal": lambda b, h, q, kv: q >= kv,
    "window": lambda b, h, q, kv: (q - kv).abs() <= 5,
    "row_zero_empty": lambda b, h, q, kv: (q >= kv) & (q > 0),  # query row 0 attends nowhere
}


def dense_attention(q, k, v, score_mod, mask_mod):
    """out and lse of attention in float64 autograd, straight from the definition."""
    B, H, L, E = q.shape
    S = k.shape[2]
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) / E ** 0.5
    b, h = torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1)
    qi, kvi = torch.arange(L).view(1, 1, -1, 1), torch.arange(S).view(1, 1, 1, -1)
    if score_mod is not None:
        s = score_mod(s, b, h, qi, kvi).expand(B, H, L, S)
    if mask_mod is not None:
        s = s.masked_fill(~mask_mod(b, h, qi, kvi).expand(B, H, L, S), float("-inf"))
    empty = torch.isneginf(s).all(-1, keepdim=True)
    s_safe = s.masked_fill(empty, 0.0)
    lse = torch.where(empty.squeeze(-1), float("-inf"), torch.logsumexp(s_safe, -1))
    p = torch.where(empty, 0.0, torch.softmax(s_safe, -1))
    return p @ v, lse


def sink_loss(out, lse, sinks):
    """Attention sinks (out * sigmoid(lse - sink)) plus a z-loss on the finite lse."""
    finite = torch.isfinite(lse)
    gate = torch.sigmoid(lse - sinks.view(1, -1, 1)).masked_fill(~finite, 0.0)
    return (out * gate.unsqueeze(-1)).square().sum() + 1e-2 * torch.where(finite, lse, 0.0).square().sum()


def make_case(seed, B, Hkv, group, L, S, dtype):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(B, Hkv * group, L, 8), make(B, Hkv, S, 8), make(B, Hkv, S, 8), make(Hkv * group)



def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)
