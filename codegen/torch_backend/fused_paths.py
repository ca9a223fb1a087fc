"""What the fused paths ask of a call: whether torch's fused kernel computes it exactly, the plan
(per document, or causal squares, rectangles of FULL tiles and batches of PARTIAL tiles) and
whether that plan pays. ``codegen.torch_backend.paths`` turns these into the table's entries.

Plans are kept per BlockMask (``BlockMask.derived``): a training or serving loop calls attention
with one BlockMask many times, and planning (the causal squares' tile checks evaluate the
mask_mod) is a visible share of a call (docs/performance.md). Entries go with their BlockMask and
are stamped with its tile lists and the mask's buffers (``flexattn.memo``), so a changed buffer or
index list plans again; the evaluated bias features are kept with the score_mod's graph, stamped
with its buffers.
"""

from __future__ import annotations

import torch

from codegen.autograd import differentiable
from codegen.torch_backend import fused, fused_plan
from codegen.torch_backend.kernel import DEFAULT_MAX_TILES
from codegen.torch_backend.fused import MAX_BIAS_SPAN, MAX_BIASED_SQUARE, Features, FusedInputs
from codegen.torch_backend.tiles import loop_work
from flexattn.call import Call, needs_grad
from flexattn.memo import Memo

_UNMASKED = Memo(limit=64)  # plans of calls without a BlockMask, by shapes
_BY_CLASSES = Memo(limit=64)  # plans by tile classes (``_by_classes``)
MAX_CLASSES_KEY = 4096  # tile matrices up to this many tiles are keys by value


def why_not_fused(call: Call) -> str | None:
    """Why torch's fused CPU kernel cannot compute ``call`` exactly (None: it can)."""
    if call.options.get("FUSED", "auto") is False:
        return "kernel_options FUSED=False"
    if call.query.device.type != "cpu":
        return f"the tensors are on {call.query.device.type}: the fused kernel is torch's CPU kernel"
    if call.max_scores:
        return "max_scores was requested and the fused kernel does not return it"
    E, Ek, Ev = call.query.shape[-1], call.key.shape[-1], call.value.shape[-1]
    if not E == Ek == Ev:
        return f"head dims differ (query {E}, key {Ek}, value {Ev}): the fused kernel needs one head dim"
    if call.score_graph is not None:
        if call.facts.bias is None:
            return "the score_mod is not a separable bias (score + row x column terms)"
        if needs_grad(*call.score_buffers):
            return "a score_mod buffer needs a gradient, which the fused kernel does not compute"
    return None


def features(call: Call) -> Features | None:
    """The separable bias evaluated for this call (None without a score_mod); made once per call."""
    def make():
        if call.score_graph is None:
            return None
        B, Hq, _, L, S = call.shape
        # Kept with the graph for these buffers (unchanged) and shapes: a layer's every call reuses it.
        memo = call.score_graph.derived("fused features", Memo)
        return memo.get("features", (B, Hq, L, S), call.score_buffers,
                        lambda: Features(call.facts.bias, [t.detach() for t in call.score_buffers], B, Hq, L, S))
    return call.derived("fused_features", make)


def why_not_bias_span(call: Call) -> str | None:
    """Why the bias features would lose digits in float32 (None: they do not, or there is no bias)."""
    f = features(call)
    if f is not None and f.span() > MAX_BIAS_SPAN:
        return f"the bias features span {f.span():.3g} > MAX_BIAS_SPAN ({MAX_BIAS_SPAN:g}): float32 would lose digits"
    return None


def document_plan(call: Call):
    """(units, None) running one fused call per packed document, or (None, why not)."""
    def make():
        reason = _why_not_documents(call)  # read off the call: not worth keeping with the BlockMask
        return (None, reason) if reason is not None else _cached(call, ("documents",), _documents)

    return call.derived("fused_documents", make)


def tile_plan(call: Call, forced: bool):
    """(units, None) of causal squares, FULL rectangles and PARTIAL batches, or (None, why not):
    the plan does not pay against the generated loop (``fused_plan.why_not_pays``) and ``forced`` is False."""
    def make():
        kind = ("tiles", call.score_graph is not None, _max_tiles(call), forced)
        units, reason = _by_classes(call) or _cached(call, kind, lambda call: _paying_tiles(call, forced))
        return (units, None) if reason is None or forced else (None, reason)
    return call.derived(("fused_tiles", forced), make)


def _by_classes(call: Call):
    """The tile plan kept by the values of the BlockMask's tile classes, where the plan reads
    nothing else of the call than B and Hq: the plan does not consult the mask_mod (``_consults_mask``),
    and whether it pays reads the tile counts, the lengths, the tile size and max_tiles.
    A decoding loop builds a new BlockMask every step, with the classes of the step before for a
    tile's worth of steps. None where this does not apply (a large tile matrix too)."""
    bm = call.block_mask
    if bm is None:
        return None
    classes = bm.tile_classes()
    if _consults_mask(call) or classes.numel() > MAX_CLASSES_KEY:
        return None
    B, Hq, _, L, S = call.shape
    key = (B, Hq, L, S, call.block_size, _max_tiles(call), call.score_graph is not None, tuple(classes.shape),
           classes.cpu().numpy().tobytes())
    return _BY_CLASSES.get(key, (), (), lambda: _paying_tiles(call, forced=False))


def _why_not_documents(call: Call) -> str | None:
    L, S = call.shape[3:]
    if call.score_graph is not None:
        return "a score_mod is given: documents run without one"
    if call.mask_graph is None:
        return "no mask_mod: no documents"
    if not call.facts.exact:
        return ("the BlockMask is not the exact block reduction of this mask_mod (create_block_mask), "
                "or a tensor the mask_mod captures changed since it was built")
    if call.facts.segments is None:
        return ("the mask_mod is not a packed-documents mask (doc[q] == doc[kv], optionally causal or "
                "prefix-LM)")
    if L != S:
        return f"Q_LEN ({L}) != KV_LEN ({S}): documents need one sequence"
    return None


def _documents(call: Call):
    B, Hq, _, L, S = call.shape
    segments = call.facts.segments
    buffers = [t.cpu() for t in call.mask_buffers]
    rows = range(B) if segments.batched and B > 1 else range(1)  # batched ids: one unit per batch row
    units, documents = [], 0
    for b in rows:
        pieces = segments.pieces(buffers, L, b)
        if pieces is None:
            return None, ("a document id comes back after another (documents are not runs), or the order "
                          "buffer is not increasing inside a document")
        documents = max(documents, len(segments.segments(buffers, L, b)))
        batch = slice(b, b + 1) if len(rows) > 1 else slice(0, B)
        units.append(fused_plan.PlanUnit(batch, slice(0, Hq), torch.zeros(1, 1, dtype=torch.int8), segments=pieces))
    if L < fused_plan.MIN_DOCUMENT * documents:
        return None, (f"{documents} documents average {L / documents:.0f} < MIN_DOCUMENT ({fused_plan.MIN_DOCUMENT}) "
                      "positions: one call per document would not pay")
    return units, None


def _max_tiles(call: Call) -> int:
    return int(call.options.get("max_tiles", DEFAULT_MAX_TILES))


def _paying_tiles(call: Call, forced: bool):
    """(units, why they do not pay against the generated loop, None: they do); ``forced``: the
    path is forced, and its PARTIAL tiles are cut even where the shape rule refuses the plan."""
    units = _tiles(call)
    B, Hq, _, L, S = call.shape
    # Cutting PARTIAL tiles evaluates the mask on them: only where the shape rule lets the plan through
    # (cutting leaves its FULL rectangles and squares as they are). Cut tiles have no additive mask,
    # so no bias: with a score_mod they stay PARTIAL.
    shaped = forced or fused_plan.why_not_shaped(units) is None
    if _consults_mask(call) and call.score_graph is None and shaped:
        fused_plan.cut_partial(units, fused_plan.TileProfiles(call.mask_graph, call.mask_buffers, call.block_size, L, S))
    loop = loop_work(call.block_mask, B, Hq, L, S, call.block_size, _max_tiles(call))
    return units, fused_plan.why_not_pays(units, call.block_size, L, S, loop)


def _consults_mask(call: Call) -> bool:
    """Whether the tile plan evaluates the mask_mod: for causal squares (of 2 tiles or more, with
    square tiles: ``fused_plan.triangle_squares``) and for cutting PARTIAL tiles (``subtiles``)."""
    if call.mask_graph is None or call.block_mask is None:
        return False
    nq, nkv = call.block_mask.tile_classes().shape[-2:]
    return call.block_size[0] == call.block_size[1] and min(nq, nkv) >= 2


def _tiles(call: Call):
    B, Hq, _, L, S = call.shape
    block = call.block_size
    biased = call.score_graph is not None
    units = fused_plan.plan(call.block_mask, B, Hq, L, S, block, call.facts.diagonals,
                            MAX_BIASED_SQUARE if biased else None)
    if not biased:  # gathered keys carry no bias features
        fused_plan.gather_rows(units, S // block[1])
    return units


def _cached(call: Call, kind, compute):
    """``compute(call)``, kept per BlockMask and ``kind`` until an input changes (see the module
    docstring); without a BlockMask, by shapes (the plan then depends on nothing else)."""
    B, Hq, _, L, S = call.shape
    key = (B, Hq, L, S, call.block_size,
           call.mask_graph.structural_key() if call.mask_graph is not None else None)
    if call.block_mask is None:
        return _UNMASKED.get((kind, key), (), (), lambda: compute(call))
    return call.block_mask.derived(("fused", kind), key, lambda: compute(call), call.mask_buffers)


class _FusedLaunch:
    """The fused plan as ``codegen.autograd`` runs it: forward and backward on the same units."""

    def __init__(self, call: Call, units):
        self.call, self.units, self.features = call, units, features(call)
        self.compute = call.compute_dtype

    def problem(self, q, k, v) -> FusedInputs:
        c = self.compute
        return FusedInputs(q.to(c), k.to(c), v.to(c), self.call.block_size, self.call.scale, self.call.mask_graph,
                       self.call.mask_buffers, self.features)

    def forward(self, q, k, v, score_buffers):
        out, lse = fused.forward(self.problem(q, k, v), self.units)
        return out, lse, None  # out in the compute float: the backward reads it

    def backward(self, q, k, v, out, lse, grad_out, grad_lse, score_buffers, slots):
        dtypes = q.dtype, k.dtype, v.dtype
        grad_out = grad_out.to(out.dtype)
        if grad_lse is not None:
            q, k, v, out, grad_out = fused.with_lse_column(q, k, v, out, grad_out, grad_lse, lse)
        p = self.problem(q, k, v)
        dq, dk, dv = fused.backward(p, self.units, out, lse, grad_out.contiguous())
        if grad_lse is not None:
            dq, dk, dv = (x[..., :-1] for x in (dq, dk, dv))
        if p.group > 1:  # the query heads of one KV head add up
            dk, dv = (x.unflatten(1, (-1, p.group)).sum(2) for x in (dk, dv))
        return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), []


def run_fused(call: Call, units):
    """(out, lse, None) of ``units`` on torch's fused kernel, differentiable in q, k and v."""
    launch = _FusedLaunch(call, units)
    if needs_grad(call.query, call.key, call.value):
        out, lse, _ = differentiable(launch, call.query, call.key, call.value)
    else:
        out, lse, _ = launch.forward(call.query, call.key, call.value, ())
    return out.to(call.query.dtype), lse, None
