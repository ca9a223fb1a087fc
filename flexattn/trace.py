"""Tracing: run a score_mod or mask_mod on proxy values and record the IR.

``trace_score_mod(fn)`` / ``trace_mask_mod(fn)`` call the user's function once
with ``Proxy`` objects (``flexattn.proxy``) standing for ``score``, ``b``,
``h``, ``q_idx`` and ``kv_idx``. Real tensors the mod touches (captured from
a closure or global) become named buffer inputs, so their contents are
run-time data, not part of the graph.

Anything that would need the *value* of a traced index (``if``, ``and``,
``int()``, ``.item()``) raises ``TraceError`` naming the user's line.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass

import torch

from flexattn import passes
from flexattn.errors import TraceError
from flexattn.ir import MASK_MOD_INPUTS, SCORE_MOD_INPUTS, DType, Graph, Node, Op
from flexattn.capture import trace_stack
from flexattn.mod_cache import cached_trace
from flexattn.proxy import Proxy, cast_proxy, as_proxy
from flexattn.semantics import evaluate
from flexattn.spellings import ModTracer
from flexattn.vectors import Vector


@dataclass(frozen=True)
class TracedMod:
    """A traced mod: its IR and the tensors its buffer inputs stand for."""

    graph: Graph
    buffers: tuple[torch.Tensor, ...]

    def __str__(self) -> str:
        return str(self.graph)


class ReboundMaskMod:
    """``mask_mod`` with the tensors it captures replaced by ``buffers`` (in the order of its
    trace's buffer inputs): calling it evaluates its IR over them; tracing it gives that IR with
    them. A BlockMask passed through ``torch.compile`` carries one, so that the captured tensors
    are graph inputs (``flexattn.custom_op``). A plain class: dynamo builds it in compiled code.

    Example: ``ReboundMaskMod(padded, (new_lengths,))(0, 0, torch.arange(4)[:, None], torch.arange(4))``.
    """

    def __init__(self, mask_mod, buffers):
        self.mask_mod, self.buffers = mask_mod, tuple(buffers)

    def __call__(self, b, h, q_idx, kv_idx):
        env = {name: torch.as_tensor(value) for name, value in zip(MASK_MOD_INPUTS, (b, h, q_idx, kv_idx))}
        return evaluate(trace_mask_mod(self).graph, env, self.buffers)


def _check_arity(fn, names: tuple[str, ...], kind: str):
    if not callable(fn):
        raise TraceError(f"{kind} must be a callable, got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*names)
    except TypeError:
        location, line = _definition_site(fn)
        raise TraceError(
            f"{kind} must take {len(names)} arguments ({', '.join(names)}), but "
            f"'{getattr(fn, '__name__', 'mod')}' takes ({', '.join(signature.parameters)}).",
            location, line) from None


def _definition_site(fn):
    code = getattr(fn, "__code__", None)
    if code is None:
        return None, ""
    try:
        import linecache
        return (code.co_filename, code.co_firstlineno), linecache.getline(code.co_filename, code.co_firstlineno)
    except Exception:
        return (code.co_filename, code.co_firstlineno), ""


def _trace(fn, kind: str, names: tuple[str, ...]) -> TracedMod:
    _check_arity(fn, names, kind)
    tracer = ModTracer()
    inputs = [Proxy(Node(Op.INPUT, DType.FLOAT32 if n == "score" else DType.INT64, (), n)) for n in names]
    trace_stack.append(tracer)
    try:
        result = fn(*inputs)
        out = _output(result, kind, fn)
    finally:
        trace_stack.pop()
    location, _ = _definition_site(fn)
    origin = f"{location[0]}:{location[1]}" if location else ""
    graph = Graph(kind, out.node, tuple(tracer.buffer_specs), getattr(fn, "__name__", kind), origin)
    return TracedMod(passes.simplify(graph), tuple(tracer.buffer_tensors))


def _output(result, kind: str, fn) -> Proxy:
    if isinstance(result, (Proxy, bool, int, float, torch.Tensor, Vector)):
        if isinstance(result, (torch.Tensor, Vector)) and not isinstance(result, Proxy) and result.ndim != 0:
            location, line = _definition_site(fn)
            raise TraceError(f"{kind} returned a tensor of shape {list(result.shape)}; it must return one value "
                             "per (b, h, q_idx, kv_idx): reduce it (.sum(-1), .any(-1)) or index it.", location, line)
        out = as_proxy(result)
    else:
        location, line = _definition_site(fn)
        raise TraceError(f"{kind} returned {type(result).__name__}; it must return a "
                         f"{'bool' if kind == 'mask_mod' else 'score'} value.", location, line)
    if kind == "mask_mod" and out.node.dtype is not DType.BOOL:
        location, line = _definition_site(fn)
        raise TraceError(f"mask_mod must return a bool (a comparison, or comparisons combined with "
                         f"& | ~), but '{getattr(fn, '__name__', 'mod')}' returned {out.node.dtype.value}. "
                         "Compare it, e.g. `x != 0`, or return a mask expression.", location, line)
    if kind == "score_mod" and out.node.dtype is not DType.FLOAT32:
        out = cast_proxy(out, DType.FLOAT32)
    return out


def trace_score_mod(score_mod) -> TracedMod:
    """Trace ``score_mod(score, b, h, q_idx, kv_idx) -> score`` into IR.

    Raises ``TraceError`` (naming the user's file:line) for constructs that
    cannot be traced. A mod with the same fingerprint as one traced before (same code and captured
    values, tensors of the same shapes: ``flexattn.mod_cache``) is not traced again.

    Example::

        >>> t = trace_score_mod(lambda s, b, h, q, kv: s + (q - kv))
        >>> print(t.graph)  # doctest: +SKIP
    """
    return cached_trace(score_mod, "score_mod", functools.partial(_trace, kind="score_mod", names=SCORE_MOD_INPUTS))


def trace_mask_mod(mask_mod) -> TracedMod:
    """Trace ``mask_mod(b, h, q_idx, kv_idx) -> bool`` into IR (see ``trace_score_mod``)."""
    if isinstance(mask_mod, ReboundMaskMod):
        return TracedMod(trace_mask_mod(mask_mod.mask_mod).graph, mask_mod.buffers)
    return cached_trace(mask_mod, "mask_mod", functools.partial(_trace, kind="mask_mod", names=MASK_MOD_INPUTS))


def required_positional_args(fn) -> int:
    """How many positional arguments ``fn`` needs, the count torch reads a mod's kind from.

    Parameters with defaults (``w=3``) and those a ``functools.partial`` binds do not count.
    """
    code = getattr(fn, "__code__", None)
    if code is not None and not isinstance(fn, (functools.partial, types.MethodType)):  # a method's self is bound
        return code.co_argcount - len(getattr(fn, "__defaults__", None) or ())
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return len(SCORE_MOD_INPUTS)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty)


def trace(mod) -> TracedMod:
    """Trace a score_mod (5 required positional arguments) or a mask_mod (4), as torch tells them apart.

    Raises ``TraceError`` for a callable that needs another number of arguments.
    """
    n = required_positional_args(mod)
    if n not in (len(MASK_MOD_INPUTS), len(SCORE_MOD_INPUTS)):
        location, line = _definition_site(mod)
        raise TraceError(f"a mod must take 4 positional arguments (b, h, q_idx, kv_idx: a mask_mod) or 5 "
                         f"(score, b, h, q_idx, kv_idx: a score_mod), but '{getattr(mod, '__name__', 'mod')}' "
                         f"needs {n}. Give extra parameters defaults or bind them with functools.partial.",
                         location, line)
    return trace_mask_mod(mod) if n == len(MASK_MOD_INPUTS) else trace_score_mod(mod)


__all__ = ["Proxy", "TracedMod", "trace", "trace_mask_mod", "trace_score_mod"]
