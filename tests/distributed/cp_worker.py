"""The body of the context-parallel tests, run in each process spawned by test_cp_attention.py.

Each rank builds the full inputs from a seed, computes single-process flex_attention (output, lse and
gradients of a loss that uses both), runs context_parallel_attention on its shards and records the
relative errors of its rows, plus the outcome of each error case; the test process asserts on them.
"""

import datetime
import json
import time

import torch
import torch.distributed as dist

import flexattn
from flexattn.distributed import context_parallel_attention, plan_context_parallel, shard, unshard
from flexattn.distributed.attention import local_parts
from flexattn.api import mask_of

TIMEOUT = datetime.timedelta(seconds=180)  # a failing case fails its peers in minutes (a loaded 2-core machine runs 4 ranks), not half an hour
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


def causal(b, h, q, kv):
    return q >= kv


def window(b, h, q, kv):
    return (q - kv).abs() <= 20


def prefix_lm(b, h, q, kv):
    return (kv < 40) | (q >= kv)


def alibi(score, b, h, q, kv):
    return score + SLOPES[h] * (kv - q)


def documents(lengths, causal_within):
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def document_mask(b, h, q, kv):
        same = doc[q] == doc[kv]
        return same & (q >= kv) if causal_within else same
    return document_mask


# name: (N, mask_mod, score_mod kind, Hq, Hkv, B). Lengths are not multiples of the 16-wide tiles
# where marked, so ranks hold shards of different lengths.
CASES = {
    "causal_uneven": (200, causal, None, 2, 2, 1),
    "sliding_window": (192, window, None, 2, 2, 2),
    "documents": (192, documents([50, 30, 70, 42], False), None, 2, 2, 1),
    "documents_causal_uneven": (147, documents([60, 20, 67], True), None, 2, 2, 1),
    "prefix_lm": (176, prefix_lm, None, 2, 2, 1),
    "alibi_causal": (160, causal, "alibi", 4, 4, 1),
    "bias_table": (200, causal, "bias", 2, 2, 1),
    "gqa": (160, causal, None, 4, 2, 1),
    "everywhere": (96, None, None, 2, 2, 1),
}
FOUR_RANK_CASES = ("causal_uneven", "documents_causal_uneven", "bias_table")


def _rel(a, b) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-30))


def run_case(name, rank, world):
    N, mask_mod, score_kind, Hq, Hkv, B = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    q = torch.randn(B, Hq, N, 8, generator=g)
    k, v = torch.randn(B, Hkv, N, 8, generator=g), torch.randn(B, Hkv, N, 8, generator=g)
    bias = torch.randn(Hq, N, generator=g).requires_grad_()
    score_mod = {None: None, "alibi": alibi, "bias": lambda s, b, h, qi, kv: s + bias[h, kv]}[score_kind]
    bm = flexattn.create_block_mask(mask_mod, None, None, N, N, BLOCK_SIZE=16) if mask_mod else None
    plan = plan_context_parallel(bm if bm is not None else flexattn.create_block_mask(
        flexattn.noop_mask, None, None, N, N, BLOCK_SIZE=16), world)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, aux = flexattn.flex_attention(*full, score_mod=score_mod, block_mask=bm, enable_gqa=Hq != Hkv,
                                       return_aux=flexattn.AuxRequest(lse=True))
    w_out, w_lse = torch.randn(ref.shape, generator=g), torch.randn(aux.lse.shape, generator=g)
    wrt = full + ([bias] if score_kind == "bias" else [])
    ref_grads = torch.autograd.grad((ref * w_out).sum() + (aux.lse * w_lse).sum(), wrt)
    local = [shard(t, plan).requires_grad_() for t in (q, k, v)]
    out, lse = context_parallel_attention(*local, score_mod, bm, plan=plan, enable_gqa=Hq != Hkv, return_lse=True,
                                         timeout=TIMEOUT)
    loss = (out * shard(w_out, plan)).sum() + (lse * shard(w_lse, plan)).sum()
    grads = torch.autograd.grad(loss, local + wrt[3:])
    errors = {"out": _rel(out, shard(ref, plan)), "lse": _rel(lse, shard(aux.lse, plan)),
              "unshard": _rel(unshard(out, plan, timeout=TIMEOUT), ref)}
    for label, got, want in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        errors[label] = _rel(got, want if label == "dbias" else shard(want, plan))
    parts = local_parts(bm if bm is not None else _everywhere(N), plan, rank, q.device)
    keys = [mask_of(p.block_mask).graph.structural_key(constants=False, shapes=False)
            for p in (parts.own, parts.remote) if p is not None]
    return {"errors": errors, "strategy": plan.strategy, "ir_keys": keys}


def _everywhere(N):
    from flexattn.distributed.context_parallel import _attend_everywhere
    return _attend_everywhere(N, (16, 16))


def _outcome(fn):
    try:
        fn()
    except flexattn.FlexAttnError as error:
        return [type(error).__name__, str(error)]
    return ["no error", ""]


def run_errors(rank, world):
    N = 128
    bm = flexattn.create_block_mask(causal, None, None, N, N, BLOCK_SIZE=16)
    plan = plan_context_parallel(bm, world)
    x = torch.randn(1, 2, N, 8, generator=torch.Generator().manual_seed(0))
    q = shard(x, plan)
    short = q[:, :, :-1] if rank == 1 else q
    other = flexattn.create_block_mask(causal, None, None, N + 16, N + 16, BLOCK_SIZE=16)
    wrong_world = plan_context_parallel(bm, world + 1)
    timeout = datetime.timedelta(seconds=2)
    results = {
        "shard_size": _outcome(lambda: context_parallel_attention(short, q, q, block_mask=bm, timeout=timeout)),
        "group_size": _outcome(lambda: context_parallel_attention(q, q, q, block_mask=bm, plan=wrong_world,
                                                                  timeout=timeout)),
        "other_length": _outcome(lambda: context_parallel_attention(q, q, q, block_mask=other, plan=plan,
                                                                    timeout=timeout)),
        "still_usable": _rel(unshard(context_parallel_attention(q, q, q, block_mask=bm), plan),
                             flexattn.flex_attention(x, x, x, block_mask=bm)),
    }
    # Last (it leaves the group unusable): rank 0 calls alone and must time out, naming itself and the step.
    if rank == 0:
        started = time.time()
        results["peer_missing"] = _outcome(lambda: context_parallel_attention(q, q, q, block_mask=bm,
                                                                              timeout=timeout))
        results["peer_missing_seconds"] = time.time() - started
    else:
        time.sleep(4)
    return results


def main(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    results = {}
    for name in CASES if world == 2 else FOUR_RANK_CASES:
        started = time.time()
        try:
            results[name] = run_case(name, rank, world)
            results[name]["seconds"] = time.time() - started
        except Exception as error:  # recorded, so the test names the case that failed and why
            results[name] = {"exception": f"{type(error).__name__}: {error}"}
    if world == 2:
        results["errors"] = run_errors(rank, world)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)
