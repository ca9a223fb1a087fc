"""Oracles for the conformance suite: torch's own flex_attention, and a dense float64 autograd reference.

torch (eager, CPU) is the oracle for forward outputs, the LSE, ``create_mask`` and the
BlockMask structure. torch refuses gradients on CPU, so gradients are checked against
``reference``: scores materialised in float64, the mods applied with torch's own
``_vmap_for_bhqkv`` (the vmap torch's eager path uses; for the score_mod without torch's
getitem-to-index transform, whose backward cannot take chained indexing like
``table[b][q_idx]``), masked with -inf, softmax.

A ``Case`` names a mod pair and the sizes to run it at. ``build(*params)`` returns
``(score_mod, mask_mod)``; ``params`` are the float tensors the score_mod reads (a model
would learn them), so the reference can rebuild the mods from float64 copies and the
gradients of those tensors can be compared too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
from torch.nn.attention import flex_attention as tfa
from torch.nn.attention.flex_attention import _vmap_for_bhqkv

import flexattn


FWD_TOL = 1e-5    # float32 flexattn against float32 torch: relative (norm-wise) error
GRAD_TOL = 1e-4   # float32 flexattn gradients against the float64 reference
GRAD_FLOOR = 1e-2  # errors of a gradient far smaller than the largest one are measured against that one


@dataclass
class Case:
    name: str
    build: Callable  # build(*params) -> (score_mod, mask_mod)
    params: tuple = ()
    L: int = 128
    S: int | None = None
    B: int = 2
    H: int = 2
    D: int = 16
    block: int | tuple = 32
    xfail: dict = field(default_factory=dict)  # aspect ("forward", ...) -> failure class, while it fails

    @property
    def kv_len(self) -> int:
        return self.L if self.S is None else self.S

    def mods(self, dtype=torch.float32, requires_grad=False):
        """(score_mod, mask_mod, params) with the params as fresh leaves of ``dtype``."""
        params = [p.detach().to(dtype).requires_grad_(requires_grad) for p in self.params]
        score_mod, mask_mod = self.build(*params)
        return score_mod, mask_mod, params

    def __repr__(self) -> str:
        return self.name


def case_id(case) -> str:
    return case.name


def qkv(B, H, L, S, D, *, Hkv=None, Bkv=None, Dv=None, dtype=torch.float32, seed=0, requires_grad=False,
        layouts=None):
    """q, k, v of random values; ``layouts``: per tensor, the order its dims are stored in memory
    (outermost first; e.g. (0, 1, 3, 2) stores the head dim outside the positions), same values."""
    g = torch.Generator().manual_seed(seed)
    Hkv, Bkv, Dv = Hkv or H, Bkv or B, Dv or D
    shapes = ((B, H, L, D), (Bkv, Hkv, S, D), (Bkv, Hkv, S, Dv))
    tensors = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    if layouts is not None:
        tensors = [t.permute(order).contiguous().permute([order.index(i) for i in range(4)])
                   for t, order in zip(tensors, layouts)]
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


def case_qkv(case: Case, **kw):
    return qkv(case.B, case.H, case.L, case.kv_len, case.D, **kw)


# ---------------------------------------------------------------- running both libraries

def torch_block_mask(mask_mod, B, H, L, S, block):
    return None if mask_mod is None else tfa.create_block_mask(mask_mod, B, H, L, S, device="cpu", BLOCK_SIZE=block)


def flex_block_mask(mask_mod, B, H, L, S, block):
    return None if mask_mod is None else flexattn.create_block_mask(mask_mod, B, H, L, S, BLOCK_SIZE=block)


def run_torch(q, k, v, score_mod=None, block_mask=None, **kw):
    """torch's eager flex_attention: (out, lse), no gradients (torch has none on CPU).

    torch runs its eager path through dynamo, whose cache can hand a mod made by the same
    factory (one code object, another closure) the graph of an earlier one, e.g. a
    ``torch.Tensor.tanh`` mod's graph to a ``clamp_min`` mod: the cache is cleared first.
    """
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that eager mode is unfused
        out, aux = tfa.flex_attention(q.detach(), k.detach(), v.detach(), score_mod=score_mod,
                                      block_mask=block_mask, return_aux=tfa.AuxRequest(lse=True), **kw)
    return out, aux.lse


def run_flex(q, k, v, score_mod=None, block_mask=None, **kw):
    out, aux = flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                       return_aux=flexattn.AuxRequest(lse=True), **kw)
    return out, aux.lse


def reference(q, k, v, score_mod=None, mask_mod=None, scale=None, enable_gqa=False):
    """Dense attention with autograd: (out, lse, max_scores), in the inputs' dtype.

    Fully masked rows give out 0, lse -inf and max -inf, as torch's flex_attention does.
    ``k``/``v`` with batch 1 broadcast over the query batch; GQA repeats kv heads.
    """
    B, Hq, L, E = q.shape
    k, v = k.expand(B, *k.shape[1:]), v.expand(B, *v.shape[1:])
    if enable_gqa:
        k, v = (t.repeat_interleave(Hq // t.shape[1], dim=1) for t in (k, v))
    scale = E ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1).to(q.dtype)) * scale
    idx = [torch.arange(n) for n in (B, Hq, L, k.shape[2])]
    if score_mod is not None:  # plain vmap: autograd through captured tables is exact there
        scores = _vmap_for_bhqkv(score_mod, prefix=(0,))(scores, *idx)
    if mask_mod is not None:
        with TransformGetItemToIndex():
            keep = _vmap_for_bhqkv(mask_mod, prefix=())(*idx).to(torch.bool)
        scores = torch.where(keep, scores, float("-inf"))
    live = ~torch.isneginf(scores)
    row_live = live.any(-1, keepdim=True)
    safe = torch.where(row_live, scores, torch.zeros((), dtype=scores.dtype))
    lse = torch.logsumexp(safe, -1, keepdim=True)
    probs = torch.exp(safe - lse) * live
    out = torch.where(row_live, probs @ v.to(probs.dtype), torch.zeros((), dtype=probs.dtype))
    neg_inf = torch.full((), float("-inf"), dtype=scores.dtype)
    lse = torch.where(row_live, lse, neg_inf).squeeze(-1)
    max_scores = torch.where(row_live, safe.amax(-1, keepdim=True), neg_inf).squeeze(-1)
    return out, lse, max_scores


# ---------------------------------------------------------------- comparisons

def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """||got - want|| / max(||want||, floor)."""
    got, want = got.detach().double(), want.detach().double()
    return (got - want).norm().item() / max(want.norm().item(), floor, 1e-30)


def assert_close(got, want, tol, what, floor=0.0):
    """Same shape, same -inf/+inf positions, no NaN, finite entries within ``tol`` relative error.

    ``floor`` keeps a gradient that is exactly 0 in theory (a bias constant along a softmax
    row) from turning float32 rounding noise into a huge relative error."""
    assert got is not None, f"{what}: got None"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach().double(), want.detach().double()
    assert not torch.isnan(got).any(), f"{what}: NaN in the result"
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{what}: the infinite entries differ"
    finite = torch.isfinite(want)
    assert torch.equal(got[~finite], want[~finite]), f"{what}: the signs of infinite entries differ"
    err = rel_err(got[finite], want[finite], floor)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


def assert_forward_matches_torch(q, k, v, score_mod, mask_mod, B, H, block, **kw):
    """flexattn's (out, lse) equal torch's for the same mods, sizes and call arguments."""
    L, S = q.shape[2], k.shape[2]
    want = run_torch(q, k, v, score_mod, torch_block_mask(mask_mod, B, H, L, S, block), **kw)
    got = run_flex(q, k, v, score_mod, flex_block_mask(mask_mod, B, H, L, S, block), **kw)
    assert got[0].dtype == want[0].dtype, f"output dtype {got[0].dtype} != torch's {want[0].dtype}"
    assert_close(got[0], want[0], FWD_TOL, "out")
    assert_close(got[1], want[1], FWD_TOL, "lse")


def check_forward(case: Case, **kw):
    score_mod, mask_mod, _ = case.mods()
    q, k, v = case_qkv(case)
    assert_forward_matches_torch(q, k, v, score_mod, mask_mod, case.B, case.H, case.block, **kw)


def gradients(q, k, v, params, score_mod, mask_mod, block, *, through_lse, reference_impl, seed=1, **kw):
    """Gradients of sum(out * g) (+ sum(lse * g') where finite) w.r.t. q, k, v and params."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    if reference_impl:
        out, lse, _ = reference(q, k, v, score_mod, mask_mod, **kw)
    else:
        out, lse = run_flex(q, k, v, score_mod, flex_block_mask(mask_mod, B, H, L, S, block), **kw)
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g).to(out.dtype)).sum()
    if through_lse:
        finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=lse.dtype))
        loss = loss + (finite_lse * torch.randn(lse.shape, generator=g).to(lse.dtype)).sum()
    inputs = [t for t in (q, k, v, *params) if t.requires_grad]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, grads)]


def assert_gradients_match_reference(case: Case, *, through_lse=False, qkv_grad=True, qkv_kw=None, **kw):
    """flexattn's float32 gradients (q, k, v and every param) equal the float64 reference's."""
    results = []
    for dtype, reference_impl in ((torch.float32, False), (torch.float64, True)):
        score_mod, mask_mod, params = case.mods(dtype, requires_grad=True)
        q, k, v = case_qkv(case, dtype=dtype, requires_grad=qkv_grad, **(qkv_kw or {}))
        results.append(gradients(q, k, v, params, score_mod, mask_mod, case.block,
                                 through_lse=through_lse, reference_impl=reference_impl, **kw))
    names = (["dq", "dk", "dv"] if qkv_grad else []) + [f"dparam{i}" for i in range(len(case.params))]
    floor = GRAD_FLOOR * max(g.norm().item() for g in results[1])
    for name, got, want in zip(names, *results):
        assert_close(got, want, GRAD_TOL, name, floor=floor)


# ---------------------------------------------------------------- block masks and dense masks

def dense_lists(num_blocks, indices) -> torch.Tensor:
    """(..., ROWS, COLS) bool: True at the first ``num_blocks`` listed column of each row."""
    cols = indices.shape[-1]
    listed = torch.arange(cols) < num_blocks[..., None]
    dense = torch.zeros(*indices.shape[:-1], cols + 1, dtype=torch.bool)
    dense.scatter_(-1, torch.where(listed, indices.long(), cols), True)
    return dense[..., :cols]


def tile_classes(bm, q_major=False) -> torch.Tensor:
    """0 empty, 1 partial, 2 full, read from the kv-major (or q-major, transposed back) lists."""
    prefix = "q" if q_major else "kv"
    partial = dense_lists(getattr(bm, f"{prefix}_num_blocks"), getattr(bm, f"{prefix}_indices"))
    classes = partial.to(torch.int8)
    if getattr(bm, f"full_{prefix}_num_blocks") is not None:
        full = dense_lists(getattr(bm, f"full_{prefix}_num_blocks"), getattr(bm, f"full_{prefix}_indices"))
        classes = classes + 2 * full.to(torch.int8)
    return classes.transpose(-1, -2) if q_major else classes


def assert_same_block_mask(got, want):
    """flexattn's BlockMask describes the same tiles as torch's, through torch's API."""
    assert tuple(got.shape) == tuple(want.shape), f"shape {tuple(got.shape)} != torch's {tuple(want.shape)}"
    assert tuple(got.BLOCK_SIZE) == tuple(want.BLOCK_SIZE)
    assert torch.equal(got.to_dense().to(torch.int32), want.to_dense().to(torch.int32)), "to_dense() differs"
    assert torch.equal(tile_classes(got), tile_classes(want)), "full/partial tile classes differ"
    assert torch.equal(tile_classes(got, q_major=True), tile_classes(want, q_major=True)), "q-major lists differ"
    assert abs(got.sparsity() - want.sparsity()) < 1e-9, f"sparsity {got.sparsity()} != {want.sparsity()}"
    assert got.numel() == want.numel()


def check_block_mask(mask_mod, B, H, L, S, block):
    assert_same_block_mask(flex_block_mask(mask_mod, B, H, L, S, block),
                           torch_block_mask(mask_mod, B, H, L, S, block))


def check_create_mask(mod, B, H, L, S):
    got = flexattn.create_mask(mod, B, H, L, S)
    want = tfa.create_mask(mod, B, H, L, S, device="cpu")
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), \
        f"{got.dtype}{tuple(got.shape)} != torch's {want.dtype}{tuple(want.shape)}"
    assert torch.equal(got, want), f"{int((got != want).sum())} entries differ from torch's create_mask"


# ---------------------------------------------------------------- one test per aspect per case

ASPECTS = ("forward", "block_mask", "create_mask", "gradients")


def params_for(cases, aspect):
    """pytest params of the cases that have this aspect; strict xfail where the case says it fails."""
    def applies(case):
        score_mod, mask_mod, _ = case.mods()
        return {"block_mask": mask_mod is not None, "gradients": True,
                "create_mask": True, "forward": True}[aspect]
    return [pytest.param(case, id=case.name, marks=[pytest.mark.xfail(strict=True, reason=case.xfail[aspect])]
                         if aspect in case.xfail else []) for case in cases if applies(case)]


def run_aspect(case: Case, aspect: str):
    score_mod, mask_mod, _ = case.mods()
    if aspect == "forward":
        check_forward(case)
    elif aspect == "block_mask":
        check_block_mask(mask_mod, case.B, case.H, case.L, case.kv_len, case.block)
    elif aspect == "create_mask":
        for mod in (m for m in (mask_mod, score_mod) if m is not None):
            check_create_mask(mod, case.B, case.H, case.L, case.kv_len)
    else:
        assert_gradients_match_reference(case)


def make_case_tests(cases):
    """test_forward / test_block_mask / test_create_mask / test_gradients over ``cases``."""
    def make(aspect):
        @pytest.mark.parametrize("case", params_for(cases, aspect))
        def test(case):
            run_aspect(case, aspect)
        test.__name__ = f"test_{aspect}"
        return test
    return [make(aspect) for aspect in ASPECTS]
