"""Smoke test of benchmarks/overhead.py: runs, exits 0, prints ratio rows (no timing checks)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


def test_overhead_quick_mlp_prints_ratios() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--models",
            "mlp",
            "--device",
            "cpu",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"torch {__import__('torch').__version__}" in out
    rows = [line for line in out.splitlines() if line.startswith("mlp ")]
    measures = " ".join(rows)
    assert "clip_grad_norm_" in measures and "bare step" in measures
    # every row carries a ratio "1.234x [p25-p75]" and a verdict
    assert rows and all(re.search(r"\d+\.\d{3}x \[\d+\.\d{3}-\d+\.\d{3}\]", r) for r in rows)
    assert "host-sync calls per step" in out
    assert "Traceback" not in result.stderr


def test_pipeline_overhead_quick_prints_three_pairs() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = SCRIPT.with_name("pipeline_overhead.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(port), str(script), "--quick"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if " ratio " in line]
    assert [row.split()[0] for row in rows] == ["check", "local", "all-reduce"]
    assert all(re.search(r"ratio \d+\.\d\dx \(IQR \d+\.\d\d-\d+\.\d\d\)", r) for r in rows)
    assert "all-reduce of 404" in result.stdout  # 2 stages, the loss and its count, 2 x 200 norms
