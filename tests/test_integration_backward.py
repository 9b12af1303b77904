"""gradwatch.integrations without a framework: imports stay lazy; and AfterBackward.

AfterBackward, the hook the transformers integration checks from, must run once per backward
pass, after every gradient has landed (also under reentrant activation checkpointing, whose
recomputation runs nested backward passes) and, under DDP, after the all-reduce: the gradients it
sees are the final, synchronised ones.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradwatch.integrations import AfterBackward


def test_importing_gradwatch_imports_no_framework() -> None:
    code = (
        "import sys, gradwatch, gradwatch.integrations; "
        "heavy = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def _norm(model: nn.Module) -> float:
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()


def test_runs_once_per_backward_when_every_gradient_has_landed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    seen: list[float] = []
    hook = AfterBackward(model.parameters(), lambda: seen.append(_norm(model)))
    finals = []
    for _ in range(3):  # accumulation: each pass adds to .grad
        model(torch.randn(5, 4)).pow(2).mean().backward()
        finals.append(_norm(model))
    assert seen == finals
    hook.remove()
    model(torch.randn(5, 4)).sum().backward()
    assert len(seen) == 3


def test_nested_backward_of_reentrant_checkpointing_is_ignored() -> None:
    torch.manual_seed(0)
    body, head = nn.Linear(4, 8), nn.Linear(8, 1)
    params = [*body.parameters(), *head.parameters()]
    seen: list[float] = []

    def record() -> None:
        seen.append(torch.nn.utils.get_total_norm([p.grad for p in params]).item())

    AfterBackward(params, record)
    x = torch.randn(5, 4, requires_grad=True)
    hidden = checkpoint(body, x, use_reentrant=True)  # recomputed in a nested backward
    head(torch.tanh(hidden)).pow(2).mean().backward()
    # Once, at the end of the outer pass, with the checkpointed layer's gradients in.
    assert seen == [torch.nn.utils.get_total_norm([p.grad for p in params]).item()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)  # several buckets
    seen: list[float] = []
    AfterBackward(model.parameters(), lambda: seen.append(_norm(model)))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(rank))  # different per rank
    ddp(x).pow(2).mean().backward()
    result = {"seen": seen, "after": _norm(model)}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_runs_after_ddp_all_reduce(tmp_path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["seen"] == [result["after"]]  # ran once, on the final gradients
    assert ranks[0]["seen"] == ranks[1]["seen"]  # the all-reduced ones: equal on both ranks
