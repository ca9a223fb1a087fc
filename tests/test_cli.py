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
