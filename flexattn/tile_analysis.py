"""``TileAnalysis``: what building a BlockMask learnt about its mask_mod, frozen on the mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from flexattn.memo import matches, stamp


@dataclass(frozen=True)
class TileAnalysis:
    """What building a BlockMask learnt, for the ``mask_mod`` its tiles were decided for.

    ``traced``: that mask_mod's trace (None when it was not kept: attention traces it again, from
    ``flexattn.mod_cache``). ``stats``: how the tiles were decided (``create_block_mask``; empty
    for masks built another way): ``tiles``, ``decided_symbolically``, ``subdivided``, ``refined``,
    ``left_partial`` (0: every tile decided, a PARTIAL tile really is partial), ``depends_on``.
    ``attended``: (B or 1, H or 1, Q_LEN, KV_LEN) bool, the mask_mod at every position, where the
    build evaluated them all (small grids, ``flexattn.integrations.hf_masks``); else None.
    The tiles were decided for the values the trace's buffers held then: ``holds_for`` says
    whether a call's mask buffers are still those tensors, unchanged.
    """

    mask_mod: Callable
    traced: Any = None
    stats: Mapping = field(default_factory=lambda: MappingProxyType({}))
    attended: Any = field(default=None, repr=False, compare=False)
    buffer_stamps: tuple = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self):
        object.__setattr__(self, "stats", MappingProxyType(dict(self.stats)))
        if self.traced is not None:
            object.__setattr__(self, "buffer_stamps", stamp(self.traced.buffers))

    def holds_for(self, mask_buffers) -> bool:
        """Whether ``mask_buffers`` are the very tensors the tiles were decided for, none replaced or
        changed in place since. A captured tensor written after the build changes what the
        mask_mod computes, not the tiles: then a path may rely only on what the tiles list (FULL
        tiles attended whole, the mask_mod applied in PARTIAL ones), as torch's kernels do."""
        return self.traced is not None and matches(self.buffer_stamps, tuple(mask_buffers))
