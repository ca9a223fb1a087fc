"""Caches of traced mods and of BlockMasks, keyed by what a mod is made of.

A mod's *fingerprint* is its code object and, recursively, everything it can read: closure
cells, defaults, the globals its code names, ``functools.partial`` arguments, nested functions
(transformers' ``and_masks`` of closures). Numbers, strings, dtypes and devices enter by value,
tensors by shape, strides, dtype, device and requires_grad, plus their place in the walk. So a
closure variable rebound to another number, or a global reassigned, is another fingerprint and is
traced again; a new closure over new tensors of the same shapes (a model's mask for every
forward) reuses the trace, with its buffers bound to the new tensors, whose values the kernels
read when they run: a tensor changed in place is read fresh.

A trace that read a captured tensor's values (``.item()``, ``int(t)``, any torch call on real
tensors only) may have baked them in: such a trace is reused only for the very same tensors at the
same ``_version``. A buffer that is not one of the walked tensors (made inside the mod), a bound
method's object, a callable instance or a module other than torch's, math's and numpy's make a mod
uncacheable: it is traced on every call, as before.

A BlockMask depends on the values of the tensors its mask reads: ``cached_block_mask`` reuses one
for the same fingerprint and arguments when each tensor is the same object at the same version,
or (for tensors of up to ``VALUE_KEY_ELEMENTS`` elements, such as a padding mask) equal in value.
"""

from __future__ import annotations

import copy
import functools
import sys
import threading
import types
import weakref
from collections import OrderedDict

import torch
from torch.overrides import TorchFunctionMode

from flexattn.capture import is_internal_frame
from flexattn.proxy import Proxy

TRACE_ENTRIES, BLOCK_MASK_ENTRIES = 512, 64
VALUE_KEY_ELEMENTS = 1 << 16
_STABLE_MODULES = {"torch", "math", "numpy", "operator", "functools", "builtins"}
# Torch calls on real tensors that read no values (metadata: the tracer's own, and a mod's .shape).
_METADATA = {"__get__", "stride", "size", "dim", "data_ptr", "numel", "__len__", "is_floating_point", "element_size"}
_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_traces: OrderedDict = OrderedDict()
_block_masks: OrderedDict = OrderedDict()
_building = threading.local()  # (mod, fingerprint) while cached_block_mask builds or traces a mask of mod


class _Uncacheable(Exception):
    pass


def _global_names(code: types.CodeType):
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _walk(value, tensors: list, seen: set):
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
    if isinstance(value, _SCALARS):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_walk(v, tensors, seen) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((k, _walk(v, tensors, seen)) for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))))
    if isinstance(value, functools.partial):
        return ("P", _walk(value.func, tensors, seen), _walk(value.args, tensors, seen),
                _walk(value.keywords, tensors, seen))
    if isinstance(value, types.FunctionType):
        if id(value) in seen:
            return ("F", value.__code__)
        seen.add(id(value))
        cells = []
        for cell in value.__closure__ or ():
            try:
                cells.append(_walk(cell.cell_contents, tensors, seen))
            except ValueError:  # an empty cell
                cells.append(("EMPTY",))
        scope = value.__globals__
        names = tuple((n, _walk(scope[n], tensors, seen)) for n in dict.fromkeys(_global_names(value.__code__))
                      if n in scope)
        return ("F", value.__code__, _walk(value.__defaults__, tensors, seen),
                _walk(value.__kwdefaults__, tensors, seen), tuple(cells), names)
    if isinstance(value, types.ModuleType) and value.__name__.split(".")[0] in _STABLE_MODULES:
        return ("M", value.__name__)
    if isinstance(value, (types.BuiltinFunctionType, torch._ops.OpOverloadPacket)):
        return ("B", value)
    raise _Uncacheable


def fingerprint(fn) -> tuple | None:
    """(key, tensors in walk order) of a mod, or None when it is uncacheable (see the module docstring).

    Example: ``fingerprint(lambda b, h, q, kv: q >= kv)[0]`` is hashable; ``fingerprint(obj.method)``
    is None. Raises nothing.
    """
    tensors: list = []
    try:
        key = _walk(fn, tensors, set())
        hash(key)
    except (_Uncacheable, TypeError):
        return None
    # Which tensors are one buffer to the tracer (the same object or view) is part of the program.
    views = [(t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in tensors]
    return (key, tuple(views.index(v) for v in views)), tensors


def _caller():
    """The frame that made the torch call being handled, past the modes' handlers stacked on it."""
    frame = sys._getframe(2)
    while frame.f_code.co_name == "__torch_function__":
        frame = frame.f_back
    return frame


class _ValueReads(TorchFunctionMode):
    """On around a trace: notes torch calls on real tensors and no traced value (they may read values)."""

    def __init__(self):
        super().__init__()
        self.read = False

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [*args, *kwargs.values()]
        leaves += [x for leaf in leaves if isinstance(leaf, (tuple, list)) for x in leaf]
        real = any(isinstance(x, torch.Tensor) for x in leaves)
        if real and getattr(func, "__name__", "") not in _METADATA and not any(isinstance(x, Proxy) for x in leaves) \
                and not is_internal_frame(_caller().f_code.co_filename):  # the tracer's own calls read no values
            self.read = True
        return func(*args, **kwargs)


def _remember(cache: OrderedDict, key, entry, limit: int) -> None:
    cache[key] = entry
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def cached_trace(fn, kind: str, trace):
    """``trace(fn)`` (a ``TracedMod``), reused for mods with the same fingerprint (module docstring).

    ``kind`` separates score_mod and mask_mod traces. Raises what ``trace`` raises (``TraceError``);
    a failed trace is not kept. Example: ``cached_trace(mod, "mask_mod", _trace_mask)``.
    """
    from flexattn.trace import TracedMod

    building = getattr(_building, "mod", None)
    found = building[1] if building is not None and building[0] is fn else fingerprint(fn)
    if found is None:
        return trace(fn)
    key, tensors = (kind, found[0]), found[1]
    entry = _traces.get(key)
    if entry is not None:
        graph, positions, pinned = entry
        if pinned is None or all(t is p and t._version == v for t, (p, v) in zip(tensors, pinned)):
            _traces.move_to_end(key)
            return TracedMod(graph, tuple(tensors[i] for i in positions))
    watch = _ValueReads()
    with watch:
        traced = trace(fn)
    ids = {id(t): i for i, t in enumerate(tensors)}
    if all(id(b) in ids for b in traced.buffers):
        pinned = tuple((t, t._version) for t in tensors) if watch.read else None
        _remember(_traces, key, (traced.graph, tuple(ids[id(b)] for b in traced.buffers), pinned), TRACE_ENTRIES)
    return traced


def _same_values(tensors: list, stored: tuple) -> bool:
    for t, (ref, version, value) in zip(tensors, stored):
        if ref() is t and t._version == version:
            continue
        if value is None or t.shape != value.shape or t.dtype != value.dtype or not torch.equal(t.detach().cpu(), value):
            return False
    return True


def cached_block_mask(mask_mod, arguments: tuple, build, trace):
    """``build()`` (a BlockMask of ``mask_mod``), reused for the same fingerprint, arguments and tensor values.

    ``arguments``: a hashable tuple of everything else the mask depends on (sizes, block, device).
    The result carries this call's ``mask_mod`` and its trace (``trace(mask_mod)``, e.g.
    ``flexattn.trace.trace_mask_mod``: its buffers are this closure's tensors). Raises what
    ``build`` raises. Example:
    ``cached_block_mask(mask, (B, H, L, S), lambda: build(mask, B, H, L, S), trace_mask_mod)``.
    """
    found = fingerprint(mask_mod)
    if found is None:
        return build()
    key, tensors = (found[0], arguments), found[1]
    entry = _block_masks.get(key)
    # A cached mask whose tile lists a caller wrote in place (the copies handed out share them) is
    # not served again.
    hit = entry is not None and _same_values(tensors, entry[1]) and entry[0].lists_unchanged()
    outer, _building.mod = getattr(_building, "mod", None), (mask_mod, found)  # tracing this mod: no second walk
    try:
        if hit:
            _block_masks.move_to_end(key)
            return entry[0].relabelled(mask_mod, trace(mask_mod))
        block_mask = build()
    finally:
        _building.mod = outer
    stored = tuple((weakref.ref(t), t._version,
                    t.detach().cpu().clone() if t.numel() <= VALUE_KEY_ELEMENTS else None) for t in tensors)
    _remember(_block_masks, key, (copy.copy(block_mask), stored), BLOCK_MASK_ENTRIES)
    return block_mask
