"""The analysis facts of one call, decided once in the API and handed to the back end frozen.

``analyse(score_graph, mask_graph, mask_buffers, block_mask, B, H)`` runs the analyses a back end may use to pick a
faster path (see ``flexattn.call.Facts``); back ends read the result from ``Call.facts`` and never
import ``flexattn.analysis`` themselves.
"""

from __future__ import annotations

from flexattn.analysis.diagonals import diagonal_kinds
from flexattn.analysis.segments import segment_mask
from flexattn.analysis.separable import separate
from flexattn.block_mask import BlockMask
from flexattn.call import Facts
from flexattn.ir import Graph
from flexattn.passes import depends_on


def analyse(score_graph: Graph | None, mask_graph: Graph | None, mask_buffers, block_mask: BlockMask | None,
            B: int, H: int) -> Facts:
    """The ``Facts`` of a call with these mods and BlockMask, batch size ``B`` and ``H`` query heads.

    ``mask_graph`` is the BlockMask's traced mask_mod (``flexattn.api.mask_of``); the BlockMask is
    exact when ``create_block_mask`` decided every tile for that mask_mod and its captured tensors,
    and neither they nor the tile lists changed since (``BlockMask.decided_for``).

    Example::

        >>> facts = analyse(trace_score_mod(alibi).graph, None, (), None, 1, 8)
        >>> len(facts.bias.products)
        1
    """
    exact = block_mask is not None and mask_graph is not None and block_mask.decided_for(mask_buffers)
    # The analyses of the graphs alone run once per graph (graphs are immutable).
    score = score_graph.derived("score facts", lambda: (depends_on(score_graph), separate(score_graph))) \
        if score_graph is not None else (frozenset(), None)
    mask = mask_graph.derived("mask facts", lambda: (depends_on(mask_graph), segment_mask(mask_graph))) \
        if mask_graph is not None else (frozenset(), None)
    return Facts(score_reads=score[0], mask_reads=mask[0], bias=score[1], segments=mask[1], exact=exact,
                 diagonals=diagonal_kinds(mask_graph, mask_buffers, B, H, block_mask))
