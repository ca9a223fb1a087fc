"""transformers models end to end: attn_implementation flexattn vs sdpa vs eager (and torch's flex_attention).

Random-weight Llama-style models built from configs (no downloads), batch 2 with 16 tokens of
left padding in the first row. Per implementation: the first forward of a fresh model in this
process (flexattn generates its kernels then, or reads them from its disk cache), then warm
medians of a forward (no grad), a training step (forward + backward) and ``generate`` of 32 new
tokens from a 64-token prompt (greedy, dynamic cache), reported per token: the same prompt every
repetition, and a new left padding every repetition (no mask of its steps built before). The
implementations take turns in every repetition, so load on the machine falls on each alike. One
intra-op thread.
torch's flex_attention compiles with inductor on the CPU (seconds to minutes per shape): only
with --torch-flex, forward only.
Usage: python benchmarks/transformers_models.py [--sizes tiny:256 small:512] [--reps 3] [--torch-flex]
"""

import argparse
import statistics
import time

import torch
import transformers

from flexattn.integrations import transformers as flex_hf

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
}


def _model(size: str, impl: str):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, max_position_embeddings=4096, **SIZES[size])
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl)


def _inputs(length: int):
    ids = torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :16] = 0
    return ids, mask


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _forward(model, ids, mask):
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)


def _train_step(model, ids, mask):
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()


def _generate(model, ids, mask):
    model.generate(input_ids=ids[:, :64], attention_mask=mask[:, :64], max_new_tokens=32, min_new_tokens=32,
                   do_sample=False)


_prompts: dict[int, int] = {}


def _generate_new_prompt(model, ids, mask):
    """``_generate`` with another left padding every call, as a new prompt has: no mask of its
    steps was built before (flexattn's BlockMask cache cannot serve them)."""
    count = _prompts[id(model)] = _prompts.get(id(model), 0) + 1
    mask = mask.clone()
    mask[0, :16 + count % 40] = 0
    _generate(model, ids, mask)


TASKS = ("forward (ms)", "train step (ms)", "generate (ms/token)", "generate, new prompts (ms/token)")


def run(size: str, length: int, impls: list[str], reps: int) -> list[str]:
    ids, mask = _inputs(length)
    models = {impl: _model(size, impl) for impl in impls}
    rows = {impl: {"first forward (s)": _seconds(lambda m=models[impl]: _forward(m, ids, mask))} for impl in impls}
    tasks = {"forward (ms)": _forward, "train step (ms)": _train_step, "generate (ms/token)": _generate,
             "generate, new prompts (ms/token)": _generate_new_prompt}
    if "flex_attention" in impls:
        tasks = {"forward (ms)": _forward}
    times = {impl: {task: [] for task in tasks} for impl in impls}
    # New prompts after the rest: their masks would push the repeated prompt's out of flexattn's cache.
    for group in ([t for t in tasks if "new prompts" not in t], [t for t in tasks if "new prompts" in t]):
        for _ in range(reps):
            for task in group:
                for impl in impls:
                    times[impl][task].append(_seconds(lambda m=models[impl], fn=tasks[task]: fn(m, ids, mask)))
    lines = []
    for impl in impls:
        cells = [f"{rows[impl]['first forward (s)']:.2f}"]
        for task in TASKS:
            if task not in tasks:
                cells.append("-")
                continue
            value = statistics.median(times[impl][task]) * 1e3
            cells.append(f"{value / 32 if 'token' in task else value:.1f}")
        lines.append(f"| {size} | {length} | {impl} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny:256", "small:512"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--torch-flex", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared machine: one intra-op thread for every implementation alike
    flex_hf.register()
    print("| model | seq | attention | first forward (s) | " + " | ".join(TASKS) + " |")
    print("|---|---|---|---|" + "---|" * len(TASKS))
    for item in args.sizes:
        size, length = item.split(":")
        for line in run(size, int(length), [flex_hf.NAME, "sdpa", "eager"], args.reps):
            print(line, flush=True)
        if args.torch_flex:
            for line in run(size, int(length), ["flex_attention"], 1):
                print(line, flush=True)


if __name__ == "__main__":
    main()
