"""The state of a trace in progress: its captured tensors and where its errors point.

``trace_stack`` is the stack of traces in progress (innermost last). A
``Tracer`` gives traced values their torch meaning (``call``,
``attribute``: see ``flexattn.spellings``) and collects the real tensors a
mod touches as buffer inputs. Pushing a tracer turns its
``TorchFunctionMode`` on until it is popped, so torch functions called with
no traced value at all (``torch.ones(())``) are seen too.
"""

from __future__ import annotations

import abc
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

from flexattn.errors import TraceError
from flexattn.ir import BufferSpec, Node, Op
from flexattn.semantics import load_dtype
from flexattn.trace_errors import user_location

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def is_internal_frame(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR) or path.startswith(_TORCH_DIR)


def fail_at_user_line(message: str):
    location, line = user_location(is_internal_frame)
    raise TraceError(message, location, line)


class Tracer(abc.ABC):
    """Collects the buffers of one trace; a subclass says what torch calls on traced values build."""

    def __init__(self, mode: TorchFunctionMode):
        self.mode = mode
        self.buffer_tensors: list[torch.Tensor] = []
        self.buffer_specs: list[BufferSpec] = []
        self.buffer_nodes: list[Node] = []

    @abc.abstractmethod
    def call(self, func, args: tuple, kwargs: dict):
        """What the torch function ``func`` builds on these arguments (some of them traced)."""

    @abc.abstractmethod
    def attribute(self, value, name: str):
        """The Tensor attribute ``name`` of the traced ``value`` (a bound method)."""

    def buffer(self, tensor: torch.Tensor) -> Node:
        """The BUFFER node of a captured tensor (one per tensor, or per view of the same memory)."""
        for i, seen in enumerate(self.buffer_tensors):
            if seen is tensor or _same_view(seen, tensor):
                return self.buffer_nodes[i]
        name = _guess_name(tensor) or f"buf{len(self.buffer_tensors)}"
        if any(spec.name == name for spec in self.buffer_specs):
            name = f"{name}_{len(self.buffer_tensors)}"
        spec = BufferSpec(name, tuple(tensor.shape), load_dtype(tensor.dtype), str(tensor.dtype))
        node = Node(Op.BUFFER, spec.dtype, (), len(self.buffer_tensors))
        self.buffer_tensors.append(tensor)
        self.buffer_specs.append(spec)
        self.buffer_nodes.append(node)
        return node


class TraceStack:
    """The traces in progress, innermost last; each one's mode is on while it is in the stack."""

    def __init__(self):
        self._tracers: list[Tracer] = []

    def append(self, tracer: Tracer) -> None:
        tracer.mode.__enter__()
        self._tracers.append(tracer)

    def pop(self) -> Tracer:
        tracer = self._tracers.pop()
        tracer.mode.__exit__(None, None, None)
        return tracer

    def __bool__(self) -> bool:
        return bool(self._tracers)

    def __getitem__(self, i: int) -> Tracer:
        return self._tracers[i]


trace_stack = TraceStack()


def active_tracer() -> Tracer:
    if not trace_stack:
        raise TraceError("a traced value was used outside of tracing")
    return trace_stack[-1]


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
            and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())


def _guess_name(tensor: torch.Tensor) -> str | None:
    """The user's variable name for a captured tensor, for readable IR."""
    frame = sys._getframe(1)
    while frame is not None:
        if not is_internal_frame(frame.f_code.co_filename):
            for scope in (frame.f_locals, frame.f_globals):
                for key, value in scope.items():
                    if value is tensor and key.isidentifier():
                        return key
            if frame.f_code.co_freevars:
                return None
        frame = frame.f_back
    return None
