"""The rows of ``benchmarks/gpu_check.py``: each row's mods, inputs and implementations.

A row is built into a ``Case``: the callables to time (each runs one forward,
or one forward+backward, and returns the output and the gradients), the
unmasked work it does, and the fp32 check of flexattn against the dense
reference. flexattn always runs through the public API with
``backend="triton"``; torch's flex_attention gets the same mods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as torch_flex

import flexattn
from decode import masks, paged_copy

TRAIN_MODS = ("causal", "causal+alibi", "sliding window", "packed documents", "causal+softcap")
DECODE_MASKS = {"causal-offset": "causal", "sliding window": "sliding"}  # row name -> its decode.masks name
SOFTCAP = 20.0


@dataclass(frozen=True)
class Sizes:
    """Every size the rows use; ``GPU`` is issue 22's, ``DRY`` the CPU dry run's."""

    B: int
    H: int
    H_KV: int  # decode rows: GQA H / H_KV query heads per KV head
    dims: tuple
    seqs: tuple  # training rows' S
    kv_lens: tuple  # decode rows' KV_LEN, one per entry of seqs (rows are run level by level)
    window: int
    page: int  # paged rows' page size, also the decode rows' KV block
    n_docs: int
    only: frozenset | None = None  # if given, the rows kept: (mod, layout, backward) triples


GPU = Sizes(B=4, H=16, H_KV=4, dims=(128, 64), seqs=(1024, 4096, 16384), kv_lens=(4096, 16384, 32768),
            window=1024, page=128, n_docs=8)
# The interpreter is slow (a training row takes seconds): the dry run has every mod, pass and layout once.
DRY = Sizes(B=1, H=2, H_KV=1, dims=(16,), seqs=(128,), kv_lens=(256,), window=48, page=128, n_docs=3,
            only=frozenset({("causal", "-", False), ("sliding window", "-", False), ("packed documents", "-", False),
                            ("causal+alibi", "-", True), ("causal+softcap", "-", True),
                            ("causal-offset", "contiguous", False), ("sliding window", "paged", False)}))


@dataclass(frozen=True)
class Row:
    kind: str  # "train" or "decode"
    mod: str
    layout: str  # "-" for training rows, "contiguous" or "paged" for decode rows
    D: int
    S: int  # S for training rows, KV_LEN for decode rows
    backward: bool

    @property
    def cells(self) -> list[str]:
        return [self.kind, self.mod, self.layout, str(self.D), str(self.S), "fwd+bwd" if self.backward else "fwd"]

    @property
    def label(self) -> str:
        return " ".join(self.cells)


def rows(sizes: Sizes) -> list[Row]:
    """Level by level (shortest sequences first), so a run cut short has every kind at the small sizes."""
    out = []
    for S, kv_len in zip(sizes.seqs, sizes.kv_lens):
        for D in sizes.dims:
            out += [Row("train", mod, "-", D, S, bwd) for mod in TRAIN_MODS for bwd in (False, True)]
        for D in sizes.dims:
            out += [Row("decode", mod, layout, D, kv_len, False)
                    for mod in DECODE_MASKS for layout in ("contiguous", "paged")]
    return [row for row in out if sizes.only is None or (row.mod, row.layout, row.backward) in sizes.only]


@dataclass
class Case:
    fns: dict  # implementation -> () -> (out, *grads); "SDPA" absent where it cannot express the mask
    flops: float  # 4 * D per unmasked (query, key) pair of every (b, h), x 3.5 for forward+backward
    fp32_errors: object  # () -> rel. errors (out, dq, dk, dv) of flexattn fp32 vs the dense reference


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def unmasked(mask_mod, batches: int, q_len: int, kv_len: int, device, chunk: int = 512) -> int:
    """Unmasked (query, key) pairs of one head summed over ``batches`` rows, a chunk of queries at a time
    (the mods here are elementwise torch expressions, so they evaluate on broadcast index tensors)."""
    kv = torch.arange(kv_len, device=device)[None, :]
    h = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for b in range(batches):
        for start in range(0, q_len, chunk):
            q = torch.arange(start, min(start + chunk, q_len), device=device)[:, None]
            total += int(mask_mod(torch.tensor(b, device=device), h, q, kv).sum())
    return total


def train_mods(name: str, S: int, sizes: Sizes, device):
    """(score_mod or None, mask_mod) of a training row; buffers are closed over as in user code."""
    slopes = torch.exp2(-8.0 * torch.arange(1, sizes.H + 1, device=device) / sizes.H)
    bounds = torch.distributions.Dirichlet(torch.ones(sizes.n_docs)).sample().cumsum(0) * S
    doc_id = torch.bucketize(torch.arange(S), bounds.round().long(), right=True).clamp(max=sizes.n_docs - 1)
    doc_id = doc_id.to(device)

    def causal(b, h, q, kv):
        return q >= kv

    def sliding(b, h, q, kv):
        return (q >= kv) & (q - kv < sizes.window)

    def documents(b, h, q, kv):
        return (doc_id[q] == doc_id[kv]) & (q >= kv)

    def alibi(score, b, h, q, kv):
        return score + slopes[h] * (kv - q)

    def softcap(score, b, h, q, kv):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    return {"causal": (None, causal), "causal+alibi": (alibi, causal), "sliding window": (None, sliding),
            "packed documents": (None, documents), "causal+softcap": (softcap, causal)}[name]


def _step(attention, inputs, grad):
    """() -> (out, *grads of inputs): one forward (grad None), or forward+backward."""
    def run():
        with torch.set_grad_enabled(grad is not None):
            out = attention(*inputs)
            return (out,) if grad is None else (out, *torch.autograd.grad(out, inputs, grad))
    return run


def _fp32_errors(ours, reference, inputs, backward: bool):
    """() -> rel. errors of ``ours`` vs ``reference`` on fp32 copies of ``inputs``, outputs then grads."""
    def run():
        copies = [x.detach().float().requires_grad_(backward) for x in inputs]
        grad = torch.randn(copies[0].shape[:-1] + copies[2].shape[-1:], device=copies[0].device) if backward else None
        got, want = _step(ours, copies, grad)(), _step(reference, copies, grad)()
        return [relative(a, b) for a, b in zip(got, want)]
    return run


def train_case(row: Row, sizes: Sizes, device, torch_attention) -> Case:
    """A training row: bf16 (B, H, S, D) q/k/v; the fp32 check runs on q/k/v[:1, :2] (one batch row,
    two heads), where the dense reference's (S, S) score matrices fit in memory at every S."""
    torch.manual_seed(0)
    S = row.S
    score_mod, mask_mod = train_mods(row.mod, S, sizes, device)
    inputs = [torch.randn(sizes.B, sizes.H, S, row.D, device=device, dtype=torch.bfloat16,
                          requires_grad=row.backward) for _ in range(3)]
    grad = torch.randn_like(inputs[0]) if row.backward else None
    ours_bm = flexattn.create_block_mask(mask_mod, None, None, S, S, device=device)
    theirs_bm = torch_flex.create_block_mask(mask_mod, None, None, S, S, device=device)

    def ours(q, k, v, backend="triton"):
        return flexattn.flex_attention(q, k, v, score_mod, block_mask=ours_bm, backend=backend)

    fns = {"flexattn": _step(ours, inputs, grad),
           "torch flex": _step(lambda q, k, v: torch_attention(q, k, v, score_mod=score_mod, block_mask=theirs_bm),
                               inputs, grad)}
    if row.mod == "causal":  # SDPA expresses causal (and no mask) only; the other rows say n/a
        fns["SDPA"] = _step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), inputs, grad)
    work = unmasked(mask_mod, 1, S, S, device) * sizes.B * sizes.H
    flops = 4 * row.D * work * (3.5 if row.backward else 1.0)
    sliced = [x[:1, :2] for x in inputs]
    return Case(fns, flops, _fp32_errors(ours, lambda q, k, v: ours(q, k, v, "reference"), sliced, row.backward))


def decode_case(row: Row, sizes: Sizes, device, torch_attention) -> Case:
    """A decode row: Q_LEN=1, GQA H:H_KV, a serving batch (row b holds KV_LEN * (1 - b/16) tokens), K/V
    contiguous or in flexattn's PagedKVCache (pages placed as sequences that grow side by side); torch
    flex and SDPA read the contiguous K/V. SDPA gets the (B, 1, 1, KV_LEN) bool mask of each sequence."""
    torch.manual_seed(0)
    B, KV = sizes.B, row.S
    lengths = [KV - b * KV // 16 for b in range(B)]
    mask_mod = masks(torch.tensor(lengths, device=device), sizes.window)[DECODE_MASKS[row.mod]]
    q = torch.randn(B, sizes.H, 1, row.D, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(B, sizes.H_KV, KV, row.D, device=device, dtype=torch.bfloat16) for _ in range(2))
    logical = flexattn.create_block_mask(mask_mod, B, None, 1, KV, device=device, BLOCK_SIZE=(1, sizes.page))
    theirs_bm = torch_flex.create_block_mask(mask_mod, B, None, 1, KV, device=device, BLOCK_SIZE=sizes.page)
    dense = torch.stack([mask_mod(torch.tensor(b, device=device), 0, torch.zeros(1, 1, dtype=torch.long,
                                                                                 device=device),
                                  torch.arange(KV, device=device)[None, :]) for b in range(B)])[:, None]
    if row.layout == "paged":
        cache, k_cache, v_cache = paged_copy(k, v, lengths, sizes.page)
        ours_kv, ours_bm = (k_cache, v_cache), cache.convert_logical_block_mask(logical)
        expand = lambda kc, vc: cache.expand_kv(kc, vc, B)  # noqa: E731
    else:
        ours_kv, ours_bm, expand = (k, v), logical, lambda kc, vc: (kc, vc)

    def ours(q, kc, vc):
        return flexattn.flex_attention(q, *expand(kc, vc), block_mask=ours_bm, enable_gqa=True, backend="triton")

    def reference(q, k, v):
        return flexattn.flex_attention(q, k, v, block_mask=logical, enable_gqa=True, backend="reference")

    fns = {"flexattn": _step(ours, [q, *ours_kv], None),
           "torch flex": _step(lambda q, k, v: torch_attention(q, k, v, block_mask=theirs_bm, enable_gqa=True),
                               [q, k, v], None),
           "SDPA": _step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True),
                         [q, k, v], None)}
    flops = 4 * row.D * unmasked(mask_mod, B, 1, KV, device) * sizes.H

    def fp32_errors():
        got = ours(q.float(), *(x.float() for x in ours_kv))
        return [relative(got, reference(q.float(), k.float(), v.float()))]

    return Case(fns, flops, fp32_errors)


def build(row: Row, sizes: Sizes, device, torch_attention) -> Case:
    return (train_case if row.kind == "train" else decode_case)(row, sizes, device, torch_attention)
