"""Compiling a kernel's tile functions in a child process: the caller's process never runs dynamo or inductor.

Why a child and not a thread: the compiler's Python work would hold the caller's
GIL for seconds, slowing the eager calls that serve meanwhile several times
(docs/performance.md); dynamo's and inductor's configuration is process-global,
so a compile thread's patches (``cpp.threads``, ``specialize_float``, duck
shapes: ``artefacts.compile_tile``) would reach a user's own ``torch.compile``
running at the same time; and dynamo is not thread-safe.

``compile_in_child`` (the parent, on the compile thread) writes one job file
(``torch.save``: the tile source, the example arguments per function, torch's
thread count) and runs ``python -m codegen.torch_backend.compiled.child JOB``
at a low CPU priority; the child compiles each function and writes them
serialised (``artefacts.serialized``) beside the job; the parent stores that
text in its disk cache and loads the functions from it (``artefacts.from_text``),
as another process would from disk. A child that fails (a compiler error, a
missing C++ toolchain, a timeout) raises ``CompileFailed`` in the parent with
the child's one-line reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD_TIMEOUT_S = 1800  # a compilation running longer is abandoned (the eager loop keeps serving)
NICENESS = 10  # the child competes with the calls it serves for the CPU


class CompileFailed(RuntimeError):
    """The child process could not compile a kernel; the message is its reason (one line)."""


def compile_in_child(source_text: str, filename: str, examples: dict) -> tuple[str, int]:
    """Compile the tile functions of ``source_text`` (its module file ``filename``) on ``examples``
    (name -> args) in a child process: (the functions serialised, ``artefacts.serialized``; how many
    the child compiled). Raises ``CompileFailed``."""
    job = {"source": source_text, "filename": filename, "examples": examples, "threads": torch.get_num_threads()}
    package_root = str(Path(__file__).resolve().parents[3])  # the folder holding ``codegen`` and ``flexattn``
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="flexattn-compile-") as scratch:
        job_path, result_path = Path(scratch) / "job.pt", Path(scratch) / "compiled.txt"
        torch.save(job, job_path)
        try:
            done = subprocess.run([sys.executable, "-m", __name__, str(job_path), str(result_path)], env=env,
                                  capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise CompileFailed(f"the compiler ran past {CHILD_TIMEOUT_S} s") from None
        if done.returncode != 0:
            lines = (done.stderr or "").strip().splitlines()
            raise CompileFailed(lines[-1] if lines else f"the compiler process exited with {done.returncode}")
        return result_path.read_text(), int(done.stdout.split()[-1])


def reason(failure: BaseException) -> str:
    """One line naming the innermost error (torch wraps the compiler's: ``BackendCompilerFailed``)."""
    while getattr(failure, "inner_exception", None) or failure.__cause__:
        failure = getattr(failure, "inner_exception", None) or failure.__cause__
    first_line = (str(failure).strip().splitlines() or [""])[0][:200]
    return f"{type(failure).__name__}: {first_line}"


def _main(job_path: str, result_path: str) -> int:
    """The child: compile the job's functions, write them to ``result_path``, print how many it compiled."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, NICENESS)  # inherited by the C++ compiler processes
    except (AttributeError, OSError):
        pass
    from codegen.torch_backend.compiled import artefacts, tier

    job = torch.load(job_path, weights_only=False)
    # dynamo's global-state guard checks torch's thread count: compile at the caller's.
    torch.set_num_threads(job["threads"])
    try:
        plain = tier.plain_functions(tier.load_source(job["source"], job["filename"]))
        compiled = {name: artefacts.compile_tile(plain[name], args, job["threads"])
                    for name, args in job["examples"].items()}
        Path(result_path).write_text(artefacts.serialized(compiled))
    except Exception as failure:  # noqa: BLE001 - the parent reports it and the eager loop serves
        print(reason(failure), file=sys.stderr)
        return 1
    print(len(compiled))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2]))
