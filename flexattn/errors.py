"""Exception classes raised by flexattn.

Every error a user can provoke is a ``FlexAttnError``; errors that come from a
traced mod also carry the user's ``file:line`` so the message points at the
line to change.
"""

from __future__ import annotations


class FlexAttnError(Exception):
    """Base class of all flexattn errors."""


class TraceError(FlexAttnError, TypeError):
    """A score_mod or mask_mod used a construct that cannot be traced.

    The message names the construct, the user's ``file:line`` and what to
    write instead. ``location`` holds ``(filename, lineno)`` when known.
    """

    def __init__(self, message: str, location: tuple[str, int] | None = None, source_line: str = ""):
        self.location = location
        self.construct_message = message
        if location is not None:
            where = f"{location[0]}:{location[1]}"
            code = f"\n    {source_line.strip()}" if source_line.strip() else ""
            message = f"{where}: {message}{code}"
        super().__init__(message)


class InputError(FlexAttnError, ValueError):
    """query/key/value, a size or a kernel option given to the API does not fit."""


class BlockMaskError(FlexAttnError, ValueError):
    """A BlockMask was built from, or used with, inconsistent sizes."""


class SlicedBlockMaskError(BlockMaskError, RuntimeError):
    """Attention with a sliced BlockMask whose mask_mod was not set again (a RuntimeError, as torch's)."""


class LoweringError(FlexAttnError, NotImplementedError):
    """A back end cannot lower an IR construct (names the op and the back end)."""


class PagedCacheError(FlexAttnError, ValueError):
    """A paged KV cache was asked for something it cannot do (pool full, slot or
    position out of range, page size not a multiple of the block size). The
    cache is left unchanged."""


class DistributedError(FlexAttnError, RuntimeError):
    """Context parallel attention could not proceed across ranks: ranks disagree on shapes, lengths
    or the layout, or a peer did not answer within the timeout (the message names the rank and step)."""
