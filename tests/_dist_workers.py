"""Worker processes for tests/test_distributed.py (spawned with the gloo backend on CPU)."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import gradwatch as gw


class ListSink(gw.Sink):
    def __init__(self) -> None:
        self.records: list[object] = []

    def write(self, record) -> None:
        self.records.append(record)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(100 * step + rank))


def _reference_norms(model: nn.Module, step: int, world: int) -> dict[str, float]:
    """Single-process gradients of the mean loss over every rank's batch."""
    model.zero_grad()
    x = torch.cat([_batch(step, r) for r in range(world)])
    model(x).pow(2).mean().backward()
    norms = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    norms["__global__"] = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    return norms


def _setup(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _setup(rank, world, port)
    model = _model()
    reference = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    sink = ListSink()
    watch = gw.GradWatch(ddp, on_nonfinite="skip", rank_blame=True, sinks=[sink]).attach(opt)
    result: dict[str, object] = {"names": list(watch.names)}
    poison = model[2].weight.register_hook(
        lambda g: g * math.nan if rank == 1 and watch.step == 2 else g
    )
    for step in range(4):
        expected = _reference_norms(reference, step, world)
        opt.zero_grad()
        ddp(_batch(step, rank)).pow(2).mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        report = watch.history[-1]
        if step != 2:
            result[f"step{step}"] = {
                "global": report.global_norm,
                "expected": expected["__global__"],
                "max_param_err": max(
                    abs(report.param_norms[n] - expected[n]) / expected[n]
                    for n in report.param_norms
                ),
            }
            with torch.no_grad():  # keep the reference in lock-step with the trained model
                for p, q in zip(reference.parameters(), model.parameters()):
                    p.copy_(q)
        else:
            result["skip"] = {
                "skipped": report.skipped,
                "nonfinite_ranks": list(report.nonfinite_ranks),
                "first": report.nonfinite[0] if report.nonfinite else None,
                "unchanged": all(torch.equal(a, b) for a, b in zip(before, model.parameters())),
            }
    poison.remove()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    result["replicas_equal"] = all(torch.equal(gathered[0], g) for g in gathered)
    summary = watch.close()
    result["records"] = len(sink.records)
    result["summary_steps"] = summary.steps
    Path(out_dir, f"ddp{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def fsdp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    _setup(rank, world, port)

    def sharded() -> nn.Sequential:
        model = _model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model

    reference = _model()
    expected = _reference_norms(reference, 0, world)
    watched, torch_clipped = sharded(), sharded()
    watch = gw.GradWatch(watched, clip=gw.ClipNorm(0.05), sinks=[])
    for model in (watched, torch_clipped):
        model(_batch(0, rank)).pow(2).mean().backward()
    report = watch.check()
    total = torch.nn.utils.clip_grad_norm_(torch_clipped.parameters(), 0.05)
    result = {
        "names": list(watch.names),
        "expected_names": [n for n, _ in reference.named_parameters()],
        "global": report.global_norm,
        "expected": expected["__global__"],
        "torch_total": total.full_tensor().item(),
        "max_param_err": max(
            abs(report.param_norms[n] - expected[n]) / expected[n] for n in report.param_norms
        ),
        "clip_coef": report.clip_coef,
        "grads_equal_torch": all(
            torch.allclose(a.grad.to_local(), b.grad.to_local(), rtol=1e-6, atol=1e-9)
            for a, b in zip(watched.parameters(), torch_clipped.parameters())
        ),
    }
    watch.close()
    Path(out_dir, f"fsdp{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
