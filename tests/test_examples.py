"""Every script under examples/ runs for a few steps (distributed ones under torchrun).

The 4-process scale-out examples (HSDP, FSDP2 + TP, pipeline) run in the one torchrun launch
of tests/_mesh_workers.py that test_meshes.py shares: each of its processes imports torch
once and trains each example in turn through the example's ``train(steps)``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _mesh_workers import EXAMPLE_STEPS, SCALE_OUT_EXAMPLES, launch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Scripts run under torchrun, with their number of processes.
DISTRIBUTED = {"ddp.py": 2, "fsdp2.py": 2, "hsdp.py": 4, "fsdp2_tp.py": 4, "pipeline.py": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "script", sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in SCALE_OUT_EXAMPLES)
)
def test_example_runs(script: str) -> None:
    command = [sys.executable, str(EXAMPLES / script), "--steps", "3"]
    if script in DISTRIBUTED:
        command[1:1] = [
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(DISTRIBUTED[script]),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gradwatch summary: 3 steps" in done.stdout


def test_scale_out_examples_run_on_four_processes(tmp_path_factory) -> None:
    assert {DISTRIBUTED[s] for s in SCALE_OUT_EXAMPLES} == {4}
    stdout = launch(tmp_path_factory.mktemp("meshes"))[1]
    for script in SCALE_OUT_EXAMPLES:
        assert f"example {script}: done" in stdout, stdout[-3000:]
    # Rank 0 reports each example; under pipeline parallelism with every stage's layers.
    assert stdout.count(f"gradwatch summary: {EXAMPLE_STEPS} steps") == 3
    pipeline = stdout[stdout.index("example fsdp2_tp.py: done") :]
    assert all(f"layers.{i}" in pipeline for i in range(8)), pipeline[-3000:]
    assert "global norm over 4 stages" in stdout
