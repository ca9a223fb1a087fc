"""The ``flexattn demo`` command end to end, in a subprocess."""

import subprocess
import sys


def test_demo_prints_ir_block_mask_and_error():
    result = subprocess.run([sys.executable, "-m", "flexattn", "demo", "--size", "256"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "%2 = ge %0 %1 : bool" in out
    assert "BlockMask(shape=(1, 1, 256, 256)" in out and "██░░" in out
    error = float(out.rsplit("max |out - reference| = ", 1)[1].split()[0])
    assert error < 1e-4


def test_unknown_command_exits_2():
    result = subprocess.run([sys.executable, "-m", "flexattn", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr


MODS = '''
import torch
WINDOW = 64
def sliding(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOW)
def softcap(score, b, h, q_idx, kv_idx):
    return 30 * torch.tanh(score / 30)
def make_mask():
    return sliding
def three(b, h, q_idx):
    return q_idx > 0
def bad(b, h, q_idx, kv_idx):
    if q_idx > kv_idx:
        return True
    return False
'''


def _inspect(tmp_path, *args):
    path = tmp_path / "mods.py"
    path.write_text(MODS)
    args = [a.replace("MODS", str(path)) for a in args]
    return subprocess.run([sys.executable, "-m", "flexattn", "inspect", *args], capture_output=True, text=True,
                          timeout=120)


def test_inspect_mask_mod_prints_everything_and_writes_png(tmp_path):
    png = tmp_path / "mask.png"
    result = _inspect(tmp_path, "MODS:make_mask", "--q-len", "256", "--kv-len", "256", "--block-size", "32",
                      "--png", str(png))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "%2 = ge %0 %1 : bool" in out and "depends on: kv_idx, q_idx" in out
    assert "(q_idx >= kv_idx) & (-kv_idx + q_idx <= 64)" in out
    assert "decided symbolically" in out and "██░░" in out
    assert "def " in out.split("== generated torch source", 1)[1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_score_mod(tmp_path):
    result = _inspect(tmp_path, "MODS:softcap")
    assert result.returncode == 0, result.stderr
    assert "tanh" in result.stdout and "== generated torch source" in result.stdout


def test_inspect_errors_are_one_clear_line_with_exit_code_2(tmp_path):
    cases = {
        "/no/such/file.py:x": "no such file",
        "MODS:missing": "has no name 'missing'",
        "MODS:WINDOW": "is not callable",
        "MODS:three": "takes 3 arguments",
        "MODS:bad": "mods.py:13: Python control flow",
    }
    for target, message in cases.items():
        result = _inspect(tmp_path, target)
        assert result.returncode == 2, target
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    debug = _inspect(tmp_path, "MODS:bad", "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_inspect_plan_prints_the_chosen_path_and_the_reasons(tmp_path):
    result = _inspect(tmp_path, "MODS:softcap", "--plan", "--q-len", "64", "--kv-len", "64", "--head-dim", "16")
    assert result.returncode == 0, result.stderr
    plan = result.stdout.split("== plan for query (1, 1, 64, 16), key/value length 64", 1)[1]
    assert "backend torch: path generated_loop" in plan
    assert "skipped decode_chunks: Q_LEN=64 > 16: not a decoding shape" in plan
    assert "skipped fused_tiles: the score_mod is not a separable bias" in plan
    assert "== generated torch source" not in result.stdout
