"""Values derived from tensors, kept while those tensors are unchanged.

A call of ``flex_attention`` derives plans from its BlockMask and its mods' buffers (the tiles each
query row visits, the fused kernel's rectangles, a separable bias evaluated per row and column).
A training or serving loop makes the same call many times (every layer of a model shares one
BlockMask), so these are kept, and each lookup checks that they are still right:

A *stamp* of tensors is, per tensor, a weak reference (the stamp keeps nothing alive), its storage
address and its in-place version (``_version``: bumped by every in-place op, shared by a tensor and
its views). A tensor replaced by another, or changed in place, no longer matches its stamp, so a
kept value is computed again: a cache here never serves a value computed for other tensor contents.

``Memo.get(name, key, tensors, compute)`` keeps one value per ``name``: the latest, with the
``key`` (plain values: shapes, options) and the stamp of ``tensors`` it was computed for.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
# One lock for every memo: a memo is made with each BlockMask, also while torch.compile traces one
# (custom_op), which cannot trace making a lock; the lock guards a few dict operations only.
_LOCK = threading.Lock()


def stamp(tensors: Iterable[torch.Tensor]) -> tuple:
    """(weak reference, storage address, in-place version) of each tensor (see the module docstring)."""
    return tuple((weakref.ref(t), t.data_ptr(), t._version) for t in tensors)


def matches(stamped: tuple, tensors) -> bool:
    """Whether ``tensors`` are the very tensors of ``stamped``, unchanged since it was taken."""
    if len(stamped) != len(tensors):
        return False
    for (ref, address, version), t in zip(stamped, tensors):
        if ref() is not t or t._version != version or t.data_ptr() != address:
            return False
    return True


class Memo:
    """Values kept by name, each with the key and the stamp of the tensors it was computed from.

    ``limit`` bounds the names kept (the least recently computed go first). Thread-safe: the compiled
    tier plans calls in a background thread.

    Example::

        >>> memo = Memo()
        >>> rows = memo.get("rows", (L, S), [block_mask.kv_indices], lambda: plan(block_mask))
    """

    def __init__(self, limit: int = 32):
        self._entries: OrderedDict = OrderedDict()
        self._limit = limit

    def get(self, name, key, tensors, compute: Callable[[], T]) -> T:
        """``compute()``, or the value kept under ``name`` if it was computed for an equal ``key`` and
        these very ``tensors`` (a sequence), none changed in place since."""
        with _LOCK:
            entry = self._entries.get(name)
        if entry is not None and entry[0] == key and matches(entry[1], tensors):
            return entry[2]
        value = compute()
        with _LOCK:
            self._entries[name] = (key, stamp(tensors), value)
            self._entries.move_to_end(name)
            while len(self._entries) > self._limit:
                self._entries.popitem(last=False)
        return value

    def __reduce__(self):
        # Pickled or deep-copied (a BlockMask sent to another process, copy.deepcopy): an empty memo,
        # since the stamps refer to this process's tensors.
        return (Memo, (self._limit,))

    def clear(self) -> None:
        """Forget every kept value."""
        with _LOCK:
            self._entries.clear()
