"""DDP and FSDP2 on CPU with the gloo backend: real processes, numbers compared to one process."""

from __future__ import annotations

import json
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker_name: str, tmp_path) -> list[dict]:
    import _dist_workers

    worker = getattr(_dist_workers, worker_name)
    mp.spawn(worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    prefix = worker_name.split("_")[0]
    return [json.loads((tmp_path / f"{prefix}{r}.json").read_text()) for r in range(WORLD)]


def test_ddp_synchronised_norms_rank_blame_and_consistent_skip(tmp_path) -> None:
    ranks = _spawn("ddp_worker", tmp_path)
    for rank, result in enumerate(ranks):
        assert result["names"][0] == "0.weight"  # DDP's "module." prefix is not in the names
        for step in ("step0", "step1", "step3"):
            got = result[step]
            # Norms of the synchronised (averaged) gradients = one process on the full batch.
            assert got["global"] == pytest.approx(got["expected"], rel=1e-5), (rank, step)
            assert got["max_param_err"] < 1e-5
            assert got["global"] == ranks[0][step]["global"]  # identical on every rank
        skip = result["skip"]
        # NaN produced on rank 1 only, before the all-reduce: every rank skips, rank 1 is named.
        assert skip["skipped"] and skip["unchanged"]
        assert skip["nonfinite_ranks"] == [1]
        assert skip["first"] == "2.weight"
        assert result["replicas_equal"]
        assert result["summary_steps"] == 4
    assert ranks[0]["records"] > 4  # rank 0 reports ...
    assert ranks[1]["records"] == 0  # ... the others stay quiet


def test_fsdp2_full_norms_and_clipping_match(tmp_path) -> None:
    ranks = _spawn("fsdp_worker", tmp_path)
    for result in ranks:
        assert result["names"] == result["expected_names"]  # original names
        assert result["global"] == pytest.approx(result["expected"], rel=1e-5)
        assert result["global"] == pytest.approx(result["torch_total"], rel=1e-6)
        assert result["max_param_err"] < 1e-5
        assert result["clip_coef"] < 1.0
        assert result["grads_equal_torch"]
    assert ranks[0]["global"] == ranks[1]["global"]
