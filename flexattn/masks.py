"""Mask combinators with torch's names: ``and_masks``, ``or_masks``, ``noop_mask``.

Combined masks are ordinary mask_mods, so they trace into one IR graph where
``&`` / ``|`` join the parts and the analysis classifies tiles of the whole.
"""

from __future__ import annotations

import functools
import operator

import torch


def noop_mask(b, h, q_idx, kv_idx):
    """A mask_mod that keeps every position (returns True)."""
    return torch.ones_like(q_idx, dtype=torch.bool)


def _combine(mask_mods, op, name: str, keep_all: bool):
    for m in mask_mods:
        if not callable(m):
            raise TypeError(f"{name} takes mask_mod callables, got {type(m).__name__}")

    def combined(b, h, q_idx, kv_idx):
        if not mask_mods:  # as torch: the empty intersection keeps everything, the empty union nothing
            return torch.full_like(q_idx, keep_all, dtype=torch.bool)
        return functools.reduce(op, (m(b, h, q_idx, kv_idx) for m in mask_mods))

    combined.__name__ = f"{name}({', '.join(getattr(m, '__name__', 'mask') for m in mask_mods)})"
    return combined


def and_masks(*mask_mods):
    """The intersection of mask_mods: a position is kept if every mask keeps it.

    ``and_masks()`` with no mask keeps every position, as torch's does. Raises
    ``TypeError`` for an argument that is not callable.

    Example::

        >>> doc_window = and_masks(document_mask, sliding_window_mask)
    """
    return _combine(mask_mods, operator.and_, "and_masks", True)


def or_masks(*mask_mods):
    """The union of mask_mods: a position is kept if any mask keeps it.

    ``or_masks()`` with no mask keeps no position, as torch's does. Raises ``TypeError``
    for an argument that is not callable.

    Example::

        >>> prefix_or_causal = or_masks(prefix_mask, causal_mask)
    """
    return _combine(mask_mods, operator.or_, "or_masks", False)
