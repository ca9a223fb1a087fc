"""Fill the templates' hook points with the printed mods: the generated Triton module's source."""

from __future__ import annotations

import textwrap

from flexattn.ir import Graph, Op

from codegen.triton import decode, templates
from codegen.triton.printer import ModPrinter


def _block(lines: list[str], depth: int) -> str:
    return textwrap.indent("\n".join(lines) or "pass", " " * depth)


def _args(params: list[str]) -> str:
    return "".join(f"{p}, " for p in params)


def score_grad_buffers(score_graph: Graph | None) -> list[int]:
    """Indices of the score_mod's floating-point buffers (the ones that get gradients)."""
    if score_graph is None:
        return []
    return sorted({n.inputs[0].arg for n in ModPrinter(score_graph, "s_").float_loads()})


def kernel_source(score_graph: Graph | None, mask_graph: Graph | None) -> str:
    """The Triton module (forward, dq, dk/dv, split-KV decode and merge kernels) for these mods.

    Example: ``kernel_source(None, trace_mask_mod(causal).graph)`` contains
    ``def attention_forward(``. Raises ``LoweringError`` for an op the printer cannot lower.
    """
    score = ModPrinter(score_graph, "s_") if score_graph is not None else None
    mask = ModPrinter(mask_graph, "m_") if mask_graph is not None else None
    mod_params = (score.params() if score else []) + (mask.params() if mask else [])
    grad_params = [f"s_g{i}_ptr" for i in score_grad_buffers(score_graph)]

    score_lines, dscore_lines, grad_lines = [], ["dscore = 1.0"], []
    if score is not None:
        score_lines = score.values() + [f"score = tl.zeros_like(score) + {score.output}"]
        seed = next((n for n in score_graph.nodes if n.op is Op.INPUT and n.arg == "score"), None)
        lines, result = score.tangent(seed, "ds") if seed is not None else ([], "0.0")
        dscore_lines = lines + [f"dscore = {result}"]
        for j, load in enumerate(score.float_loads()):
            lines, result = score.tangent(load, f"g{j}_")
            offsets = f"({score.offset(load)}) + tl.zeros_like(q_idx * kv_idx)"
            grad_lines += lines + [
                f"tl.atomic_add(s_g{load.inputs[0].arg}_ptr + {offsets}, "
                f"tl.where(keep, ds * ({result}), 0.0), mask=keep)"]
    mask_lines = mask.values() + [f"keep = keep & ({mask.output})"] if mask else ["keep = keep"]

    tile = templates.SCORE_TILE.format(SCORE_MOD="\n".join(score_lines), MASK_MOD=_block(mask_lines, 4))
    hooks = dict(MOD_PARAMS=_args(mod_params), MOD_ARGS=_args(mod_params), GRAD_PARAMS=_args(grad_params),
                 GRAD_ARGS=_args(grad_params), SCORE_TILE=_block(tile.strip().splitlines(), 12),
                 DSCORE=_block(dscore_lines, 12), BUFFER_GRADS=_block(grad_lines, 16))
    parts = [templates.HELPERS]
    for template in (templates.FORWARD, templates.BACKWARD_DQ, templates.BACKWARD_DKDV, decode.DECODE):
        parts.append(_fill(template, hooks))
    return "\n".join(parts)


def _fill(template: str, hooks: dict) -> str:
    # str.format would trip over the kernels' own braces-free code only if hooks were missing.
    for name, value in hooks.items():
        template = template.replace("{" + name + "}", value)
    return template
