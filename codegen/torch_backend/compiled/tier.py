"""Tiered compilation: the eager loop serves while the compiled tile functions build in the background.

A kernel of the compiled path is one per IR structural key (the eager
kernel's ``kernel_key``): its tile source (``source.tile_source``) is cached
on disk by ``codegen.cache`` under ``torch-compiled`` (a corrupt or stale
file is rebuilt, never used). Its functions are compiled per *call signature*
(``signature``: the compute float, which sizes are 1, the buffers' dtypes,
the gradient slots, torch's thread count), because ``torch.compile`` specialises those; sequence
lengths, batch sizes above 1, constants and buffer contents do not enter it,
so they never recompile. Each (key, signature) is compiled ahead of time and
stored on disk (``artefacts``), so another process loads it without tracing.

A signature not yet built is queued for one background thread, which loads
it from disk or has a child process compile it (``child``: dynamo and inductor
never run in the caller's process) from example arguments recorded by running
the loop on one query block row of the call's own inputs; callers meanwhile
get None (the eager kernel serves). A failed compilation (a compiler error, a
missing C++ toolchain) marks the signature failed: the eager kernel keeps
serving it and the caller's thread warns once per kernel, naming the error.
``STATS`` counts ``graphs`` (functions compiled), ``loaded`` (signatures loaded
from disk), ``fallbacks`` (calls of a compiled function whose guards rejected
the arguments, run plain), ``served`` (calls on compiled code) and ``failures``.
"""

from __future__ import annotations

import functools
import hashlib
import queue
import threading
import warnings
from pathlib import Path

import torch

from codegen.cache import KERNELS
from codegen.torch_backend import printer
from codegen.torch_backend.compiled import artefacts, child, loop, source
from flexattn.ir import Op

_FILES = [Path(module.__file__) for module in (source, loop, printer, artefacts, child)] + [Path(__file__)]
GENERATOR_VERSION = hashlib.sha256(
    b"".join(path.read_bytes() for path in _FILES) + torch.__version__.encode()).hexdigest()[:16]
STATS = artefacts.STATS  # graphs, loaded, fallbacks; served and failures are counted here
STATS.update(served=0, failures=0)
READY, FAILED, PENDING = "ready", "failed", "pending"
COMPILE_AFTER_CALLS = 8  # "auto" compiles a signature from its 8th call on: hot code only

_lock = threading.Lock()
_jobs: queue.Queue = queue.Queue()
_worker: list = []


class Entry:
    """The compiled path of one kernel key: its tile module, compiled wrappers and signature states."""

    def __init__(self, key: str, namespace: dict, mask_reads: tuple[bool, bool]):
        self.key, self.namespace, self.mask_reads = key, namespace, mask_reads
        self.plain = plain_functions(namespace)
        self.compiled: dict = {}  # signature -> name -> artefacts.Guarded
        self.bound: dict = {}
        self.states: dict = {}
        self.errors: dict = {}
        self.warned = False
        self.done = threading.Condition(_lock)

    def functions(self, sig: tuple | None) -> loop.TileFunctions:
        """The tile functions of signature ``sig`` (plain ones only for None or a signature not built)."""
        return loop.TileFunctions(self.plain, self.compiled.get(sig), self.namespace.get("mask_mod"), self.mask_reads)

    def namespace_for(self, sig: tuple) -> dict:
        """The loop's forward/backward bound to the compiled functions of ``sig`` (what ``kernel.Kernel`` calls)."""
        if sig not in self.bound:
            fns = self.functions(sig)
            self.bound[sig] = {"forward": functools.partial(loop.forward, fns),
                               "backward": functools.partial(loop.backward, fns),
                               "__source__": self.namespace["__source__"]}
        return self.bound[sig]


_entries: dict[str, Entry] = {}
_calls: dict[tuple, int] = {}  # (kernel key, signature) -> calls so far (COMPILE_AFTER_CALLS)


def load_source(text: str, filename: str) -> dict:
    """The namespace of a tile module's source ``text``, run as the file ``filename``."""
    namespace: dict = {"__name__": f"flexattn_tiles_{Path(filename).stem}", "__source__": text, "__file__": filename}
    exec(compile(text, filename, "exec"), namespace)
    return namespace


def plain_functions(namespace: dict) -> dict:
    """The Python tile functions (name -> function) of a tile module's namespace, and ``loop.update``."""
    return {"tile_scores": namespace["tile_scores"], "tile_grad": namespace["tile_grad"], "update": loop.update}


def entry(key: str, score_graph, mask_graph) -> Entry:
    """The entry for ``key`` (its tile source from the disk cache, or printed and written there)."""
    with _lock:
        if key in _entries:
            return _entries[key]
    namespace = KERNELS.get("torch-compiled", key, GENERATOR_VERSION,
                            build=lambda: source.tile_source(score_graph, mask_graph), load=load_source)
    with _lock:
        return _entries.setdefault(key, Entry(key, namespace, _reads_batch_and_head(mask_graph)))


def _reads_batch_and_head(graph) -> tuple[bool, bool]:
    """Whether a mask graph uses its batch and its head input."""
    if graph is None:
        return False, False
    used = {id(i) for node in graph.nodes for i in node.inputs} | {id(graph.output)}
    names = {node.arg for node in graph.nodes if node.op is Op.INPUT and id(node) in used}
    return graph.input_names[0] in names, graph.input_names[1] in names


def _pattern(t: torch.Tensor) -> tuple:
    return (str(t.dtype), tuple(size == 1 for size in t.shape))


def signature(query, score_buffers, mask_buffers, block_mask, slots) -> tuple:
    """What the compiled graphs of one kernel specialise on (see the module docstring)."""
    compute = "float64" if query.dtype == torch.float64 else "float32"
    per_bh = None
    if block_mask is not None and tuple(block_mask.kv_num_blocks.shape[:2]) != (1, 1):
        per_bh = tuple(size == 1 for size in block_mask.kv_num_blocks.shape[:2])
    # torch's thread count: dynamo's guards on global state check it (another count would run plain).
    return (compute, query.shape[0] == 1, query.shape[1] == 1, per_bh, tuple(map(_pattern, score_buffers)),
            tuple(map(_pattern, mask_buffers)), tuple(slots) if slots is not None else None, torch.get_num_threads())


def count_call(key: str, sig: tuple) -> int:
    """One more call of signature ``sig`` of kernel ``key``; returns how many there have been."""
    with _lock:
        _calls[key, sig] = _calls.get((key, sig), 0) + 1
        return _calls[key, sig]


def state(item: Entry, sig: tuple) -> str | None:
    """``READY``, ``FAILED``, ``PENDING`` or None (never requested) for ``sig`` of ``item``."""
    with _lock:
        return item.states.get(sig)


def request(item: Entry, sig: tuple, job) -> None:
    """Queue ``job`` (a callable compiling ``sig``) unless ``sig`` is known; start the worker once."""
    with _lock:
        if sig in item.states:
            return
        item.states[sig] = PENDING
        if not _worker:
            _worker.append(threading.Thread(target=_work, name="flexattn-compile", daemon=True))
            _worker[0].start()
    _jobs.put((item, sig, job))


def wait(item: Entry, sig: tuple) -> str:
    """Block until ``sig`` is compiled or failed; returns its state."""
    with _lock:
        item.done.wait_for(lambda: item.states.get(sig) != PENDING)
        return item.states[sig]


def error_of(item: Entry, sig: tuple) -> str:
    """Why compiling ``sig`` of ``item`` failed."""
    with _lock:
        return item.errors.get(sig, "unknown error")


def warn_once(item: Entry, sig: tuple) -> None:
    """The caller's one warning for a kernel whose compilation failed."""
    with _lock:
        if item.warned:
            return
        item.warned = True
        error = item.errors.get(sig, "unknown error")
    warnings.warn(f"flexattn: compiling the torch back end's kernel failed ({error}); the eager loop serves "
                  "this mod (correct, slower)", RuntimeWarning, stacklevel=4)


def _work() -> None:
    while True:
        item, sig, job = _jobs.get()
        try:
            job()
            result, error = READY, None
        except Exception as failure:  # a compiler error or a missing toolchain: eager keeps serving
            result, error = FAILED, str(failure) if isinstance(failure, child.CompileFailed) else child.reason(failure)
        with _lock:
            item.states[sig] = result
            if error is not None:
                item.errors[sig] = error
                STATS["failures"] += 1
            item.done.notify_all()
        _jobs.task_done()


def drain() -> None:
    """Block until every queued compilation is done."""
    _jobs.join()


def on_disk(key: str, sig: tuple) -> bool:
    """Whether compiled functions of ``key`` and ``sig`` may be on disk (a cheap check: the file exists)."""
    return artefacts.artefact_path(key, sig).exists()


def load_now(item: Entry, sig: tuple) -> bool:
    """Load the compiled functions of ``sig`` from disk on the caller's thread, unless ``sig`` was
    requested meanwhile; whether ``sig`` is now ``READY``."""
    functions = artefacts.load(item.key, sig, GENERATOR_VERSION, item.plain)
    with _lock:
        if functions is not None and sig not in item.states:
            item.compiled[sig] = functions
            item.states[sig] = READY
            item.done.notify_all()
        return item.states.get(sig) == READY


def build(item: Entry, sig: tuple, examples) -> None:
    """The background job for ``sig``: load its functions from disk, else have a child process compile
    each on the example arguments ``examples()`` returns (name -> args), and store them. Raises
    ``child.CompileFailed`` where compiling fails."""
    functions = artefacts.load(item.key, sig, GENERATOR_VERSION, item.plain)
    if functions is None:
        text, compiled = child.compile_in_child(item.namespace["__source__"], item.namespace["__file__"], examples())
        STATS["graphs"] += compiled
        try:
            artefacts.store(item.key, sig, GENERATOR_VERSION, text)
        except Exception as error:  # noqa: BLE001 - only the next process's start is lost
            warnings.warn(f"flexattn: cannot store the compiled kernel on disk ({type(error).__name__}: {error}); "
                          "another process compiles it again", RuntimeWarning, stacklevel=2)
        functions = artefacts.from_text(text, item.plain)
        if functions is None:
            raise child.CompileFailed("the functions the compiler process built do not load in this process")
    with _lock:
        item.compiled[sig] = functions


class _Recorder:
    """Runs a plain tile function, keeping the arguments of its first call (the compile examples)."""

    def __init__(self, name: str, plain, seen: dict):
        self.name, self.plain, self.seen = name, plain, seen

    def __call__(self, *args):
        self.seen.setdefault(self.name, args)
        return self.plain(*args)


def examples(item: Entry, query, key, value, rows, kv_block, scale, score_buffers, score_consts, mask_buffers,
             mask_consts, slots) -> dict:
    """Example arguments of the tile functions (name -> args), recorded by running the loop on one
    row of the call (of at least two query rows and tiles of at least two columns) on copies of its
    inputs; with ``slots`` the backward's too."""
    row = next((r for r in rows if r.q_stop - r.q_start > 1 and all(p.kv_idx.shape[-1] > 1 for p in r.pieces)),
               None)
    if row is None:
        raise RuntimeError("no query block row of two rows or more to compile on")
    seen: dict = {}
    recorders = {name: _Recorder(name, fn, seen) for name, fn in item.plain.items()}
    fns = loop.TileFunctions(item.plain, recorders, item.namespace.get("mask_mod"), item.mask_reads)
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = (t.detach().to(compute).clone() for t in (query, key, value))
    buffers = [buf.detach().clone() for buf in score_buffers]
    out, lse, _ = loop.forward(fns, q, k, v, [row], kv_block, scale, buffers, score_consts, mask_buffers,
                               mask_consts)
    if slots is not None:
        loop.backward(fns, q, k, v, out, lse, torch.ones_like(out), None, [row], kv_block, scale, buffers, slots,
                      score_consts, mask_buffers, mask_consts)
    return seen


__all__ = ["Entry", "STATS", "build", "entry", "examples", "load_now", "load_source", "on_disk", "plain_functions",
           "request", "signature", "state", "wait", "warn_once"]
