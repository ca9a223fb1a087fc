"""Issue 22's GPU check: flexattn's Triton back end vs torch.compile(flex_attention) vs SDPA.

One table, one row per (kind, mod, layout, D, S or KV_LEN, pass) of
``gpu_check_rows.rows``: the relative errors (norm) of flexattn in fp32 against
the dense reference and of flexattn in bf16 against torch's flex_attention in
bf16 (out, then dq / dk / dv for forward+backward rows), then the TFLOP/s of
each implementation counting only unmasked work, flexattn over torch, and the
fraction of the GPU's dense bf16 peak (``PEAKS``). Rows are written to the
markdown file as they finish (flushed), so a run cut short keeps its rows; a
failing row (or implementation) writes its error and the run goes on; each row
has a time limit and the run a global one (later rows then say "skipped").
Timing: warm-up (compiles), then the implementations take turns, timed by CUDA
events, median of the repeats. Installs nothing. On a CUDA machine::

    PYTHONPATH=. python benchmarks/gpu_check.py gpu_check.md

``--dry-run`` runs the same code on CPU at tiny sizes (Triton under
TRITON_INTERPRET=1, torch's flex_attention eager): tests/test_gpu_check.py.
"""

from __future__ import annotations

import os
import sys
import time

STARTED = time.monotonic()
if "--dry-run" in sys.argv:  # the interpreter is chosen when Triton kernels are defined: before any is
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import flex_attention as torch_flex  # noqa: E402

import gpu_check_rows as cases  # noqa: E402 (benchmarks/, the script's directory, is on sys.path)

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from NVIDIA's datasheets; the first name that
# torch.cuda.get_device_name() contains wins (so the more specific names come first).
PEAKS = [("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
         ("H800", 989.0), ("A100", 312.0), ("L40S", 362.0)]
IMPLS = ("flexattn", "torch flex", "SDPA")
COLUMNS = ["kind", "mod", "layout", "D", "S / KV_LEN", "pass", "fp32 vs reference (out dq dk dv)",
           "bf16 vs torch flex (out dq dk dv)", "flexattn ms", "flexattn TFLOP/s", "torch flex TFLOP/s",
           "SDPA TFLOP/s", "flexattn / torch", "flexattn % peak", "torch % peak", "row s", "note"]
TIMED_SECONDS = 1.5  # per row, over all repeats of all implementations
MIN_REPS, MAX_REPS = 3, 50


class RowTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise RowTimeout("row time limit")


def peak_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAKS if key in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_turns(fns: dict, device, dry: bool) -> dict:
    """Median seconds per call of each function (each called once already: compiled); they take turns
    call by call. On CUDA each call sits between two events (the GPU's time); on CPU (dry run) between
    perf_counter reads."""
    reps = 1  # the dry run: each function's one timed call follows the caller's warm-up call
    if not dry:
        for fn in fns.values():
            fn()
        sync(device)
        start = time.perf_counter()
        for fn in fns.values():
            fn()
        sync(device)
        reps = max(MIN_REPS, min(MAX_REPS, int(TIMED_SECONDS / (time.perf_counter() - start))))
    marks = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                marks[name].append((begin, end))
            else:
                t0 = time.perf_counter()
                fn()
                marks[name].append(time.perf_counter() - t0)
    sync(device)
    if device.type == "cuda":
        return {name: statistics.median(b.elapsed_time(e) / 1e3 for b, e in m) for name, m in marks.items()}
    return {name: statistics.median(m) for name, m in marks.items()}


def _errors(values) -> str:
    return " ".join(f"{e:.1e}" for e in values)


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")
    return text[:160]


def _note(cells: dict, text: str) -> None:
    cells["note"] = "; ".join(filter(None, (cells.get("note"), text)))


def run_row(row, sizes, device, torch_attention, dry: bool, cells: dict, peak) -> None:
    """Fill ``cells`` (column -> text) as the row goes, so an error or timeout keeps what was done."""
    case = cases.build(row, sizes, device, torch_attention)
    try:
        cells["fp32 vs reference (out dq dk dv)"] = _errors(case.fp32_errors())
    except RowTimeout:
        raise
    except Exception as error:  # noqa: BLE001 (the row goes on with the other columns)
        _note(cells, f"fp32 check: {_short(error)}")
    fns, outputs = {}, {}
    for name, fn in case.fns.items():
        try:
            outputs[name] = fn()  # also the first warm-up call (compiles)
            fns[name] = fn
        except RowTimeout:
            raise
        except Exception as error:  # noqa: BLE001
            _note(cells, f"{name}: {_short(error)}")
    if "flexattn" in outputs and "torch flex" in outputs:
        cells["bf16 vs torch flex (out dq dk dv)"] = _errors(
            cases.relative(a, b) for a, b in zip(outputs["flexattn"], outputs["torch flex"]))
    del outputs
    seconds = time_turns(fns, device, dry)
    tflops = {name: case.flops / t / 1e12 for name, t in seconds.items()}
    for name in IMPLS:
        cells[f"{name} TFLOP/s"] = f"{tflops[name]:.3g}" if name in tflops else ("n/a" if name not in case.fns
                                                                                 else "failed")
    if "flexattn" in seconds:
        cells["flexattn ms"] = f"{seconds['flexattn'] * 1e3:.3g}"
    if "flexattn" in tflops and "torch flex" in tflops:
        cells["flexattn / torch"] = f"{tflops['flexattn'] / tflops['torch flex']:.2f}"
    for name, column in (("flexattn", "flexattn % peak"), ("torch flex", "torch % peak")):
        if name in tflops:
            cells[column] = "n/a" if peak is None else f"{100 * tflops[name] / peak:.1f}"


def guarded_row(row, sizes, device, torch_attention, dry: bool, cells: dict, peak, limit: float) -> None:
    """``run_row`` under a time limit (SIGALRM); any error becomes the row's note and the run goes on."""
    started = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            run_row(row, sizes, device, torch_attention, dry, cells, peak)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # raises too after a kernel fault, which then fails every later row
    except Exception as error:  # noqa: BLE001 (a failing row is reported, the run goes on)
        _note(cells, f"{_short(error)} after {time.monotonic() - started:.0f} s")
        traceback.print_exc()
    cells["row s"] = f"{time.monotonic() - started:.1f}"  # with compiles and checks


def header(device, sizes, args, peak) -> list[str]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU dry run)"
    lines = [f"# flexattn GPU check ({'dry run, CPU' if args.dry_run else 'GPU'})", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- GPU: {gpu}; dense bf16 peak: {'unknown' if peak is None else f'{peak:g} TFLOP/s'}",
             f"- torch {torch.__version__} (CUDA {torch.version.cuda}), Triton {triton.__version__}",
             f"- B={sizes.B}, H={sizes.H} (decode: H_KV={sizes.H_KV}), bf16; window {sizes.window}, "
             f"{sizes.n_docs} packed documents, softcap {cases.SOFTCAP:g}, decode page / KV block {sizes.page}",
             f"- limits: {args.row_limit:g} s per row, {args.time_limit:g} s in all; "
             "torch flex " + ("eager, its CPU backward check lifted" if args.dry_run
                              else "torch.compile(flex_attention, dynamic=False)"), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", help="markdown file the table is written to, row by row")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, Triton interpreted")
    parser.add_argument("--time-limit", type=float, default=450.0, help="seconds for the whole run")
    parser.add_argument("--row-limit", type=float, default=60.0, help="seconds for one row")
    parser.add_argument("--only", default="", help="regular expression: run only rows whose label matches")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes = cases.DRY if args.dry_run else cases.GPU
    peak = peak_tflops(device)
    if args.dry_run:
        # torch refuses flex_attention's backward on CPU by a device check alone: its eager (dense) forward
        # and backward are device-independent torch ops, so the dry run lifts the check and runs them.
        torch_flex._validate_device = lambda query, key, value: None
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        torch_attention = torch_flex.flex_attention
    else:
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):  # every row's mods and shapes compile anew
                setattr(torch._dynamo.config, name, 10_000)
        torch_attention = torch.compile(torch_flex.flex_attention, dynamic=False)
    signal.signal(signal.SIGALRM, _on_alarm)
    with open(args.table, "w") as table:
        def emit(line):
            print(line, flush=True)
            table.write(line + "\n")
            table.flush()

        for line in header(device, sizes, args, peak):
            emit(line)
        for row in cases.rows(sizes):
            if not re.search(args.only, row.label):
                continue
            left = args.time_limit - (time.monotonic() - STARTED)
            cells = dict(zip(COLUMNS, row.cells))
            if left < 1.0:
                cells["note"] = "skipped: global time limit"
            else:
                guarded_row(row, sizes, device, torch_attention, args.dry_run, cells, peak, min(args.row_limit, left))
            emit("| " + " | ".join(cells.get(c, "") for c in COLUMNS) + " |")
        emit(f"\ntotal {time.monotonic() - STARTED:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
