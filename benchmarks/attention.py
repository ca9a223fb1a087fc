"""Attention speed on CPU: flexattn (torch back end) vs torch.compile(torch flex_attention) vs SDPA.

fp32, B=1, H=8, D=64, one process. Prints a markdown table (median ms of a
few runs after a warm-up, the implementations taking turns so that noise from
other jobs hits them alike; ratio < 1 means flexattn is faster) and, with
``--cold``, the first-call time of a new mod in fresh processes: once with
an empty kernel cache directory and once with the cache it left on disk.

    python benchmarks/attention.py            # the table (several minutes: torch compiles each shape)
    python benchmarks/attention.py --cold     # cold / warm-disk first-call times
    python benchmarks/attention.py --rows causal  # only rows whose name contains "causal"
    python benchmarks/attention.py --generic  # mods no fast path recognises: compiled vs eager loop
    python benchmarks/attention.py --first-compiled  # fresh-process first call and time-to-compiled
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as torch_flex

import flexattn

B, H, D = 1, 8, 64


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def alibi_mod(heads):
    slopes = torch.exp2(-torch.arange(1, heads + 1, dtype=torch.float32) * 8 / heads)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return alibi


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 1024)


def documents(n):
    lengths = torch.randint(256, 2048, (n // 256,), generator=torch.Generator().manual_seed(0))
    doc_id = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:n]

    def document(b, h, q_idx, kv_idx):
        return (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx)
    return document


def softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def t5_bias(heads):
    """T5's bucketed relative position bias (causal buckets: 16 exact, 16 logarithmic up to 128)."""
    table = torch.randn(heads, 32, generator=torch.Generator().manual_seed(1))

    def t5(score, b, h, q_idx, kv_idx):
        n = (q_idx - kv_idx).clamp(min=0)
        large = 16 + (torch.log(n.float() / 16 + 1e-6) / math.log(128 / 16) * 16).long()
        return score + table[h, torch.where(n < 16, n, large.clamp(max=31))]
    return t5


def relative_bias(n):
    """A learnable (H, 2n - 1) table of relative-position biases (its gradient is computed)."""
    table = torch.zeros(H, 2 * n - 1).requires_grad_()

    def bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + n - 1]
    return bias


def window_512(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 512)


# Mods no fast path recognises (the generic loop): name, length, score_mod, mask_mod, fwd+bwd?
GENERIC_ROWS = [
    ("causal + softcap 4k", 4096, softcap, causal, False),
    ("causal + T5 bucketed bias 2k", 2048, t5_bias(H), causal, False),
    ("sliding window 512 + softcap 8k", 8192, softcap, window_512, False),
    ("documents + softcap 8k", 8192, softcap, documents(8192), False),
    ("causal + learnable relative bias 2k, fwd+bwd", 2048, relative_bias(2048), causal, True),
    ("causal + softcap 4k, fwd+bwd", 4096, softcap, causal, True),
]

# name, length, score_mod, mask_mod, SDPA equivalent ("causal", "none" or None), backward?
ROWS = [
    ("causal 2k", 2048, None, causal, "causal", False),
    ("causal 4k", 4096, None, causal, "causal", False),
    ("causal 8k", 8192, None, causal, "causal", False),
    ("causal + ALiBi 4k", 4096, alibi_mod(H), causal, None, False),
    ("sliding window 1024, 16k", 16384, None, sliding_window, None, False),
    ("packed documents 8k", 8192, None, documents(8192), None, False),
    ("no mask 2k", 2048, None, None, "none", False),
    ("causal 4k, fwd+bwd", 4096, None, causal, "causal", True),
]


def median_ms(fns: dict, reps: int, warmups: int = 1, settle=None) -> dict:
    """Median ms of each function; the functions take turns, so noise on a shared machine hits all alike.
    ``warmups`` untimed rounds first (the first compiles, for torch.compile), then ``settle()`` (wait for
    background work); the order of the turns is reversed every other round, so that no function is always
    timed right after the same other one."""
    times: dict = {}
    for name, fn in list(fns.items()):  # warm-up (and compilation, for torch.compile)
        try:
            fn()
        except NotImplementedError:  # torch's flex_attention has no backward on CPU
            del fns[name]
    for _ in range(warmups - 1):
        for fn in fns.values():
            fn()
    if settle is not None:
        settle()
    for rep in range(reps):
        for name, fn in (list(fns.items()) if rep % 2 == 0 else list(fns.items())[::-1]):
            start = time.perf_counter()
            fn()
            times.setdefault(name, []).append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _stepper(backward: bool):
    """``step(fn)``: a call of ``fn``, followed by a backward of its sum when ``backward``."""
    def step(fn):
        def run():
            out = fn()
            if backward:
                out.sum().backward()
        return run
    return step


def measure(name, n, score_mod, mask_mod, sdpa, backward, reps, compiled_flex):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g, requires_grad=backward) for _ in range(3))
    ours_mask = flexattn.create_block_mask(mask_mod, None, None, n, n) if mask_mod else None
    theirs_mask = torch_flex.create_block_mask(mask_mod, None, None, n, n, device="cpu") if mask_mod else None

    step = _stepper(backward)
    fns = {"ours": step(lambda: flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=ours_mask,
                                                         backend="torch")),
           "theirs": step(lambda: compiled_flex(q, k, v, score_mod=score_mod, block_mask=theirs_mask))}
    if sdpa is not None:
        fns["sdpa"] = step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=sdpa == "causal"))
    ms = median_ms(fns, reps)
    return ms["ours"], ms.get("theirs"), ms.get("sdpa")


def table(rows_filter: str, reps: int) -> None:
    compiled_flex = torch.compile(torch_flex.flex_attention)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B={B}, H={H}, D={D}")
    print("| row | flexattn ms | torch flex (compiled) ms | SDPA ms | flexattn / torch flex | flexattn / SDPA |")
    print("|---|---|---|---|---|---|")
    for name, n, score_mod, mask_mod, sdpa, backward in ROWS:
        if rows_filter not in name:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, theirs, sdpa_ms = measure(name, n, score_mod, mask_mod, sdpa, backward,
                                            reps if n <= 4096 else max(2, reps // 2), compiled_flex)
        theirs_cell = f"{theirs:.1f}" if theirs is not None else "not supported on CPU"
        theirs_ratio = f"{ours / theirs:.2f}" if theirs is not None else "-"
        sdpa_cell = f"{sdpa_ms:.1f}" if sdpa_ms is not None else "-"
        sdpa_ratio = f"{ours / sdpa_ms:.2f}" if sdpa_ms is not None else "-"
        print(f"| {name} | {ours:.1f} | {theirs_cell} | {sdpa_cell} | {theirs_ratio} | {sdpa_ratio} |", flush=True)


def generic(rows_filter: str, reps: int) -> None:
    """The GENERIC_ROWS: flexattn's compiled generic path vs its eager loop vs torch.compile(torch flex)
    (forward rows) vs SDPA given the same mask as a dense bool attn_mask (without the score_mod). Two
    warm-up rounds and every background compilation finished before timing; a row whose compiled calls
    fell back to the plain tile functions (guards rejecting the arguments) or failed to compile says so."""
    from codegen.torch_backend import compiled

    compiled_flex = torch.compile(torch_flex.flex_attention)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B={B}, H={H}, D={D}")
    print("| row | compiled ms | eager ms | torch flex (compiled) ms | SDPA, dense bool mask ms "
          "| compiled / torch flex | compiled / SDPA | compiled / eager |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, score_mod, mask_mod, backward in GENERIC_ROWS:
        if rows_filter not in name:
            continue
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, generator=g, requires_grad=backward) for _ in range(3))
        ours_mask = flexattn.create_block_mask(mask_mod, None, None, n, n)
        theirs_mask = torch_flex.create_block_mask(mask_mod, None, None, n, n, device="cpu")
        dense = torch_flex.create_mask(mask_mod, 1, 1, n, n, device="cpu")

        step = _stepper(backward)

        def ours(mode):
            return step(lambda: flexattn.flex_attention(q, k, v, score_mod=score_mod, block_mask=ours_mask,
                                                         backend="torch", kernel_options={"COMPILED": mode}))

        fns = {"compiled": ours(True), "eager": ours(False),
               "sdpa": step(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense))}
        if not backward:
            fns["theirs"] = step(lambda: compiled_flex(q, k, v, score_mod=score_mod, block_mask=theirs_mask))
        before = dict(compiled.STATS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ms = median_ms(fns, reps if n <= 4096 else max(2, reps // 2), warmups=2, settle=compiled.wait_all)
        fell_back = {k: compiled.STATS[k] - before[k] for k in ("fallbacks", "failures") if compiled.STATS[k] > before[k]}
        if fell_back:
            name = f"{name} (NOT all compiled: {fell_back})"
        theirs = f"{ms['theirs']:.1f}" if "theirs" in ms else "no CPU backward"
        ratio = f"{ms['compiled'] / ms['theirs']:.2f}" if "theirs" in ms else "-"
        print(f"| {name} | {ms['compiled']:.1f} | {ms['eager']:.1f} | {theirs} | {ms['sdpa']:.1f} | {ratio} | "
              f"{ms['compiled'] / ms['sdpa']:.2f} | {ms['compiled'] / ms['eager']:.2f} |", flush=True)


FIRST_COMPILED = """
import statistics, sys, time
start = time.perf_counter()
import torch, flexattn
from codegen.torch_backend import compiled
from codegen.torch_backend.compiled import tier
torch.set_num_threads(int(sys.argv[2]))
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx
def softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)
q = torch.randn(1, 8, 4096, 64)
bm = flexattn.create_block_mask(causal, None, None, 4096, 4096)
imported = time.perf_counter()
alone = during = float("nan")
if sys.argv[1] == "flexattn":
    def call():
        began = time.perf_counter()
        flexattn.flex_attention(q, q, q, score_mod=softcap, block_mask=bm, backend="torch")  # COMPILED "auto"
        return time.perf_counter() - began
    call()
    first = time.perf_counter()
    served = compiled.STATS["served"]
    times = [call() for _ in range(tier.COMPILE_AFTER_CALLS - 1)]  # the last of these queues the compilation
    alone = statistics.median(times[:-1]) if not served else alone
    compiling = []
    while compiled.STATS["served"] == served and not compiled.STATS["failures"]:
        compiling.append(call())  # eager while the compiler runs (the call that finds it ready is compiled)
    ready = time.perf_counter() - compiling.pop() if compiling else first
    during = statistics.median(compiling) if compiling else during
else:
    from torch.nn.attention import flex_attention as tf
    theirs = tf.create_block_mask(causal, None, None, 4096, 4096, device="cpu")
    torch.compile(tf.flex_attention)(q, q, q, score_mod=softcap, block_mask=theirs)
    first = ready = time.perf_counter()
    served = 1
print(f"{imported - start:.2f} {first - imported:.2f} {ready - imported:.2f} {served} {compiled.STATS['loaded']} "
      f"{1e3 * alone:.0f} {1e3 * during:.0f}")
"""


def first_compiled(repeats: int = 1) -> None:
    """Fresh processes, causal + softcap 4k: flexattn's first call (``COMPILED="auto"``), the time
    until its compiled kernel serves (auto calls one after another: the compilation starts at the
    ``COMPILE_AFTER_CALLS``-th, in the background) and the median eager call before and while it
    compiles, with empty caches (flexattn's and inductor's) and then warm ones; torch.compile(torch
    flex)'s first call with empty and warm inductor caches."""
    print("| process | first call s | compiled kernel serving s (from the first call's start) | first call compiled? "
          "| loaded from disk? | eager call ms | eager call while compiling ms |")
    print("|---|---|---|---|---|---|---|")
    for _ in range(repeats):
        for who in ("flexattn", "torch"):
            with tempfile.TemporaryDirectory() as cache_dir:
                env = dict(os.environ, FLEXATTN_CACHE_DIR=cache_dir, TORCHINDUCTOR_CACHE_DIR=cache_dir + "/inductor")
                for label in ("fresh, empty caches", "second, warm disk caches"):
                    command = [sys.executable, "-c", FIRST_COMPILED, who, str(torch.get_num_threads())]
                    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.split()
                    served = "yes" if out[3] != "0" else "no (eager)"
                    loaded = "-" if who == "torch" else ("yes" if out[4] != "0" else "no")
                    alone, during = (x if x != "nan" else "-" for x in out[5:7])
                    print(f"| {who}: {label} | {out[1]} | {out[2]} | {served} | {loaded} | {alone} | {during} |",
                          flush=True)


FIRST_CALL = """
import time
start = time.perf_counter()
import torch, flexattn
imported = time.perf_counter()
def sliding_alibi(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 300)
def bias(score, b, h, q_idx, kv_idx):
    return score + 0.01 * torch.tanh((q_idx - kv_idx) / 8.0) * (h + 1)
q = torch.randn(1, 8, 1024, 64)
bm = flexattn.create_block_mask(sliding_alibi, None, None, 1024, 1024)
flexattn.flex_attention(q, q, q, score_mod=bias, block_mask=bm, backend="torch")
done = time.perf_counter()
print(f"{imported - start:.2f} {done - imported:.2f}")
"""


def cold(repeats: int = 2) -> None:
    print("| process | import torch + flexattn s | first call (create_block_mask + attention) s |")
    print("|---|---|---|")
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache_dir:
            env = dict(os.environ, FLEXATTN_CACHE_DIR=cache_dir)
            for label in ("fresh, empty cache dir", "second, warm disk cache"):
                out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True,
                                     text=True, check=True).stdout.split()
                print(f"| {label} | {out[0]} | {out[1]} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="", help="only rows whose name contains this")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="measure first-call times in fresh processes")
    parser.add_argument("--generic", action="store_true", help="the rows no fast path recognises")
    parser.add_argument("--first-compiled", action="store_true", help="fresh-process first call, time-to-compiled")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.first_compiled:
        first_compiled()
    elif args.generic:
        generic(args.rows, args.reps)
    elif args.cold:
        cold()
    else:
        table(args.rows, args.reps)


if __name__ == "__main__":
    main()
