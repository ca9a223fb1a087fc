"""The torch back end's compiled generic path: equal to the eager loop and the dense reference, tiered,
compiled once across lengths, safe when compilation fails or its cache is corrupt.

Compiling costs seconds per mod and signature on a 2-core machine, so the tests share few mods
(inductor's own disk cache keeps what they built for the next run).
"""

import warnings

import pytest
import torch

import flexattn
from codegen.cache import KERNELS, kernel_key
from codegen.torch_backend import compiled
from codegen.torch_backend.compiled import artefacts, loop, source, tier
from mods import MODS

B, HQ, HKV, L, S, E, EV, BLOCK = 2, 4, 2, 77, 93, 8, 11, 16
CASES = {case.name: case for case in MODS}
COMPILED, EAGER = {"COMPILED": True}, {"COMPILED": False}


def _inputs(L=L, S=S, dtype=torch.float32, batch=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(batch, HQ, L, E), make(batch, HKV, S, E), make(batch, HKV, S, EV)


def _attend(mods, q, k, v, backend="torch", options=None):
    block_mask = None
    if mods.mask_mod is not None:
        block_mask = flexattn.create_block_mask(mods.mask_mod, q.shape[0], HQ, q.shape[2], k.shape[2],
                                                BLOCK_SIZE=BLOCK)
    return flexattn.flex_attention(q, k, v, score_mod=mods.score_mod, block_mask=block_mask, enable_gqa=True,
                                   backend=backend, kernel_options=options if backend == "torch" else None)


def _values_and_grads(mods, backend, options=None):
    q, k, v = _inputs()
    leaves = [q, k, v, *[p.requires_grad_() for p in mods.params]]
    out = _attend(mods, q, k, v, backend, options)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), leaves)
    for p in mods.params:
        p.requires_grad_(False)
    return [out, *grads]


@pytest.mark.parametrize("name", ["softcap", "per_head_batch"])
def test_compiled_equals_eager_and_reference_forward_and_backward(name):
    mods = CASES[name].build(L, S, HQ)
    served, fallbacks = compiled.STATS["served"], compiled.STATS["fallbacks"]
    ours = _values_and_grads(mods, "torch", COMPILED)
    assert compiled.STATS["served"] == served + 1  # the compiled kernel ran (GQA, odd lengths)
    assert compiled.STATS["fallbacks"] == fallbacks  # on compiled tile functions, not their plain fallback
    eager = _values_and_grads(mods, "torch", EAGER)
    reference = _values_and_grads(mods, "reference")
    for a, b, c in zip(ours, eager, reference):
        torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_compiled_forward_merges_many_pieces_and_empty_rows_as_the_reference():
    """The compiled forward merges a row's pieces one at a time (max_tiles 1: a piece per tile,
    rescaling the earlier ones) and keeps rows with no key at all (-inf maxima before and after a
    piece) at zero weight; forward and backward equal the reference."""
    softcap = lambda score, b, h, q_idx, kv_idx: 4.0 * torch.tanh(score / 4.0)  # noqa: E731
    mask = lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx % 7 != 3)  # noqa: E731 - rows 3, 10, ... empty
    bm = flexattn.create_block_mask(mask, None, None, L, S, BLOCK_SIZE=BLOCK)
    results = {}
    for backend, options in (("torch", {**COMPILED, "max_tiles": 1}), ("reference", None)):
        q, k, v = _inputs()
        served = compiled.STATS["served"]
        out = flexattn.flex_attention(q, k, v, score_mod=softcap, block_mask=bm, enable_gqa=True, backend=backend,
                                      kernel_options=options)
        if backend == "torch":
            assert compiled.STATS["served"] == served + 1
        results[backend] = [out, *torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (q, k, v))]
    assert results["torch"][0][:, :, 3].abs().max() == 0  # an empty row
    for ours, reference in zip(results["torch"], results["reference"]):
        torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_full_tiles_of_rows_shared_by_the_batch_are_attended_whole():
    """Shared pieces of a row whose tiles are FULL for one sequence and PARTIAL for the other
    (a padding mask) keep FULL tiles whole, also where the mask_mod no longer holds there."""
    lengths = torch.tensor([96, 90])
    mask = lambda b, h, q_idx, kv_idx: kv_idx < lengths[b]  # noqa: E731
    softcap = lambda score, b, h, q_idx, kv_idx: 4.0 * torch.tanh(score / 4.0)  # noqa: E731
    q, k, v = (x.detach() for x in _inputs(64, 96))
    bm = flexattn.create_block_mask(mask, B, None, 64, 96, BLOCK_SIZE=BLOCK)
    classes = bm.tile_classes()[:, 0, 0]
    assert classes[0, -1] != classes[1, -1]  # the last tile: FULL for sequence 0, PARTIAL for 1
    lengths[0] = 84  # the BlockMask still lists sequence 0's last tile FULL
    served = compiled.STATS["served"]
    ours, reference = (flexattn.flex_attention(q, k, v, score_mod=softcap, block_mask=bm, enable_gqa=True,
                                               backend=backend, kernel_options=COMPILED if backend == "torch" else None)
                       for backend in ("torch", "reference"))
    assert compiled.STATS["served"] == served + 1
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_gradcheck_float64_through_the_compiled_path():
    mods = CASES["relative_bias"].build(20, 24, HQ)
    q, k, v = _inputs(20, 24, torch.float64)
    table = mods.params[0].double().requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + 23]

    def attend(q, k, v, table, backend="torch"):
        return flexattn.flex_attention(q, k, v, score_mod=score_mod, enable_gqa=True, backend=backend,
                                       kernel_options=COMPILED if backend == "torch" else None)

    served = compiled.STATS["served"]
    assert torch.autograd.gradcheck(attend, (q, k, v, table), fast_mode=True)
    assert compiled.STATS["served"] > served
    torch.testing.assert_close(attend(q, k, v, table), attend(q, k, v, table, "reference"))


def test_training_loop_with_new_lengths_every_step_compiles_once():
    """float64, as the gradcheck above (whose compiled graphs it reuses when run after it)."""
    graphs, fallbacks = None, compiled.STATS["fallbacks"]
    for step, (length, kv_length) in enumerate([(77, 93), (64, 50), (101, 131), (33, 47), (90, 90)]):
        mods = CASES["relative_bias"].build(length, kv_length, HQ)  # a table of a new shape every step
        table = mods.params[0].double().requires_grad_()
        q, k, v = _inputs(length, kv_length, torch.float64, seed=step)
        mods.score_mod = lambda score, b, h, q_idx, kv_idx, table=table, offset=kv_length - 1: (
            score + table[h, q_idx - kv_idx + offset])
        served = compiled.STATS["served"]
        out = _attend(mods, q, k, v, options=COMPILED)
        out.square().mean().backward()
        assert compiled.STATS["served"] == served + 1
        with torch.no_grad():
            table -= 0.1 * table.grad
        if graphs is None:
            graphs = compiled.STATS["graphs"]  # the first step may compile (unless a test above did)
        assert compiled.STATS["graphs"] == graphs, f"step {step} recompiled"
        assert compiled.STATS["fallbacks"] == fallbacks, f"step {step} rejected by the compiled functions' guards"


def _new_process(monkeypatch):
    """Forget what this process compiled or loaded (the disk caches stay), as a new process would."""
    KERNELS.clear_memory()
    monkeypatch.setattr(tier, "_entries", {})
    monkeypatch.setattr(tier, "_calls", {})


def test_auto_serves_eagerly_until_compiled_and_a_new_process_loads_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FLEXATTN_COMPILED", raising=False)  # the suite's default is eager (conftest.py)
    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path))  # nothing compiled on disk yet
    monkeypatch.setattr(compiled, "MIN_COMPILED_SCORES", 0)  # these shapes are small

    def mask(b, h, q_idx, kv_idx):
        return q_idx - kv_idx <= 40

    mods = CASES["softcap"].build(L, S, HQ)
    mods.mask_mod = mask
    q, k, v = (t.detach() for t in _inputs())
    served = compiled.STATS["served"]
    for _ in range(tier.COMPILE_AFTER_CALLS):  # the last of these queues the compilation; all serve eagerly
        first = _attend(mods, q, k, v, options={"COMPILED": "auto"})
        assert compiled.STATS["served"] == served
    compiled.wait_all()
    again = _attend(mods, q, k, v, options={"COMPILED": "auto"})
    assert compiled.STATS["served"] == served + 1
    torch.testing.assert_close(again, first, atol=2e-5, rtol=1e-4)

    _new_process(monkeypatch)
    graphs, loaded, fallbacks = compiled.STATS["graphs"], compiled.STATS["loaded"], compiled.STATS["fallbacks"]
    mods.score_mod = lambda score, b, h, q_idx, kv_idx: 30.0 * torch.tanh(score / 30.0)  # a new constant
    again = _attend(mods, q, k, v, options={"COMPILED": "auto"})  # found on disk: its first call is compiled
    assert compiled.STATS["loaded"] == loaded + 1 and compiled.STATS["fallbacks"] == fallbacks
    assert compiled.STATS["served"] == served + 2 and compiled.STATS["graphs"] == graphs  # loaded, not compiled
    torch.testing.assert_close(again, _attend(mods, q, k, v, backend="reference"), atol=2e-5, rtol=1e-4)


def test_auto_never_compiles_a_small_call(monkeypatch):
    monkeypatch.delenv("FLEXATTN_COMPILED", raising=False)
    mods = CASES["softcap"].build(L, S, HQ)
    q, k, v = (t.detach() for t in _inputs())
    graphs = compiled.STATS["graphs"]
    for _ in range(tier.COMPILE_AFTER_CALLS + 1):
        _attend(mods, q, k, v, options={"COMPILED": "auto"})
    choice = flexattn.explain_call(q, k, v, score_mod=mods.score_mod, enable_gqa=True,
                                   kernel_options={"COMPILED": "auto"}, print_it=False)
    assert choice.path.name == "generated_loop"
    assert "< MIN_COMPILED_SCORES" in dict(choice.skipped)["compiled_loop"]
    compiled.wait_all()
    assert compiled.STATS["graphs"] == graphs


def test_a_failed_compilation_warns_once_and_eager_keeps_serving(tmp_path, monkeypatch):
    """A missing C++ toolchain, as on a machine without one: the compiler process inherits the environment."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing built before
    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path / "flexattn"))
    mods = CASES["softcap"].build(L, S, HQ)
    mods.score_mod = lambda score, b, h, q_idx, kv_idx: score + 0.5 * torch.sin(score)  # a new structure
    expected = _values_and_grads(mods, "reference")
    with pytest.warns(RuntimeWarning, match="compiling the torch back end's kernel failed .*C\\+\\+ compiler"):
        first = _values_and_grads(mods, "torch", COMPILED)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _values_and_grads(mods, "torch", COMPILED)
    for a, b, c in zip(first, second, expected):
        torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(a, b)


def test_the_compiler_runs_in_a_child_process(tmp_path, monkeypatch):
    """dynamo and inductor never run in the caller's process (their configuration is process-global, and
    their Python work would hold the caller's GIL): compiling here fails, the child's compilation serves."""
    def in_this_process(fn, example_args, threads):
        raise AssertionError("compiled in the caller's process")

    monkeypatch.setattr(artefacts, "compile_tile", in_this_process)
    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path))  # nothing compiled on disk yet
    mods = CASES["softcap"].build(L, S, HQ)
    mods.score_mod = lambda score, b, h, q_idx, kv_idx: score - 0.25 * torch.cos(score)  # a new structure
    served, graphs, failures = (compiled.STATS[k] for k in ("served", "graphs", "failures"))
    out = _values_and_grads(mods, "torch", COMPILED)
    assert compiled.STATS["failures"] == failures and compiled.STATS["served"] == served + 1
    assert compiled.STATS["graphs"] == graphs + 3  # the child's compilations are counted here
    for a, b in zip(out, _values_and_grads(mods, "reference")):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    KERNELS.clear_memory()


def test_corrupt_or_stale_tile_source_on_disk_is_rebuilt_never_used(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path))
    graph = flexattn.trace_score_mod(lambda score, b, h, q_idx, kv_idx: score * torch.cos(score)).graph
    key = kernel_key(graph, None)
    expected = source.tile_source(graph, None)
    path = KERNELS.path("torch-compiled", key)
    for damage in ("corrupt", "stale"):
        KERNELS.clear_memory()
        monkeypatch.setattr(tier, "_entries", {})
        tier.entry(key, graph, None)
        text = path.read_text()
        if damage == "corrupt":
            path.write_text(text.replace("torch.cos", "torch.sin"))  # the checksum no longer matches
        else:
            path.write_text(text.replace(tier.GENERATOR_VERSION, "0" * 16))  # another generator's file
        KERNELS.clear_memory()
        monkeypatch.setattr(tier, "_entries", {})
        rejected = KERNELS.stats["rejected"]
        item = tier.entry(key, graph, None)
        assert KERNELS.stats["rejected"] == rejected + 1
        assert item.namespace["__source__"] == expected
        assert path.read_text().endswith(expected)
    KERNELS.clear_memory()


def test_corrupt_or_stale_compiled_functions_on_disk_are_rebuilt_never_used(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path))
    graph = flexattn.trace_score_mod(lambda score, b, h, q_idx, kv_idx: score * torch.cos(score)).graph
    item = tier.entry(kernel_key(graph, None), graph, None)
    sig = ("float32", "a test signature")
    x, row = torch.randn(2, 2, 3, 5), torch.randn(2, 2, 3)
    examples = lambda: {"update": (x, row, row + 1, row.abs())}  # noqa: E731 - the cheapest function to compile
    graphs = compiled.STATS["graphs"]
    tier.build(item, sig, examples)
    assert compiled.STATS["graphs"] == graphs + 1
    path = artefacts.artefact_path(item.key, sig)
    text = path.read_text()
    header, _, body = text.partition("\n")
    valid_but_broken = KERNELS.path("scratch", "broken", ".txt")
    KERNELS.write(valid_but_broken, tier.GENERATOR_VERSION, "bm90IGEgcGlja2xl")  # right checksum, not a pickle
    damages = {"corrupt": header + "\n" + body[:-8] + "AAAAAAA=",
               "stale": text.replace(tier.GENERATOR_VERSION, "0" * 16),
               "undeserialisable": valid_but_broken.read_text()}
    for damage, damaged in damages.items():
        path.write_text(damaged)
        rejected = KERNELS.stats["rejected"]
        assert artefacts.load(item.key, sig, tier.GENERATOR_VERSION, item.plain) is None, damage
        assert KERNELS.stats["rejected"] == rejected + 1, damage
    tier.build(item, sig, examples)  # rebuilt and rewritten
    assert compiled.STATS["graphs"] == graphs + 2
    functions = artefacts.load(item.key, sig, tier.GENERATOR_VERSION, item.plain)
    fallbacks = compiled.STATS["fallbacks"]
    with torch.no_grad():  # as the loop calls it
        torch.testing.assert_close(functions["update"](*examples()["update"]), loop.update(*examples()["update"]))
    assert compiled.STATS["fallbacks"] == fallbacks
    KERNELS.clear_memory()
