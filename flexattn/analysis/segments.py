"""Segment masks: packed documents, ``doc[q_idx] == doc[kv_idx]``, optionally causal, optionally
with a bidirectional prefix per document.

Packed sequences are the commonest mask in training: each document attends
within itself, causally or not. When the mask_mod is exactly that, and each
document id occupies one run of the buffer, attention is one independent
(causal) attention per document: a back end can run each document's rows
against its own keys, with no tiles at all.

The forms recognised, as a conjunction ``same & order`` (either order of the operands):

* ``same``: ``doc[q_idx] == doc[kv_idx]``, or ``doc[b, q_idx] == doc[b, kv_idx]`` (ids per batch row);
* ``order`` (optional): ``q_idx >= kv_idx``; or ``pos[q_idx] >= pos[kv_idx]`` (``pos`` indexed
  like ``doc``) with ``pos`` strictly increasing inside each document, which the buffers'
  values must show (checked per call: tokens sorted by cluster with their original positions,
  as routing attention does); or either of these OR'ed with a prefix term
  ``kv_idx < prefix_end[doc[kv_idx]]`` (or ``doc[q_idx]``, the same id inside a document): the
  prefix-LM, whose keys before the document's prefix end are seen by all its rows.

``SegmentMask.pieces`` turns the buffers into the rectangles of positions that are exactly the
mask: per document its square (causal or not), or its rows against its prefix plus the causal
square after the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexattn.ir import Graph, Node, Op


@dataclass(frozen=True)
class SegmentMask:
    """``buffer[(b,) q_idx] == buffer[(b,) kv_idx]`` and, if ``causal``, the order term; ``order``
    (a buffer, indexed like the ids) makes the order ``order[q] >= order[kv]`` instead of
    ``q_idx >= kv_idx``; ``prefix`` (a 1-D buffer indexed by the id) adds its prefix-LM term."""

    buffer: int  # index into the graph's buffers
    causal: bool
    batched: bool = False  # the ids are indexed [b, position]
    order: int | None = None
    prefix: int | None = None
    wrap: int | None = None  # the id indexes the prefix buffer Python's way: a negative id adds this

    def segments(self, buffers, length: int, b: int = 0) -> list[tuple[int, int]] | None:
        """The runs [start, stop) of equal ids among the first ``length`` entries (of batch row
        ``b`` for batched ids), or None when an id comes back after another (then equal ids are
        not one block) or the buffer is short."""
        ids = self._row(buffers[self.buffer], b, length)
        if ids is None or (ids.is_floating_point() and bool(ids.isnan().any())):  # NaN == NaN is False
            return None
        starts = torch.cat([torch.tensor([True]), ids[1:] != ids[:-1]]).nonzero().flatten()
        if len(torch.unique(ids[starts])) != len(starts):
            return None
        bounds = starts.tolist() + [length]
        return list(zip(bounds[:-1], bounds[1:]))

    def pieces(self, buffers, length: int, b: int = 0) -> list[tuple[int, int, int, int, bool]] | None:
        """Rectangles (row start, row stop, column start, column stop, causal) in positions whose
        union is exactly the mask of batch row ``b`` (a causal one is a square on the diagonal), or
        None where the buffers do not make documents (see ``segments``), the order buffer is not
        strictly increasing inside a document, or the ids cannot index the prefix buffer."""
        runs = self.segments(buffers, length, b)
        if runs is None:
            return None
        if self.order is not None:
            order = self._row(buffers[self.order], b, length)
            if order is None:
                return None
            rises = order[1:] > order[:-1]
            inside = torch.ones(length - 1, dtype=torch.bool)
            inside[[stop - 1 for _, stop in runs[:-1]]] = False  # pairs that straddle two documents
            if not bool(rises[inside].all()):
                return None
        if self.prefix is None:
            return [(start, stop, start, stop, self.causal) for start, stop in runs]
        ids, ends = self._row(buffers[self.buffer], b, length), buffers[self.prefix]
        if ids.is_floating_point() or ends.dim() != 1 or ends.is_floating_point() or not len(ends):
            return None
        firsts = ids[torch.tensor([start for start, _ in runs])].long()
        if self.wrap is not None:
            firsts = torch.where(firsts < 0, firsts + self.wrap, firsts)
        firsts = firsts.clamp(0, len(ends) - 1)  # as the load clamps (``flexattn.semantics.load``)
        found = []
        for (start, stop), end in zip(runs, ends[firsts].tolist()):
            end = min(max(int(end), start), stop)
            if end > start:
                found.append((start, stop, start, end, False))  # every row sees the prefix
            if end < stop:
                found.append((end, stop, end, stop, True))  # and, after it, causally
        return found

    def _row(self, ids: torch.Tensor, b: int, length: int) -> torch.Tensor | None:
        if self.batched:
            if ids.dim() != 2 or ids.shape[1] < length:
                return None
            return ids[min(b, ids.shape[0] - 1), :length]  # the load clamps b too
        if ids.dim() != 1 or ids.numel() < length:
            return None
        return ids[:length]


def segment_mask(graph: Graph) -> SegmentMask | None:
    """The segment form of a mask_mod graph, or None (see the module docstring)."""
    terms = _conjuncts(graph.output)
    same = [t for t in terms if _same_segment(t) is not None]
    if len(same) != 1 or len(terms) > 2:
        return None
    buffer, batched = _same_segment(same[0])
    rest = [t for t in terms if t is not same[0]]
    if not rest:
        return SegmentMask(buffer, False, batched)
    (prefix, wrap), order = (None, None), rest[0]
    if order.op is Op.OR:
        for first, second in (order.inputs, order.inputs[::-1]):
            if _prefix_term(first, buffer, batched) is not None:
                (prefix, wrap), order = _prefix_term(first, buffer, batched), second
                break
        else:
            return None
    if _is_causal(order):
        return SegmentMask(buffer, True, batched, None, prefix, wrap)
    by = _ordered_by(order, batched)
    return None if by is None else SegmentMask(buffer, True, batched, by, prefix, wrap)


def _conjuncts(node: Node) -> list[Node]:
    if node.op is Op.AND:
        return _conjuncts(node.inputs[0]) + _conjuncts(node.inputs[1])
    return [node]


def _index(node: Node) -> str | None:
    return node.arg if node.op is Op.INPUT and node.arg in ("q_idx", "kv_idx") else None


def _position_load(node: Node, batched: bool | None = None) -> tuple[int, str, bool] | None:
    """(buffer, "q_idx" / "kv_idx", batched) of ``buf[idx]`` or ``buf[b, idx]``, else None."""
    if node.op is not Op.LOAD or node.inputs[0].op is not Op.BUFFER or len(node.inputs) not in (2, 3):
        return None
    is_batched = len(node.inputs) == 3
    if is_batched and not (node.inputs[1].op is Op.INPUT and node.inputs[1].arg == "b"):
        return None
    if batched is not None and is_batched != batched:
        return None
    index = _index(node.inputs[-1])
    return None if index is None else (node.inputs[0].arg, index, is_batched)


def _pair(first: Node, second: Node, batched: bool | None = None) -> tuple[int, str, bool] | None:
    """(buffer, the index of ``first``, batched) when both load one buffer alike, at q_idx and kv_idx."""
    a, b = _position_load(first, batched), _position_load(second, batched)
    if a is None or b is None or first.inputs[0] is not second.inputs[0] or a[2] != b[2]:
        return None
    return a if {a[1], b[1]} == {"q_idx", "kv_idx"} else None


def _same_segment(node: Node) -> tuple[int, bool] | None:
    """(buffer, batched) of ``buf[q_idx] == buf[kv_idx]`` (either side; or ``buf[b, ...]``), else None."""
    if node.op is not Op.EQ:
        return None
    found = _pair(*node.inputs)
    return None if found is None else (found[0], found[2])


def _is_causal(node: Node) -> bool:
    """``q_idx >= kv_idx`` or ``kv_idx <= q_idx``."""
    if node.op not in (Op.GE, Op.LE):
        return False
    first, second = (_index(x) for x in node.inputs)
    return (first, second) == (("q_idx", "kv_idx") if node.op is Op.GE else ("kv_idx", "q_idx"))


def _ordered_by(node: Node, batched: bool) -> int | None:
    """The buffer of ``pos[q] >= pos[kv]`` or ``pos[kv] <= pos[q]`` (indexed like the ids), else None."""
    if node.op not in (Op.GE, Op.LE):
        return None
    found = _pair(*node.inputs, batched)
    want = "q_idx" if node.op is Op.GE else "kv_idx"
    return found[0] if found is not None and found[1] == want else None


def _prefix_term(node: Node, ids: int, batched: bool) -> tuple[int, int | None] | None:
    """(the 1-D buffer, wrap) of ``kv_idx < prefix_end[doc[...]]`` (or ``prefix_end[doc[...]] >
    kv_idx``), ``doc`` the ids' buffer loaded at q_idx or kv_idx, else None. ``wrap``: the tracer
    indexes by a tensor Python's way, ``where(i < 0, i + n, i)``: n (None without that)."""
    if node.op not in (Op.LT, Op.GT):
        return None
    index, bound = node.inputs if node.op is Op.LT else node.inputs[::-1]
    if _index(index) != "kv_idx" or bound.op is not Op.LOAD or len(bound.inputs) != 2:
        return None
    if bound.inputs[0].op is not Op.BUFFER:
        return None
    index, wrap = _unwrapped(bound.inputs[1])
    inner = _position_load(index, batched)
    return (bound.inputs[0].arg, wrap) if inner is not None and inner[0] == ids else None


def _unwrapped(node: Node) -> tuple[Node, int | None]:
    """(i, n) for ``where(i < 0, i + n, i)`` (n a constant int), else (node, None)."""
    if node.op is not Op.WHERE:
        return node, None
    test, wrapped, index = node.inputs
    if not (test.op is Op.LT and test.inputs[0] is index and _const_int(test.inputs[1]) == 0):
        return node, None
    if not (wrapped.op is Op.ADD and wrapped.inputs[0] is index and _const_int(wrapped.inputs[1]) is not None):
        return node, None
    return index, _const_int(wrapped.inputs[1])


def _const_int(node: Node) -> int | None:
    return node.arg if node.op is Op.CONST and type(node.arg) is int else None
