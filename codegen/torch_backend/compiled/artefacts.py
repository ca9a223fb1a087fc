"""Ahead-of-time compiled tile functions: compiled once per kernel and signature, kept on disk.

A tile function is compiled with dynamo's ahead-of-time capture
(``torch.compile(fn, fullgraph=True, dynamic=True).aot_compile``): one
inductor graph with symbolic sizes, its guards and the generated code bundled
into one object that ``torch.compiler.load_compiled_function`` rebuilds in
another process without tracing again (dynamo, AOTAutograd and inductor are
skipped; only the C++ is rebuilt when inductor's own cache lacks it). The
compiling happens in a child process (``child``); this process only loads.

The functions of one (kernel key, signature) are stored together in
flexattn's kernel cache (``codegen.cache``) as base64 text under
``torch-compiled-aot/<key>-<signature digest>.txt``: a corrupt file (its
checksum), a stale one (another generator or torch version) or one that no
longer deserialises (another machine's) is rejected and rebuilt, never used.

A compiled function cannot recompile: ``Guarded`` checks its guards on every
call and runs the plain Python function where they fail (counted in
``STATS["fallbacks"]``), so a call never errs and never runs code compiled for
other inputs.
"""

from __future__ import annotations

import base64
import hashlib
import io
import pickle
from pathlib import Path

import torch

from codegen.cache import KERNELS

BACKEND = "torch-compiled-aot"
STATS = {"graphs": 0, "fallbacks": 0, "loaded": 0}
RESTARTS = 3  # analyses of one function (a restart specialises what the previous one could not)


def compile_tile(fn, example_args: tuple, threads: int):
    """``fn`` compiled ahead of time for arguments like ``example_args`` (sizes symbolic, sizes 0 and 1
    specialised), its C++ run on ``threads`` OpenMP threads (1: serial). Python floats read by ``fn``
    are compile-time constants: as graph inputs they would be guarded by the names of the functions'
    globals, which a loaded function does not have."""
    from torch.fx.experimental import _config

    STATS["graphs"] += 1
    # use_duck_shape off: equal sizes at compile time (a 128-row tile of 128 columns) must not
    # become one symbol, which would reject them when they differ later.
    # no_grad: the loop calls its tile functions without autograd, and the guards check the grad mode.
    # cpp.threads: the caller's thread count (part of the signature), as torch's own ops use. On a
    # quiet machine two threads ran the generic rows 1.4-1.6x faster than serial tile code; on a
    # loaded one an OpenMP region waits for a descheduled thread at every barrier (docs/performance.md).
    # vec_isa_ok: the vector ISA is taken from the CPU's flags, without inductor's probe (test programs
    # built in a dozen child processes: about half of a cold first compile); a compiler that cannot
    # build for that ISA fails the compile, and the eager loop keeps serving.
    with _config.patch(use_duck_shape=False), torch._dynamo.config.patch(specialize_float=True), \
            torch._inductor.config.patch({"cpp.threads": threads, "cpp.vec_isa_ok": True}), torch.no_grad():
        for _ in range(RESTARTS):
            try:
                return torch.compile(fn, backend="inductor", fullgraph=True, dynamic=True).aot_compile(
                    (example_args, {}))
            except torch._dynamo.exc.RestartAnalysis:  # torch.compile restarts these itself; aot_compile raises
                continue
        raise RuntimeError(f"dynamo restarted its analysis of {fn.__name__} {RESTARTS} times")


class Guarded:
    """A compiled function that runs ``plain`` where its guards reject the arguments."""

    def __init__(self, compiled, plain):
        self.compiled, self.plain = compiled, plain

    def __call__(self, *args):
        if self.compiled.guard_check(*args):
            return self.compiled.fn(*args)
        STATS["fallbacks"] += 1
        return self.plain(*args)


def artefact_path(key: str, sig: tuple) -> Path:
    """Where the compiled functions of kernel ``key`` and signature ``sig`` live on disk."""
    return KERNELS.path(BACKEND, f"{key}-{hashlib.sha256(repr(sig).encode()).hexdigest()[:16]}", ".txt")


def load(key: str, sig: tuple, generator: str, plain: dict) -> dict | None:
    """The compiled functions (name -> ``Guarded``) of ``key`` and ``sig`` from disk, or None when none
    is there or the file is rejected (``KERNELS.stats["rejected"]``). ``plain`` names the Python
    functions, whose globals the loaded ones run with."""
    text = KERNELS.read(artefact_path(key, sig), generator)
    return None if text is None else from_text(text, plain)


def from_text(text: str, plain: dict) -> dict | None:
    """The compiled functions (name -> ``Guarded``) that ``serialized`` wrote, or None (counted in
    ``KERNELS.stats["rejected"]``) where they do not load in this process."""
    try:
        blobs = pickle.loads(base64.b64decode(text))
        # Deserialising guards that name imported modules (torch.func.vjp's) installs them in a
        # tracing context, which a load outside compilation must provide. vec_isa_ok: inductor would
        # first probe the CPU's vector ISAs by building and loading test programs in a dozen child
        # processes (seconds); the bundled code names its ISA, and a build that fails rejects the file.
        with torch._guards.tracing(torch._guards.TracingContext(None)), \
                torch._inductor.config.patch({"cpp.vec_isa_ok": True}):
            loaded = {name: torch.compiler.load_compiled_function(io.BytesIO(blob), f_globals=plain[name].__globals__)
                      for name, blob in blobs.items()}
    except Exception:  # another machine's or torch's artefact, or damaged past the checksum: rebuild
        KERNELS.stats["rejected"] += 1
        return None
    STATS["loaded"] += 1
    return {name: Guarded(fn, plain[name]) for name, fn in loaded.items()}


def serialized(compiled: dict) -> str:
    """The compiled functions (name -> the ``aot_compile`` result) as text (``from_text`` reads it)."""
    blobs = {name: type(fn).serialize(fn).serialized_data for name, fn in compiled.items()}
    return base64.b64encode(pickle.dumps(blobs)).decode()


def store(key: str, sig: tuple, generator: str, text: str) -> None:
    """Write the compiled functions of ``key`` and ``sig`` (``serialized``'s text) to disk."""
    KERNELS.write(artefact_path(key, sig), generator, text)


__all__ = ["Guarded", "STATS", "artefact_path", "compile_tile", "from_text", "load", "serialized", "store"]
