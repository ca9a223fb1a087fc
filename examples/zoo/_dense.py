"""What the zoo's checks share: inputs, a dense attention written from the textbook formula, the comparisons.

Nothing here calls flexattn. ``dense_attention`` materializes every score
(float64), masks it, applies softmax and multiplies by V: the formula each
paper starts from. Every example builds its own dense mask or bias from the
paper's definition and hands it to ``dense_attention`` (or does its own
dense math), then ``check`` compares flexattn with it: the output and, for
variants that train, the gradient of every input, as relative errors
``max |ours - dense| / max |dense|`` (fp32 inputs; tolerances 1e-5 forward,
1e-4 gradients).
"""

from __future__ import annotations

import time
import warnings

import torch

FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def randn(*shape, seed=0, grad=True, scale=1.0):
    """A reproducible fp32 leaf tensor."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return x.requires_grad_(grad)


def qkv(batch, heads, q_len, dim, kv_len=None, v_dim=None, seed=0, grad=True):
    """Query, key, value of shapes (B, H, L, D), (B, H, S, D), (B, H, S, Dv)."""
    kv_len = kv_len or q_len
    return (randn(batch, heads, q_len, dim, seed=seed, grad=grad),
            randn(batch, heads, kv_len, dim, seed=seed + 1, grad=grad),
            randn(batch, heads, kv_len, v_dim or dim, seed=seed + 2, grad=grad))


def dense_scores(q, k, scale=None):
    """(B, H, L, S) scores ``q k^T * scale`` (scale defaults to 1/sqrt(D))."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return q @ k.transpose(-1, -2) * scale


def dense_attention(q, k, v, mask=None, bias=None, scale=None, return_lse=False):
    """softmax(q k^T * scale + bias, masked) @ v with a (broadcastable) bool mask; rows with no key give 0."""
    scores = dense_scores(q, k, scale)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1).clamp(min=-1e30)).nan_to_num(0.0)
    out = weights @ v
    return (out, lse) if return_lse else out


def rel_error(ours: torch.Tensor, dense: torch.Tensor) -> float:
    return ((ours.double() - dense.double()).abs().max() / dense.double().abs().max().clamp(min=1e-30)).item()


def _cotangent(out: torch.Tensor) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)


def check(ours, dense, leaves, *, grads=True):
    """Run ``ours(*leaves)`` (fp32) and ``dense(*leaves_as_float64)``; relative errors of outputs and gradients.

    Returns ``{"fwd": ..., "grad": ..., "ms": ...}`` ("grad": the worst over the leaves, None without grads;
    "ms": flexattn's forward time) and asserts both against the tolerances.
    """
    leaves = [x.detach().requires_grad_(grads and x.is_floating_point()) for x in leaves]
    doubles = [x.detach().double().requires_grad_(grads) if x.is_floating_point() else x for x in leaves]
    start = time.perf_counter()
    out = ours(*leaves)
    ms = (time.perf_counter() - start) * 1e3
    ref = dense(*doubles)
    errors = {"fwd": rel_error(out, ref), "grad": None, "ms": ms}
    if grads:
        cotangent = _cotangent(ref)
        mine = torch.autograd.grad((out.double() * cotangent).sum(), [x for x in leaves if x.requires_grad])
        theirs = torch.autograd.grad((ref * cotangent).sum(), [x for x in doubles if x.requires_grad])
        errors["grad"] = max(rel_error(a, b) for a, b in zip(mine, theirs))
    assert errors["fwd"] < FWD_TOL, f"forward differs from the dense formula: {errors['fwd']:.2e}"
    assert errors["grad"] is None or errors["grad"] < GRAD_TOL, f"gradients differ: {errors['grad']:.2e}"
    return errors


def torch_flex_error(ours_out, q, k, v, *, score_mod=None, mask_mod=None, B=None, H=None, BLOCK_SIZE=128, **kw):
    """The same mods run unchanged by torch's eager flex_attention (CPU, forward): relative error to ``ours_out``."""
    from torch.nn.attention import flex_attention as torch_flex

    block_mask = None
    if mask_mod is not None:
        block_mask = torch_flex.create_block_mask(mask_mod, B, H, q.shape[-2], k.shape[-2], device="cpu",
                                                  BLOCK_SIZE=BLOCK_SIZE)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        theirs = torch_flex.flex_attention(q.detach(), k.detach(), v.detach(), score_mod=score_mod,
                                           block_mask=block_mask, **kw)
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    error = rel_error(ours_out, theirs)
    assert error < FWD_TOL, f"torch's flex_attention gives another output: {error:.2e}"
    return error


def summary(block_mask) -> str:
    """Sparsity and how the tiles were decided, on one line."""
    if block_mask is None:
        return "no block mask"
    stats = block_mask.stats or {}
    decided = (f", {stats['decided_symbolically']}/{stats['tiles']} tiles symbolic, {stats['refined']} refined"
               if stats else ", tiles from the caller")
    classes = block_mask.tile_classes()
    empty = 100.0 * (classes == 0).sum().item() / classes.numel()  # torch's sparsity() counts padding when
    return f"sparsity {block_mask.sparsity():.1f}% ({empty:.1f}% of tiles empty){decided}"  # L % BLOCK != 0


def report(name, size, block_mask, errors, torch_error=None):
    """The example's one line: sizes, sparsity, time and every error (a line with "max |", like the examples)."""
    grad = f", grads {errors['grad']:.1e}" if errors.get("grad") is not None else ""
    theirs = f", torch flex eager {torch_error:.1e}" if torch_error is not None else ""
    print(f"{name}: L={size}, {summary(block_mask)}, attention {errors['ms']:.1f} ms, "
          f"max |ours - dense| / max |dense|: out {errors['fwd']:.1e}{grad}{theirs}")
    return dict(errors, torch=torch_error, block_mask=block_mask)
