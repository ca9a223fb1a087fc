"""The kernel cache: reuse across closures and processes, rebuild on structure change or corruption."""

import subprocess
import sys

import pytest
import torch

import flexattn
from codegen.cache import KERNELS, KernelCache
from codegen.torch_backend import GENERATOR_VERSION, compile_kernel, kernel_key


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty disk cache and an empty memory cache; counters reset."""
    monkeypatch.setenv("FLEXATTN_CACHE_DIR", str(tmp_path))
    KERNELS.clear_memory()
    before = dict(KERNELS.stats)
    KERNELS.stats.update(dict.fromkeys(before, 0))  # counts of this test only, whatever ran before
    yield tmp_path
    KERNELS.clear_memory()
    KERNELS.stats.update(before)


def _window(size):
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx <= size)


def _builds():
    return KERNELS.stats["builds"]


def test_same_structure_with_other_closure_values_reuses_the_kernel(fresh_cache):
    q = k = v = torch.randn(1, 2, 100, 8)
    outs = []
    for size in (3, 17, 60):
        bm = flexattn.create_block_mask(_window(size), None, None, 100, 100, BLOCK_SIZE=32)
        outs.append(flexattn.flex_attention(q, k, v, block_mask=bm, backend="torch",
                                            kernel_options={"FUSED": False}))  # the generated loop
        ref = flexattn.flex_attention(q, k, v, block_mask=bm, backend="reference")
        torch.testing.assert_close(outs[-1], ref, rtol=1e-5, atol=1e-5)
    assert _builds() == 1
    assert KERNELS.stats["memory_hits"] >= 2


def test_new_buffer_contents_and_lengths_reuse_the_kernel(fresh_cache):
    for n, seed in ((64, 0), (150, 1)):
        table = torch.randn(2, 2 * n, generator=torch.Generator().manual_seed(seed))
        q = k = v = torch.randn(3, 2, n, 8)
        flexattn.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + table[h, qi - kv + n],
                                backend="torch")
    assert _builds() == 1


def test_changed_structure_compiles_a_new_kernel(fresh_cache):
    q = k = v = torch.randn(1, 1, 40, 8)
    flexattn.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s + (qi - kv), backend="torch")
    flexattn.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, kv: s * (qi - kv), backend="torch")
    assert _builds() == 2


def test_disk_entry_is_used_after_memory_is_cleared(fresh_cache):
    graph = flexattn.trace_mask_mod(_window(5)).graph
    compile_kernel(None, graph)
    KERNELS.clear_memory()
    compile_kernel(None, graph)
    assert _builds() == 1 and KERNELS.stats["disk_hits"] == 1


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate", "stale_generator", "garbage"])
def test_corrupt_or_stale_disk_entry_is_rebuilt_not_used(fresh_cache, damage):
    graph = flexattn.trace_mask_mod(_window(5)).graph
    good = compile_kernel(None, graph).source
    path = KERNELS.path("torch", kernel_key(None, graph))
    text = path.read_text()
    if damage == "flip_a_byte":
        text = text.replace("def forward(", "def forwarX(")
    elif damage == "truncate":
        text = text[: len(text) // 2]
    elif damage == "stale_generator":
        text = text.replace(f"generator={GENERATOR_VERSION}", "generator=0000")
    else:
        text = "\x00garbage"
    path.write_text(text)
    KERNELS.clear_memory()
    rejected = KERNELS.stats["rejected"]
    kernel = compile_kernel(None, graph)
    assert kernel.source == good
    assert _builds() == 2 and KERNELS.stats["rejected"] == rejected + 1
    assert "def forward(" in path.read_text()  # rewritten


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    cache = KernelCache(tmp_path)
    cache.get("torch", "abc", "v1", build=lambda: "x = 1\n", load=lambda src, name: src)
    assert [p.name for p in (tmp_path / "torch").iterdir()] == ["abc.py"]


def test_unwritable_directory_warns_and_still_returns_the_kernel(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = KernelCache(blocker)
    with pytest.warns(RuntimeWarning, match="cannot write the kernel cache"):
        assert cache.get("torch", "abc", "v1", build=lambda: "x = 1\n", load=lambda src, name: src) == "x = 1\n"


def test_second_process_loads_from_disk_without_building(fresh_cache):
    script = (
        "import torch, flexattn\n"
        "from codegen.cache import KERNELS\n"
        "bm = flexattn.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 64, 64, BLOCK_SIZE=32)\n"
        "q = torch.randn(1, 1, 64, 8)\n"
        "flexattn.flex_attention(q, q, q, score_mod=lambda s, b, h, qi, kv: s - 0.1 * (qi - kv),"
        " block_mask=bm, backend='torch')\n"
        "print(KERNELS.stats['builds'], KERNELS.stats['disk_hits'])\n"
    )
    env_run = lambda: subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,  # noqa: E731
                                     check=True).stdout.split()
    assert env_run() == ["1", "0"]  # builds: 1, disk hits: 0
    assert env_run() == ["0", "1"]
