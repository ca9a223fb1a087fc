"""What crosses from the API to a back end: one frozen ``Call`` per attention call.

A ``Call`` holds the validated query/key/value, the traced mods (IR graphs and the tensors their
buffers stand for), the BlockMask, the scale, GQA, the back-end options and the ``Facts`` the
analysis decided about the mods once, in the API. Back ends read only this object (and the IR,
semantics, errors and BlockMask): they never import ``flexattn.api`` or ``flexattn.analysis``.

The rules every back end shares live here once: the compute float (``compute_dtype``), whether
gradients are needed (``needs_grad``), the GQA head check (``check_heads``) and the tile size of a
call (``Call.block_size``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from flexattn.block_mask import DEFAULT_BLOCK_SIZE, BlockMask, pair
from flexattn.errors import InputError
from flexattn.ir import Graph

if TYPE_CHECKING:  # the facts' types; back ends use their methods, never import the analysis
    from flexattn.analysis.diagonals import DiagonalKinds
    from flexattn.analysis.segments import SegmentMask
    from flexattn.analysis.separable import SeparableBias


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float attention is computed in for inputs of ``dtype``: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd is recording and one of ``tensors`` requires a gradient."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def check_heads(Hq: int, Hkv: int, enable_gqa: bool) -> None:
    """Raise ``InputError`` unless Hq == Hkv, or ``enable_gqa`` and Hq is a multiple of Hkv."""
    if enable_gqa:
        if Hq % Hkv != 0:
            raise InputError(f"with enable_gqa=True the query heads ({Hq}) must be a multiple of the key/value "
                             f"heads ({Hkv})")
    elif Hq != Hkv:
        raise InputError(f"query has {Hq} heads but key/value have {Hkv}; pass enable_gqa=True for grouped-query "
                         "attention")


@dataclass(frozen=True)
class Facts:
    """What the analysis decided about a call's mods and BlockMask (``flexattn.api`` computes it).

    ``score_reads`` / ``mask_reads``: the inputs (score, b, h, q_idx, kv_idx) each mod's output
    depends on. ``bias``: the score_mod's bias split into row x column factors
    (``flexattn.analysis.separable``), or None. ``segments``: the mask_mod as packed documents
    (``flexattn.analysis.segments``), or None. ``exact``: the BlockMask was built from this
    mask_mod with every tile decided (a PARTIAL tile really is partial). ``diagonals``: which
    square tiles are exactly a causal triangle (``flexattn.analysis.diagonals``; a function of the
    tiles asked, since deciding one evaluates the mask on it), or None (no mask, tiles not square).
    """

    score_reads: frozenset = frozenset()
    mask_reads: frozenset = frozenset()
    bias: SeparableBias | None = None
    segments: SegmentMask | None = None
    exact: bool = False
    diagonals: DiagonalKinds | None = None

    def lines(self) -> list[str]:
        """The facts as lines of text (for ``flexattn.explain_call``)."""
        reads = lambda names: ", ".join(sorted(names)) or "no input"  # noqa: E731
        bias = "none" if self.bias is None else (f"{len(self.bias.products)} row x column product(s), "
                                                 f"{len(self.bias.terms) - len(self.bias.products)} row term(s)")
        seg = self.segments
        segments = "none" if seg is None else (f"packed documents ({'causal' if seg.causal else 'full'}"
                                               f"{', by a captured order' if seg.order is not None else ''}"
                                               f"{', with prefixes' if seg.prefix is not None else ''})")
        diagonals = "none" if self.diagonals is None else f"decided per tile asked ({self.diagonals.block}-square tiles)"
        return [f"score_mod reads: {reads(self.score_reads)}; mask_mod reads: {reads(self.mask_reads)}",
                f"separable bias: {bias}; document segments: {segments}; BlockMask exact: {self.exact}; "
                f"diagonal tile kinds: {diagonals}"]


@dataclass(frozen=True, eq=False)
class Call:
    """One attention call as a back end sees it.

    query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev): validated, one float dtype.
    ``score_graph``/``mask_graph`` (or None) with the tensors their buffers stand for;
    ``block_mask`` None attends everywhere; ``scale`` None means 1/sqrt(E) (resolved here);
    ``options`` the normalised ``kernel_options``; ``max_scores``: whether the caller wants
    max_scores (a back end may return None otherwise). Raises ``InputError`` for head counts
    that do not fit (see ``check_heads``).

    Values a path derives from the call (tile classes, a plan) are kept per call with ``derived``,
    so choosing a path and running it compute them once.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    score_graph: Graph | None = None
    score_buffers: tuple = ()
    mask_graph: Graph | None = None
    mask_buffers: tuple = ()
    block_mask: BlockMask | None = None
    scale: float | None = None
    enable_gqa: bool = False
    options: Mapping = field(default_factory=dict)
    facts: Facts = field(default_factory=Facts)
    max_scores: bool = False
    _derived: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        check_heads(self.query.shape[1], self.key.shape[1], self.enable_gqa)
        scale = 1.0 / math.sqrt(self.query.shape[-1]) if self.scale is None else float(self.scale)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "score_buffers", tuple(self.score_buffers))
        object.__setattr__(self, "mask_buffers", tuple(self.mask_buffers))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(B, Hq, Hkv, L, S)."""
        B, Hq, L, _ = self.query.shape
        return B, Hq, self.key.shape[1], L, self.key.shape[2]

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA; 1 without)."""
        return self.query.shape[1] // self.key.shape[1]

    @property
    def block_size(self) -> tuple[int, int]:
        """(q, kv) tile size: the BlockMask's, else ``options["BLOCK_SIZE"]``, else ``DEFAULT_BLOCK_SIZE``."""
        if self.block_mask is not None:
            return tuple(self.block_mask.BLOCK_SIZE)
        return pair(self.options.get("BLOCK_SIZE", DEFAULT_BLOCK_SIZE))

    @property
    def compute_dtype(self) -> torch.dtype:
        """See ``compute_dtype``."""
        return compute_dtype(self.query.dtype)

    @property
    def needs_grad(self) -> bool:
        """Whether query, key, value or a score_mod buffer needs a gradient."""
        return needs_grad(self.query, self.key, self.value, *self.score_buffers)

    def forces(self, path: str) -> bool:
        """Whether ``kernel_options["PATH"]`` names ``path`` (a forced path skips its cost rules)."""
        return self.options.get("PATH") == path

    def derived(self, name: str, compute: Callable[[], object]):
        """``compute()``, computed once per call and kept under ``name`` until ``release``."""
        if name not in self._derived:
            self._derived[name] = compute()
        return self._derived[name]

    def release(self) -> None:
        """Drop the derived values (they may refer back to the call: freed now, not by the cyclic GC)."""
        self._derived.clear()
