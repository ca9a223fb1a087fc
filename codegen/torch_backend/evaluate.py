"""The mods evaluated on index tensors, outside the generated loop (decode and fused paths).

``index_inputs`` builds the b / h / q_idx / kv_idx inputs of an evaluation laid out along chosen
dims; ``modded_scores`` and ``kept`` evaluate the score_mod and mask_mod there.
"""

from __future__ import annotations

import torch

from flexattn.ir import Graph
from flexattn.semantics import evaluate


def index_inputs(ndim: int, **placed) -> dict:
    """The mods' index inputs for an evaluation over ``ndim`` dims.

    Each keyword is ``name=(values, dims)``: ``values`` (a tensor, or an int for a scalar) laid
    along ``dims`` (one per dim of ``values``, ascending), size 1 on every other dim.

    Example::

        >>> env = index_inputs(4, h=(torch.arange(8).view(2, 4), (0, 1)), q_idx=(torch.arange(3), (2,)))
        >>> env["h"].shape, env["q_idx"].shape
        (torch.Size([2, 4, 1, 1]), torch.Size([1, 1, 3, 1]))
    """
    env = {}
    for name, (values, dims) in placed.items():
        values = torch.as_tensor(values)
        shape = [1] * ndim
        for size, dim in zip(values.shape, dims):
            shape[dim] = size
        env[name] = values.reshape(shape)
    return env


def modded_scores(score_graph: Graph, s: torch.Tensor, env: dict, buffers) -> torch.Tensor:
    """The score_mod applied to scores ``s`` on ``env``: same shape and dtype as s, contiguous."""
    modded = evaluate(score_graph, {**env, "score": s}, buffers)
    return torch.broadcast_to(modded, s.shape).to(s.dtype).contiguous()


def kept(mask_graph: Graph, env: dict, buffers) -> torch.Tensor:
    """The mask_mod on ``env`` as a bool tensor (broadcastable to the scores)."""
    return evaluate(mask_graph, {name: value for name, value in env.items() if name != "score"}, buffers).bool()
