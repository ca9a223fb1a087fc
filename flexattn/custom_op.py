"""flex_attention inside ``torch.compile``: one custom op, no graph break, no re-trace of the mods.

``flex_attention`` called while dynamo compiles (``torch.compiler.is_compiling()``) comes here
when its score_mod is None or a method of an ``nn.Module`` (``self.score_mod`` reading
``self.param``) and its block_mask is None or a flexattn BlockMask. Then:

- dynamo never looks inside flexattn: ``_planned_attention`` is ``torch._dynamo.nonstrict_trace``,
  so dynamo puts one opaque call in its graph, passing the module (its parameters are tracked for
  autograd) and the BlockMask (a pytree: its tile lists and the tensors its mask_mod captures
  are inputs, the mask_mod a constant; a new padding tensor each forward is a new input, never a
  stale constant);
- while AOTAutograd traces that call, flexattn traces the mods once, with its own tracer, into IR
  (``plan``), keeps the IR in ``_PLANS`` and records ``torch.ops.flexattn.attention`` with the
  IR's number, the captured tensors as inputs and a fake implementation for shapes;
- at run time the op runs the back end as eager ``flex_attention`` does; its backward is a second
  op (``attention_backward``) that recomputes the forward under autograd and differentiates it,
  so gradients reach query, key, value and every float tensor the score_mod reads.

Shapes stay symbolic (``torch.compile(dynamic=True)``, or dynamo's automatic dynamic shapes), so a
new sequence length does not recompile; a BlockMask's lengths are Python ints that dynamo guards
on. A plan number lives in this process only: compiled graphs with flexattn ops are not portable.
Other mods (closures created inside the compiled region) take flex_attention's eager path, where
dynamo breaks the graph.
"""

from __future__ import annotations

import math
import types

import torch
import torch.utils._pytree as pytree

from flexattn import dispatch
from flexattn import kernel_options as options
from flexattn.block_mask import BlockMask
from flexattn.trace import ReboundMaskMod, trace_mask_mod, trace_score_mod

# plan number -> (score graph, mask graph, BLOCK_SIZE, seq_lengths, which BlockMask fields are there, backend)
_PLANS: dict[int, tuple] = {}
_NUMBERS: dict[tuple, int] = {}
_BLOCK_FIELDS = BlockMask._TENSOR_ATTRS[:8]


def _flatten_block_mask(bm: BlockMask):
    """Leaves: the tile lists there are, then the tensors the mask_mod captures (so that under
    torch.compile they are graph inputs, not constants baked into the op); the context keeps the
    mask_mod, which ``_unflatten_block_mask`` rebinds to those tensors (``ReboundMaskMod``)."""
    present = tuple(getattr(bm, name) is not None for name in _BLOCK_FIELDS)
    lists = bm.tile_lists()
    # Attributes only, never a trace: dynamo runs this function itself.
    mask_mod = bm.mask_mod
    if isinstance(mask_mod, ReboundMaskMod):
        mask_mod, buffers = mask_mod.mask_mod, mask_mod.buffers
    elif bm.traced_mask is not None:
        buffers = bm.traced_mask.buffers
    else:  # no trace kept (a BlockMask built by hand): the mask_mod is a constant, plan() traces it
        return lists, (bm.seq_lengths, bm.BLOCK_SIZE, present, mask_mod, None)
    return lists + list(buffers), (bm.seq_lengths, bm.BLOCK_SIZE, present, mask_mod, len(buffers))


def _unflatten_block_mask(values, context) -> BlockMask:
    seq_lengths, block_size, present, mask_mod, n_buffers = context
    values = list(values)
    if n_buffers is not None:
        mask_mod = ReboundMaskMod(mask_mod, values[len(values) - n_buffers:])
        values = values[:len(values) - n_buffers]
    given = iter(values)
    return BlockMask(seq_lengths, *(next(given) if there else None for there in present),
                     BLOCK_SIZE=block_size, mask_mod=mask_mod)


pytree.register_pytree_node(BlockMask, _flatten_block_mask, _unflatten_block_mask,
                            serialized_type_name="flexattn.BlockMask")


def routable(score_mod, block_mask) -> bool:
    """Whether ``flex_attention`` under ``torch.compile`` can take the custom op for these mods.

    Example: ``routable(module.score_mod, None)`` is True, ``routable(lambda s, b, h, q, kv: s, None)`` False.
    """
    method_of_module = isinstance(score_mod, types.MethodType) and isinstance(score_mod.__self__, torch.nn.Module)
    return (score_mod is None or method_of_module) and (block_mask is None or isinstance(block_mask, BlockMask))


def plan(score_mod, block_mask: BlockMask | None, backend: str) -> tuple[int, tuple, tuple]:
    """Trace the mods once into IR; (plan number, score buffers, mask buffers).

    The same IR gets the same number. Raises ``TraceError`` for mods that cannot be traced.
    Example: ``number, score_buffers, _ = plan(module.score_mod, None, "torch")``.
    """
    score = trace_score_mod(score_mod) if score_mod is not None else None
    mask = trace_mask_mod(block_mask.mask_mod) if block_mask is not None else None
    layout = (None, None, ()) if block_mask is None else (
        block_mask.BLOCK_SIZE, block_mask.seq_lengths, tuple(getattr(block_mask, f) is not None for f in _BLOCK_FIELDS))
    entry = (score.graph if score else None, mask.graph if mask else None, *layout, backend)
    number = _NUMBERS.setdefault(entry, len(_NUMBERS))  # AOTAutograd traces a call more than once
    _PLANS[number] = entry
    return number, (score.buffers if score else ()), (mask.buffers if mask else ())


def _run(query, key, value, score_buffers, mask_buffers, block_tensors, number, scale, enable_gqa):
    score_graph, mask_graph, block_size, seq_lengths, present, backend = _PLANS[number]
    block_mask = None
    if present:
        given = iter(block_tensors)
        block_mask = BlockMask(seq_lengths, *(next(given) if there else None for there in present),
                               BLOCK_SIZE=block_size)
    out, lse, _ = dispatch.run(backend, dispatch.call_of(
        query, key, value, score_graph=score_graph, score_buffers=tuple(score_buffers), mask_graph=mask_graph,
        mask_buffers=tuple(mask_buffers), block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
        kernel_options=options.normalize(None)))
    return out, lse


@torch.library.custom_op("flexattn::attention", mutates_args=())
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_buffers: list[torch.Tensor],
              mask_buffers: list[torch.Tensor], block_tensors: list[torch.Tensor], number: int, scale: float,
              enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """flexattn's attention as one op: (out (B, Hq, L, Ev), lse (B, Hq, L) float32) for plan ``number``."""
    out, lse = _run(query, key, value, score_buffers, mask_buffers, block_tensors, number, scale, enable_gqa)
    return out.contiguous(), lse.contiguous()


@attention.register_fake
def _attention_fake(query, key, value, score_buffers, mask_buffers, block_tensors, number, scale, enable_gqa):
    B, Hq, L, _ = query.shape
    return query.new_empty(B, Hq, L, value.shape[-1]), query.new_empty(B, Hq, L, dtype=torch.float32)


_OUTSIDE_AUTOGRAD = torch._C._dispatch_tls_local_exclude_set()  # the exclusions of plain eager code


def _differentiable(buffers) -> list[int]:
    return [i for i, t in enumerate(buffers) if t.is_floating_point()]


@torch.library.custom_op("flexattn::attention_backward", mutates_args=())
def attention_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       score_buffers: list[torch.Tensor], mask_buffers: list[torch.Tensor],
                       block_tensors: list[torch.Tensor], grad_out: torch.Tensor, grad_lse: torch.Tensor,
                       number: int, scale: float, enable_gqa: bool) -> list[torch.Tensor]:
    """Gradients of ``attention`` for query, key, value and the float score buffers, in that order."""
    # An op's implementation runs below autograd (its keys excluded from dispatch); the recompute
    # needs autograd back, with the caller's other exclusions kept.
    outside = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), _OUTSIDE_AUTOGRAD & outside), \
            torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (query, key, value)]
        buffers = [t.detach().requires_grad_() if t.is_floating_point() else t for t in score_buffers]
        out, lse = _run(*inputs, buffers, mask_buffers, block_tensors, number, scale, enable_gqa)
        wrt = inputs + [buffers[i] for i in _differentiable(score_buffers)]
        grads = torch.autograd.grad((out, lse), wrt, (grad_out, grad_lse), allow_unused=True)
    # Laid out like their inputs, as the fake says (an input may be a strided view, e.g. transformers' key).
    return [torch.zeros_like(t) if g is None else torch.empty_like(t).copy_(g) for t, g in zip(wrt, grads)]


@attention_backward.register_fake
def _attention_backward_fake(query, key, value, score_buffers, mask_buffers, block_tensors, grad_out, grad_lse,
                             number, scale, enable_gqa):
    return [torch.empty_like(t) for t in (query, key, value, *(score_buffers[i] for i in _differentiable(score_buffers)))]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.score_buffers, ctx.mask_buffers, ctx.block_tensors = inputs[3], inputs[4], inputs[5]
    ctx.number, ctx.scale, ctx.enable_gqa = inputs[6:]


def _backward(ctx, grad_out, grad_lse):
    query, key, value = ctx.saved_tensors
    grad_lse = torch.zeros_like(grad_lse) if grad_lse is None else grad_lse
    grads = attention_backward(query, key, value, ctx.score_buffers, ctx.mask_buffers, ctx.block_tensors,
                               grad_out.contiguous(), grad_lse.contiguous(), ctx.number, ctx.scale, ctx.enable_gqa)
    buffer_grads = [None] * len(ctx.score_buffers)
    for i, g in zip(_differentiable(ctx.score_buffers), grads[3:]):
        buffer_grads[i] = g
    return (*grads[:3], buffer_grads, [None] * len(ctx.mask_buffers), [None] * len(ctx.block_tensors),
            None, None, None)


attention.register_autograd(_backward, setup_context=_setup_context)


_NO_MODULE = torch.nn.Module()  # nonstrict_trace takes no None: the module of "no score_mod"


@torch._dynamo.nonstrict_trace
def _planned_attention(query, key, value, module, method: str, block_masks: tuple, scale, enable_gqa, backend):
    score_mod = getattr(module, method) if method else None
    block_mask = block_masks[0] if block_masks else None
    number, score_buffers, mask_buffers = plan(score_mod, block_mask, backend)
    block_tensors = [] if block_mask is None else block_mask.tile_lists()
    return torch.ops.flexattn.attention(query, key, value, list(score_buffers), list(mask_buffers), block_tensors,
                                        number, scale, enable_gqa)


def compiled_flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa, backend: str):
    """``flex_attention`` while dynamo compiles (see the module docstring): (out (B, Hq, L, Ev), lse (B, Hq, L)).

    Example: inside ``torch.compile(fullgraph=True)``, ``flexattn.flex_attention(q, k, v,
    score_mod=self.score_mod)`` comes here. Raises ``TraceError`` while compiling for untraceable mods.
    """
    module, method = (score_mod.__self__, score_mod.__func__.__name__) if score_mod is not None else (_NO_MODULE, "")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if backend == "auto":
        backend = dispatch.default_backend(query.device.type)
    block_masks = () if block_mask is None else (block_mask,)
    return _planned_attention(query, key, value, module, method, block_masks, scale, enable_gqa, backend)
