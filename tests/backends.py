"""Running a back end on traced graphs, as ``flex_attention`` does after tracing (tests' helper).

``BACKENDS[name](q, k, v, score_graph=..., score_buffers=..., mask_graph=..., mask_buffers=...,
block_mask=..., scale=..., enable_gqa=..., kernel_options=...) -> (out, lse, max_scores)`` builds
the ``Call`` with its facts (``flexattn.dispatch.call_of``) and runs the path the back end chooses.
"""

from functools import partial

from flexattn import dispatch


def run_backend(backend: str, query, key, value, *, kernel_options=None, max_scores: bool = False, **call):
    """(out, lse, max_scores) of ``backend`` on the call."""
    return dispatch.run(backend, dispatch.call_of(query, key, value, kernel_options=kernel_options,
                                                  max_scores=max_scores, **call))


BACKENDS = {name: partial(run_backend, name) for name in dispatch.BACKENDS}
