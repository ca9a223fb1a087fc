"""The public attention API, with torch's names and signatures.

``flex_attention`` validates its inputs, traces the mods into IR and hands
the IR (plus the BlockMask the analysis built) to a back end in ``codegen``.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch

from codegen.paths import Choice
from flexattn import dispatch
from flexattn import kernel_options as options
from flexattn.block_mask import BlockMask
from flexattn.call import Call, check_heads
from flexattn.errors import InputError
from flexattn.semantics import evaluate, index_grid
from flexattn.trace import TracedMod, trace, trace_mask_mod, trace_score_mod


class AuxRequest(NamedTuple):
    """Which auxiliary outputs ``flex_attention(..., return_aux=...)`` returns."""

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    """Auxiliary outputs: ``lse`` and ``max_scores``, each (B, Hq, L) float32, or None."""

    lse: torch.Tensor | None = None
    max_scores: torch.Tensor | None = None


def validate_inputs(query, key, value, enable_gqa: bool, block_mask_batch: int | None = None):
    """Check query/key/value as torch's flex_attention does; return (query, key, value) for a back end.

    query (B, Hq, L, E), key (B or 1, Hkv, S, E), value (B or 1, Hkv, S, Ev). As in torch, a key
    and value batch of 1 broadcasts against the query's batch when the BlockMask has the query's
    batch (``block_mask_batch``), and key/value may have another float dtype than query (all are
    computed in the widest of their dtypes; the caller returns the output in query's). Raises ``InputError`` naming
    the argument before any work is done.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must be 4-D (B, H, L, E), got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise InputError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.shape[-1] == 0:
            raise InputError(f"{name} has head dim 0 (shape {list(t.shape)}); every head needs at least one feature")
    if not (query.device == key.device == value.device):
        raise InputError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    B, Hq, L, E = query.shape
    if key.shape[0] != value.shape[0]:
        raise InputError(f"key and value batch sizes differ: {key.shape[0]} vs {value.shape[0]}")
    if key.shape[0] != B:
        if key.shape[0] != 1 or block_mask_batch != B:
            raise InputError(f"batch sizes differ: query {B}, key/value {key.shape[0]}. A key/value batch of 1 "
                             "broadcasts only with a block_mask built for the query's batch "
                             f"(create_block_mask(mask_mod, {B}, H, ...)), as in torch")
        key, value = key.expand(B, *key.shape[1:]), value.expand(B, *value.shape[1:])
    if key.shape[2] != value.shape[2]:
        raise InputError(f"key and value lengths differ: {key.shape[2]} vs {value.shape[2]}")
    if key.shape[1] != value.shape[1]:
        raise InputError(f"key and value head counts differ: {key.shape[1]} vs {value.shape[1]}")
    if key.shape[3] != E:
        raise InputError(f"query and key head dims differ: {E} vs {key.shape[3]}")
    if L == 0 or key.shape[2] == 0:
        raise InputError(f"empty sequence: Q_LEN={L}, KV_LEN={key.shape[2]}; both must be positive")
    check_heads(Hq, key.shape[1], enable_gqa)
    if not (query.dtype == key.dtype == value.dtype):
        common = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
        query, key, value = query.to(common), key.to(common), value.to(common)
    return query, key, value


def mask_of(block_mask: BlockMask) -> TracedMod:
    """The traced mask_mod of a BlockMask: the trace kept from building it, else a trace of its
    mask_mod (``flexattn.mod_cache`` keeps it)."""
    return block_mask.traced_mask or trace_mask_mod(block_mask.mask_mod)


def flex_attention(query, key, value, score_mod=None, block_mask: BlockMask | None = None,
                   scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                   kernel_options: dict | None = None, *, return_aux: AuxRequest | None = None,
                   backend: str = "auto"):
    r"""Attention with a user-defined score modification and block-sparse mask.

    Computes ``softmax(score_mod(q @ k^T * scale) masked by block_mask) @ v``.

    Args:
        query: (B, Hq, L, E). key: (B, Hkv, S, E). value: (B, Hkv, S, Ev). As in torch, key/value
            may have batch 1 with a block_mask of batch B, and another float dtype than query.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` or None.
        block_mask: a ``BlockMask`` from ``create_block_mask`` or None (attend everywhere).
        scale: defaults to ``1 / sqrt(E)``.
        enable_gqa: let Hq be a multiple of Hkv (grouped-query attention).
        return_lse: also return the log-sum-exp (B, Hq, L) (prefer ``return_aux``).
        kernel_options: back-end options: torch's keys and flexattn's (``flexattn.kernel_options.OPTIONS``
            lists each with its meaning); an unknown key raises ``InputError``.
        return_aux: ``AuxRequest(lse=True, max_scores=True)`` returns ``(out, AuxOutput)``.
        backend: ``"auto"`` (the fastest for the device), ``"reference"``, ``"torch"`` or ``"triton"``.

    Returns:
        out (B, Hq, L, Ev) in query's dtype; plus lse or an ``AuxOutput`` when asked.
        A fully masked query row gives 0 output and -inf lse.

    Raises:
        InputError (a ValueError): shapes, dtypes or devices that do not fit.
        TraceError: a mod that cannot be traced (names the line).
        BlockMaskError: a block_mask built for other sequence lengths.

    Example::

        >>> def causal(b, h, q_idx, kv_idx):
        ...     return q_idx >= kv_idx
        >>> bm = create_block_mask(causal, None, None, 256, 256)
        >>> q = k = v = torch.randn(1, 2, 256, 16)
        >>> flex_attention(q, k, v, block_mask=bm).shape
        torch.Size([1, 2, 256, 16])
    """
    if return_lse and return_aux is not None:
        raise InputError("pass either return_lse or return_aux, not both (return_lse is deprecated)")
    if return_lse:
        _warn_once("return_lse is deprecated (as in torch); use return_aux=AuxRequest(lse=True) instead")
    wants_max = return_aux is not None and return_aux.max_scores
    if torch.compiler.is_compiling() and kernel_options is None and not wants_max \
            and _compile_path().routable(score_mod, block_mask):
        # Under torch.compile: one custom op, the mods traced by flexattn (flexattn.custom_op).
        validate_inputs(query, key, value, enable_gqa, None if block_mask is None else block_mask.kv_num_blocks.shape[0])
        (out, lse), max_scores = _compile_path().compiled_flex_attention(
            query, key, value, score_mod, block_mask, scale, enable_gqa, backend), None
    else:
        name, call = _prepare(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options,
                              wants_max, backend)
        out, lse, max_scores = dispatch.run(name, call)
    out = out.to(query.dtype)
    if return_aux is not None:
        return out, AuxOutput(lse if return_aux.lse else None, max_scores if return_aux.max_scores else None)
    if return_lse:
        return out, lse
    return out


def explain_call(query, key, value, score_mod=None, block_mask: BlockMask | None = None, scale: float | None = None,
                 enable_gqa: bool = False, return_lse: bool = False, kernel_options: dict | None = None, *,
                 return_aux: AuxRequest | None = None, backend: str = "auto", print_it: bool = True) -> Choice:
    """Which path ``flex_attention`` with these arguments takes, and why each earlier path of the back
    end's table was skipped; nothing is computed beyond what choosing needs.

    Takes ``flex_attention``'s arguments (same shapes and checks) and returns a
    ``codegen.paths.Choice``: ``.backend``, ``.path.name``, ``.skipped`` ((path, reason) pairs in
    table order) and ``.facts``; ``str(choice)`` is the explanation, printed unless ``print_it=False``.

    Raises what ``flex_attention`` raises for these arguments (``InputError`` for a
    ``kernel_options["PATH"]`` that cannot serve the call, naming the reason).

    Example::

        >>> q = k = v = torch.randn(1, 2, 1, 64)
        >>> choice = explain_call(q, k, v, print_it=False)
        >>> choice.path.name, choice.skipped[0][0]
        ('generated_loop', 'decode_batch_in_place')
    """
    name, call = _prepare(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options,
                          return_aux is not None and return_aux.max_scores, backend)
    choice = dispatch.choose(name, call)
    if print_it:
        print(choice)
    return choice


def _prepare(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, max_scores: bool,
             backend: str) -> tuple[str, Call]:
    """Validate, trace and analyse: (back end name, the ``Call`` it runs)."""
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        block_mask = BlockMask.from_torch(block_mask)
    query, key, value = validate_inputs(query, key, value, enable_gqa,
                                        block_mask.kv_num_blocks.shape[0] if block_mask is not None else None)
    kernel_options = options.normalize(kernel_options)
    L, S = query.shape[2], key.shape[2]
    score = trace_score_mod(score_mod) if score_mod is not None else None
    mask = None
    if block_mask is not None:
        block_mask.check_lengths(L, S)
        block_mask = block_mask.visited_tiles()
        mask = mask_of(block_mask)
        _check_block_mask_batch(block_mask, query)
    name = dispatch.pick_backend(backend, query.device.type)
    call = dispatch.call_of(query, key, value, score_graph=score.graph if score else None,
                            score_buffers=score.buffers if score else (), mask_graph=mask.graph if mask else None,
                            mask_buffers=mask.buffers if mask else (), block_mask=block_mask, scale=scale,
                            enable_gqa=enable_gqa, kernel_options=kernel_options, max_scores=max_scores)
    return name, call


def _compile_path():
    """flexattn.custom_op, imported on first use under torch.compile (it needs torch._dynamo loaded)."""
    from flexattn import custom_op

    return custom_op


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, FutureWarning, stacklevel=3)


def _check_block_mask_batch(block_mask: BlockMask, query: torch.Tensor) -> None:
    B, H = query.shape[0], query.shape[1]
    mb, mh = block_mask.kv_num_blocks.shape[:2]
    if mb not in (1, B) or mh not in (1, H):
        raise InputError(f"the BlockMask has batch/heads ({mb}, {mh}) but query has ({B}, {H}); "
                         "build it with B and H of the query (or None to broadcast)")


# A dense evaluation holds the bool result and an int64 intermediate of the full shape at once.
DENSE_BYTES_PER_ELEMENT = 9


def memory_limit_bytes() -> int:
    """The machine's physical memory (the most a dense evaluation could ever get)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**40  # no sysconf (Windows): let the allocator decide


def create_mask(mod_fn, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device="cpu") -> torch.Tensor:
    """Evaluate a mask_mod (or score_mod) densely: a (B, H, Q_LEN, KV_LEN) bool tensor.

    For a score_mod, True where the modified score (of a zero score) is not -inf,
    as torch does. ``B=None`` / ``H=None`` mean 1. Cost is O(B*H*Q_LEN*KV_LEN):
    prefer ``create_block_mask`` for long sequences.

    Raises ``InputError`` for non-positive sizes or a dense mask larger than the
    machine's memory (before allocating), and ``TraceError`` for mods that cannot be traced.
    A mod is a mask_mod when it needs 4 positional arguments and a score_mod when it
    needs 5 (parameters with defaults do not count), as in torch.

    Example::

        >>> create_mask(lambda b, h, q, kv: q >= kv, 1, 1, 3, 3)[0, 0]
        tensor([[ True, False, False],
                [ True,  True, False],
                [ True,  True,  True]])
    """
    B, H = 1 if B is None else B, 1 if H is None else H
    for name, n in (("B", B), ("H", H), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if not isinstance(n, int) or n <= 0:
            raise InputError(f"{name} must be a positive int, got {n!r}")
    needed = DENSE_BYTES_PER_ELEMENT * B * H * Q_LEN * KV_LEN
    if needed > memory_limit_bytes():
        raise InputError(f"create_mask(B={B}, H={H}, Q_LEN={Q_LEN}, KV_LEN={KV_LEN}) is a dense mask of "
                         f"{B * H * Q_LEN * KV_LEN:,} elements and needs about {needed / 2**30:.1f} GiB, more than "
                         f"this machine's {memory_limit_bytes() / 2**30:.1f} GiB; use create_block_mask, which "
                         "costs O(tiles), or smaller sizes")
    traced = trace(mod_fn)
    env = index_grid(B, H, Q_LEN, KV_LEN, device)
    buffers = [b.to(device) for b in traced.buffers]
    if traced.graph.kind == "score_mod":
        env["score"] = torch.zeros(B, H, Q_LEN, KV_LEN, device=device)
        return ~torch.isneginf(evaluate(traced.graph, env, buffers).expand(B, H, Q_LEN, KV_LEN))
    return evaluate(traced.graph, env, buffers).to(torch.bool).expand(B, H, Q_LEN, KV_LEN).contiguous()
