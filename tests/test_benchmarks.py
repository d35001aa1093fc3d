"""The benchmark scripts run in --quick mode and write well-formed tables (numbers not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, extra",
    [
        ("qp.py", []),
        ("k_scaling.py", ["--random-backbone"]),
        ("memory.py", ["--random-backbone"]),
        ("step_time.py", []),
        ("quality.py", []),
        ("merged_lora.py", []),
        ("toy_unet_cost.py", ["--widths", "32,64,128", "16,32,64"]),
    ],
)
def test_benchmark_quick(script: str, extra: list[str], tmp_path: Path) -> None:
    out = tmp_path / "result"
    args = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *extra]
    if script != "qp.py":
        args += ["--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    blocks: list[list[str]] = [[]]
    for line in proc.stdout.splitlines():
        if line.startswith("|"):
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    blocks = [b for b in blocks if b]
    assert blocks, proc.stdout[-2000:]
    for block in blocks:
        assert len(block) >= 3, block  # header, separator, at least one row
        assert set(block[1].replace("|", "").replace(":", "").strip()) <= {"-", " "}, block[1]
        widths = {line.count("|") for line in block}
        assert len(widths) == 1, f"ragged markdown table: {block}"
    assert "torch=" in proc.stdout or "torch " in proc.stdout  # the environment is recorded
