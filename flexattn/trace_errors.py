"""Finding the user's line and naming the construct for ``TraceError``s."""

from __future__ import annotations

import dis
import linecache
import sys


def _user_frame(is_internal):
    frame = sys._getframe(1)
    while frame is not None and is_internal(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def user_location(is_internal) -> tuple[tuple[str, int] | None, str]:
    """``((file, line), source_line)`` of the innermost frame outside flexattn and torch."""
    frame = _user_frame(is_internal)
    if frame is None:
        return None, ""
    filename, lineno = frame.f_code.co_filename, frame.f_lineno
    return (filename, lineno), linecache.getline(filename, lineno)


def _instruction(frame):
    for ins in dis.get_instructions(frame.f_code):
        if ins.offset == frame.f_lasti:
            return ins
    return None


def control_flow_message(is_internal) -> str:
    """Say which Python construct asked for the truth value of a traced value."""
    frame = _user_frame(is_internal)
    opname = ""
    source = ""
    if frame is not None:
        ins = _instruction(frame)
        opname = ins.opname if ins is not None else ""
        source = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    fix = "use torch.where(cond, a, b) for a value, and & | ~ to combine masks"
    if opname == "UNARY_NOT" or opname == "TO_BOOL" and " not " in f" {source}":
        return f"`not` on a traced value needs a concrete bool; write `~x` instead ({fix})."
    if opname in ("JUMP_IF_FALSE_OR_POP",) or (" and " in source and "IF_FALSE" in opname):
        return f"`and` on traced values needs a concrete bool; write `(a) & (b)` instead ({fix})."
    if opname in ("JUMP_IF_TRUE_OR_POP",) or (" or " in source and "IF_TRUE" in opname):
        return f"`or` on traced values needs a concrete bool; write `(a) | (b)` instead ({fix})."
    if "min(" in source or "max(" in source:
        return ("Python min()/max() compare traced values with `if`; use torch.minimum(a, b) / "
                "torch.maximum(a, b) instead.")
    if "assert" in source:
        return "`assert` on a traced value needs a concrete bool; remove it or check inputs outside the mod."
    return ("Python control flow (`if`, `while`, a conditional expression or bool()) on a traced value "
            f"needs a concrete bool, which tracing does not have; {fix}.")
