"""Segment masks: ``doc[q_idx] == doc[kv_idx]`` (and optionally ``q_idx >= kv_idx``).

Packed sequences are the commonest mask in training: each document attends
within itself, causally or not. When the mask_mod is exactly that, and each
document id occupies one run of the buffer, attention is one independent
(causal) attention per document: a back end can run each document's rows
against its own keys, with no tiles at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexattn.ir import Graph, Node, Op


@dataclass(frozen=True)
class SegmentMask:
    """``buffer[q_idx] == buffer[kv_idx]`` and, if ``causal``, ``q_idx >= kv_idx``."""

    buffer: int  # index into the graph's buffers
    causal: bool

    def segments(self, buffers, length: int) -> list[tuple[int, int]] | None:
        """The runs [start, stop) of equal ids among the first ``length`` entries, or None when
        an id comes back after another (then equal ids are not one block) or the buffer is short."""
        ids = buffers[self.buffer]
        if ids.dim() != 1 or ids.numel() < length:
            return None
        ids = ids[:length]
        starts = torch.cat([torch.tensor([True]), ids[1:] != ids[:-1]]).nonzero().flatten()
        if len(torch.unique(ids[starts])) != len(starts):
            return None
        bounds = starts.tolist() + [length]
        return list(zip(bounds[:-1], bounds[1:]))


def segment_mask(graph: Graph) -> SegmentMask | None:
    """The segment form of a mask_mod graph, or None (see the module docstring)."""
    terms = _conjuncts(graph.output)
    same = [t for t in terms if _same_segment(t) is not None]
    causal = [t for t in terms if _is_causal(t)]
    if len(same) != 1 or len(same) + len(causal) != len(terms) or len(causal) > 1:
        return None
    return SegmentMask(_same_segment(same[0]), bool(causal))


def _conjuncts(node: Node) -> list[Node]:
    if node.op is Op.AND:
        return _conjuncts(node.inputs[0]) + _conjuncts(node.inputs[1])
    return [node]


def _index(node: Node) -> str | None:
    return node.arg if node.op is Op.INPUT and node.arg in ("q_idx", "kv_idx") else None


def _same_segment(node: Node) -> int | None:
    """The buffer of ``buf[q_idx] == buf[kv_idx]`` (either side), else None."""
    if node.op is not Op.EQ:
        return None
    loads = node.inputs
    if not all(x.op is Op.LOAD and len(x.inputs) == 2 and x.inputs[0].op is Op.BUFFER for x in loads):
        return None
    if loads[0].inputs[0] is not loads[1].inputs[0]:
        return None
    if {_index(loads[0].inputs[1]), _index(loads[1].inputs[1])} != {"q_idx", "kv_idx"}:
        return None
    return loads[0].inputs[0].arg


def _is_causal(node: Node) -> bool:
    """``q_idx >= kv_idx`` or ``kv_idx <= q_idx``."""
    if node.op not in (Op.GE, Op.LE):
        return False
    first, second = (_index(x) for x in node.inputs)
    return (first, second) == (("q_idx", "kv_idx") if node.op is Op.GE else ("kv_idx", "q_idx"))
