"""benchmarks/gpu_check.py --dry-run: the GPU check's code path end to end on CPU (tiny sizes, Triton
interpreted), so the script a GPU session runs once does not break unnoticed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton back end cannot run")

ROOT = Path(__file__).parents[1]
# (kind, mod, layout, D, S / KV_LEN, pass): every mod, pass and layout once (gpu_check_rows.DRY)
EXPECTED = [("train", "causal", "-", "16", "128", "fwd"), ("train", "causal+alibi", "-", "16", "128", "fwd+bwd"),
            ("train", "sliding window", "-", "16", "128", "fwd"),
            ("train", "packed documents", "-", "16", "128", "fwd"),
            ("train", "causal+softcap", "-", "16", "128", "fwd+bwd"),
            ("decode", "causal-offset", "contiguous", "16", "256", "fwd"),
            ("decode", "sliding window", "paged", "16", "256", "fwd")]


def dry_run(tmp_path, *args) -> tuple[str, list[dict]]:
    """The table file's text and its rows (column -> cell)."""
    table = tmp_path / "table.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", str(table), *args],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    text = table.read_text()
    lines = [line for line in text.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return text, rows


def numbers(cell: str) -> list[float]:
    return [float(x) for x in cell.split()]


def test_dry_run_writes_every_row_with_small_errors_and_positive_throughput(tmp_path):
    text, rows = dry_run(tmp_path)
    assert "torch 2.13" in text and "Triton" in text and "GPU: none (CPU dry run)" in text
    assert "\ntotal " in text
    assert [tuple(r[c] for c in ("kind", "mod", "layout", "D", "S / KV_LEN", "pass")) for r in rows] == EXPECTED
    for row in rows:
        assert row["note"] == "", row
        n = 4 if row["pass"] == "fwd+bwd" else 1  # out, then dq dk dv
        fp32, bf16 = numbers(row["fp32 vs reference (out dq dk dv)"]), numbers(row["bf16 vs torch flex (out dq dk dv)"])
        assert len(fp32) == len(bf16) == n
        assert max(fp32) < 1e-5, row
        # bf16 (the interpreter truncates fp32 -> bf16 where a GPU rounds; see test_triton_backend.py)
        assert max(bf16) < 2e-2, row
        assert all(float(row[c]) > 0 for c in ("flexattn ms", "flexattn TFLOP/s", "torch flex TFLOP/s",
                                                "flexattn / torch")), row
        sdpa = row["SDPA TFLOP/s"]
        if row["kind"] == "decode" or row["mod"] == "causal":
            assert float(sdpa) > 0
        else:
            assert sdpa == "n/a"
        assert row["flexattn % peak"] == row["torch % peak"] == "n/a"  # no GPU, no peak


def test_rows_over_their_time_limit_are_reported_and_the_run_goes_on(tmp_path):
    _, rows = dry_run(tmp_path, "--row-limit", "0.001", "--only", "decode")
    assert [r["mod"] for r in rows] == ["causal-offset", "sliding window"]
    assert all("RowTimeout" in r["note"] and r["flexattn TFLOP/s"] == "" for r in rows)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_is_looked_up_by_the_most_specific_gpu_name(name, peak, monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu_check.peak_tflops(torch.device("cuda")) == peak
    assert gpu_check.peak_tflops(torch.device("cpu")) is None


def test_gpu_rows_are_the_issues(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check_rows as rows

    gpu = rows.rows(rows.GPU)
    train = {(r.mod, r.D, r.S, r.backward) for r in gpu if r.kind == "train"}
    decode = {(r.mod, r.layout, r.D, r.S) for r in gpu if r.kind == "decode"}
    assert len(gpu) == len(train) + len(decode) == 60 + 24
    assert {m for m, *_ in train} == {"causal", "causal+alibi", "sliding window", "packed documents", "causal+softcap"}
    assert {(d, s) for _, d, s, _ in train} == {(d, s) for d in (64, 128) for s in (1024, 4096, 16384)}
    assert {(m, lay) for m, lay, *_ in decode} == {(m, lay) for m in ("causal-offset", "sliding window")
                                                   for lay in ("contiguous", "paged")}
    assert {s for *_, s in decode} == {4096, 16384, 32768}
    assert (rows.GPU.B, rows.GPU.H, rows.GPU.H // rows.GPU.H_KV, rows.GPU.window) == (4, 16, 4, 1024)
