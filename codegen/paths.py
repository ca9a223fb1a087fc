"""Paths: the ways a back end can compute a call, and how one is chosen.

Every back end has one ordered table of ``Path``s (``PATHS`` in its ``paths`` module). A path
says why it cannot, or should not, serve a call (``why_not(call) -> str | None``; None: it
serves) and computes it (``run(call) -> (out, lse, max_scores)``). ``choose`` takes the first
path that serves and records why each earlier one was skipped; the last path of a table serves
every call the back end accepts. No path falls back by returning None: a path that runs serves.

``kernel_options={"PATH": name}`` forces a path: its cost rules (where a path would be slower)
are skipped, but a path that cannot compute the call raises ``InputError`` with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexattn.call import Call, Facts
from flexattn.errors import InputError, LoweringError


class Path:
    """A strategy of a back end. Subclasses set ``name`` and ``summary`` and define
    ``why_not(call) -> str | None`` (None when the path serves the call; a cost rule is skipped
    when ``call.forces(name)``) and ``run(call) -> (out, lse, max_scores)``."""

    name = ""
    summary = ""

    def why_not(self, call: Call) -> str | None:
        raise NotImplementedError

    def run(self, call: Call):
        raise NotImplementedError


class ServesEveryCall(Path):
    """A path with no condition: the last entry of a table, so that every call is served."""

    def why_not(self, call: Call) -> str | None:
        return None


@dataclass(frozen=True)
class Choice:
    """The path chosen for a call: ``path``, and ``skipped`` as (path name, reason) in table order.

    ``str(choice)`` is the explanation ``flexattn.explain_call`` prints.
    """

    backend: str
    path: Path
    skipped: tuple[tuple[str, str], ...]
    forced: bool = False
    facts: Facts = Facts()
    table: tuple[str, ...] = ()  # every path of the back end, in order

    def __str__(self) -> str:
        how = "forced by kernel_options['PATH']" if self.forced else "the first that serves the call"
        lines = [f"backend {self.backend}: path {self.path.name} ({how})", f"  {self.path.summary}"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        lines.append(f"  table: {' > '.join(self.table)}")
        lines += [f"  facts: {line}" for line in self.facts.lines()]
        return "\n".join(lines)


def choose(backend: str, paths: tuple[Path, ...], call: Call) -> Choice:
    """The path of ``paths`` that computes ``call`` (see the module docstring).

    Raises ``InputError`` when ``kernel_options["PATH"]`` names no path of ``paths`` or a path
    that cannot serve the call (the message gives its reason), and ``LoweringError`` when no path
    serves (a table whose last path refuses a call).

    Example::

        >>> choice = choose("torch", PATHS, call)
        >>> choice.path.name, choice.skipped[0]
        ('generated_loop', ('decode_batch_in_place', 'Q_LEN=512 > 16: not a decoding shape'))
    """
    facts, table = call.facts, tuple(path.name for path in paths)
    forced = call.options.get("PATH")
    if forced is not None:
        named = {path.name: path for path in paths}
        if forced not in named:
            raise InputError(f"kernel_options['PATH']={forced!r} is not a path of the {backend} back end; "
                             f"choose one of {', '.join(map(repr, named))} or drop PATH")
        reason = named[forced].why_not(call)
        if reason is not None:
            raise InputError(f"kernel_options['PATH']={forced!r} cannot serve this call: {reason}; drop PATH to "
                             "let flexattn choose (flexattn.explain_call shows the choice)")
        return Choice(backend, named[forced], (), True, facts, table)
    skipped = []
    for path in paths:
        reason = path.why_not(call)
        if reason is None:
            return Choice(backend, path, tuple(skipped), False, facts, table)
        skipped.append((path.name, reason))
    raise LoweringError(f"no path of the {backend} back end serves this call: "
                        + "; ".join(f"{name}: {reason}" for name, reason in skipped))
