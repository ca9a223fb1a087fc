"""Per-call overhead: tracing, BlockMask builds for transformers' masks, and a flex_attention call.

Runs the same cases on two checkouts, each in its own worker process, taking turns for --rounds
rounds (the package cannot be imported twice in one process): --base (e.g. the commit before the
caches: ``git archive 6fe4438 | tar -x -C /tmp/base19``) and this checkout. Every case builds
what a model builds per forward: a fresh closure over fresh tensors (same values), as transformers'
mask functions are remade on every forward. Prints a markdown table of ms per call: per worker the
median of its calls, then the median over rounds.
One intra-op thread (these are Python costs; on a shared machine spinning threads add noise).
Usage: python benchmarks/overhead.py --base /tmp/base19 [--rounds 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ["trace: transformers' mask function (sliding + padding), new closure",
         "create_block_mask: transformers' flex mask at 512, same values",
         "create_block_mask: transformers' flex mask at 512, new values each call",
         "flexattn mask interface at 512, same values",
         "flexattn mask interface at 512, new values each call",
         "flexattn mask interface, decode steps (1 x 512..575)",
         "flex_attention fixed cost (1, 2, 16, 16), new score_mod closure"]


def _hf_mask(mu, torch, pad: int, length: int = 512, q_offset: int = 0):
    """The mask_mod transformers' own flex_attention_mask builds (sliding window + padding + offsets)."""
    attention = torch.ones(2, length, dtype=torch.bool)
    attention[0, :pad] = False
    padding = mu.prepare_padding_mask(attention, length, 0)
    mask = mu.and_masks(mu.sliding_window_causal_mask_function(128), mu.padding_mask_function(padding))
    return mu.add_offsets_to_mask_function(mask, q_offset, 0), attention


def _time(fn, reps: int) -> float:
    """The median ms of ``reps`` calls (after one warm-up): on a shared machine a mean is ruled
    by the few calls that wait for the CPU or a garbage collection."""
    fn()
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def worker() -> dict:
    import torch
    from transformers import masking_utils as mu

    import flexattn

    torch.set_num_threads(1)
    try:
        from flexattn.integrations.hf_masks import block_mask_interface
    except ImportError:
        block_mask_interface = None
    q = torch.randn(1, 2, 16, 16)

    def score_mod_closure():
        slope = 0.5
        return lambda score, b, h, q_idx, kv_idx: score + slope * (q_idx - kv_idx)

    def interface(i=0, new=False, decode=False):
        kv_len = 512 + i % 64 if decode else 512  # a decoding step: one query, a cache one longer each step
        attention = torch.ones(2, kv_len, dtype=torch.bool)
        attention[0, :3 + (i % 50 if new else 0)] = False
        return block_mask_interface(2, 1 if decode else 512, kv_len, kv_len - 1 if decode else 0, 0,
                                    mu.sliding_window_causal_mask_function(128), attention)

    results = {
        CASES[0]: _time(lambda i=0: flexattn.trace_mask_mod(_hf_mask(mu, torch, 3)[0]), 50),
        CASES[1]: _time(lambda i=0: flexattn.create_block_mask(_hf_mask(mu, torch, 3)[0], 2, None, 512, 512,
                                                               _compile=True), 20),
        CASES[2]: _time(lambda i=0: flexattn.create_block_mask(_hf_mask(mu, torch, 3 + i % 50)[0], 2, None, 512,
                                                               512, _compile=True), 10),
        CASES[6]: _time(lambda i=0: flexattn.flex_attention(q, q, q, score_mod=score_mod_closure()), 100),
    }
    if block_mask_interface is not None:
        results[CASES[3]] = _time(lambda i=0: interface(i), 50)
        results[CASES[4]] = _time(lambda i=0: interface(i, new=True), 20)
        results[CASES[5]] = _time(lambda i=0: interface(i, decode=True), 50)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="a checkout of the version to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name, root in (("before", args.base), ("after", here)):
            env = dict(os.environ, PYTHONPATH=root)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env, cwd=root,
                                 capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    print("| case | before (ms) | after (ms) |\n|---|---|---|")
    for case in CASES:
        cells = []
        for name in ("before", "after"):
            values = [run[case] for run in runs[name] if case in run]
            cells.append(f"{statistics.median(values):.3f}" if values else "-")
        print(f"| {case} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        print(json.dumps(worker()))
    else:
        main()
