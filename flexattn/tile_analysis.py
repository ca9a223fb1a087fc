"""``TileAnalysis``: what building a BlockMask learnt about its mask_mod, frozen on the mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class TileAnalysis:
    """What building a BlockMask learnt, for the ``mask_mod`` its tiles were decided for.

    ``traced``: that mask_mod's trace (None when it was not kept: attention traces it again, from
    ``flexattn.mod_cache``). ``stats``: how the tiles were decided (``create_block_mask``; empty
    for masks built another way): ``tiles``, ``decided_symbolically``, ``subdivided``, ``refined``,
    ``left_partial`` (0: every tile decided, a PARTIAL tile really is partial), ``depends_on``.
    """

    mask_mod: Callable
    traced: Any = None
    stats: Mapping = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self):
        object.__setattr__(self, "stats", MappingProxyType(dict(self.stats)))
