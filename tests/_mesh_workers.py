"""The 4-process launch behind tests/test_meshes.py and tests/test_examples.py.

One ``torchrun --nproc-per-node 4`` of this file runs, in one gloo process group, HSDP, FSDP2 +
TP and pipeline-parallel scenarios (one JSON result per rank, every number to be compared
with one process running the whole model on the same batches), then trains each 4-process
example of examples/ for a few steps through its ``train(steps)``. Process start-up and the
torch/DTensor imports dominate the cost, so they are paid once per test session
(:func:`launch`), not once per scenario or example.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_sync import count_host_reads  # tests/ is this script's folder
from torch import nn

import gradwatch as gw

WORLD = 4
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCALE_OUT_EXAMPLES = ("hsdp.py", "fsdp2_tp.py", "pipeline.py")  # run here, on 4 processes
EXAMPLE_STEPS = 3


def _batch(step: int, rank: int, width: int = 6) -> torch.Tensor:
    return torch.randn(8, width, generator=torch.Generator().manual_seed(100 * step + rank))


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )


def _reference(model: nn.Module, x: torch.Tensor, max_norm: float) -> dict[str, object]:
    """One process: norms of the mean loss over ``x``, and the gradients clip_grad_norm_ leaves."""
    model.zero_grad()
    model(x).pow(2).mean().backward()
    norms = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    clipped = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"norms": norms, "global": total, "clipped": clipped}


class _Warnings(logging.Handler):
    """Collects log records and warnings mentioning sequential collectives."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "sequential" in record.getMessage():
            self.messages.append(record.getMessage())


_HANDLER = _Warnings()


def _checked(watch: gw.GradWatch) -> dict[str, object]:
    """One check() under CommDebugMode and the host-read counter: the step's cost."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm, count_host_reads() as reads:
        report = watch.check()
    counts = {str(op): n for op, n in comm.get_comm_counts().items()}
    return {"report": report, "collectives": counts, "reads": sum(reads.values())}


def _err(got: dict[str, float], expected: dict[str, float]) -> float:
    return max(abs(got[n] - expected[n]) / expected[n] for n in expected)


def _steady(watch: gw.GradWatch, model: nn.Module, x: torch.Tensor) -> dict[str, object]:
    """The second check of ``watch`` on the gradients of ``x``, measured by :func:`_checked`.

    The first check also samples the weight norms (every 256 checks); the second is a step like
    all the others. DTensor warns about sequential collectives once per mesh: its record of
    warnings is emptied so the measured step would warn again.
    """
    from torch.distributed.tensor import _redistribute

    for _ in range(2):
        model.zero_grad()
        model(x).pow(2).mean().backward()
        if watch.step == 1:
            _redistribute._warned_flatten_issues.clear()
            seen = len(_HANDLER.messages)
            step = _checked(watch)
            step["warnings"] = _HANDLER.messages[seen:]
            return step
        watch.check()
    raise AssertionError("unreachable")


def _sharded_result(watch, model, expected, max_norm, batch_fn) -> dict[str, object]:
    """Norms, clipping and cost of a steady step."""
    step = _steady(watch, model, batch_fn())
    report = step["report"]
    names = list(watch.names)
    clipped_err = max(
        (p.grad.full_tensor() - expected["clipped"][n]).abs().max().item()
        for n, p in model.named_parameters()
    )
    return {
        "names": names,
        "expected_names": list(expected["norms"]),
        "global": report.global_norm,
        "expected": expected["global"],
        "param_err": _err(report.param_norms, expected["norms"]),
        "clip_coef": report.clip_coef,
        "expected_coef": min(1.0, max_norm / (expected["global"] + 1e-6)),
        "clipped_err": clipped_err,
        "collectives": step["collectives"],
        "reads": step["reads"],
        "warnings": step["warnings"],
    }


def _hsdp(rank: int) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    max_norm = 0.05
    expected = _reference(_mlp(), torch.cat([_batch(0, r) for r in range(WORLD)]), max_norm)
    model = _mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(max_norm), sinks=[])
    result = _sharded_result(watch, model, expected, max_norm, lambda: _batch(0, rank))
    result["placements"] = str(next(model.parameters()).placements)
    watch.close()
    return result


def _tp(rank: int) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh["dp"].get_local_rank()
    max_norm = 0.05
    expected = _reference(_mlp(), torch.cat([_batch(0, r) for r in range(2)]), max_norm)
    model = _mlp()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    for layer in model:  # layer "4" stays out of TP: FSDP2 on mesh["dp"] only
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    results = {}
    for norm_type in (2.0, math.inf, 3.0):
        watch = gw.GradWatch(model, clip=gw.ClipNorm(1e6, norm_type=norm_type), sinks=[])
        step = _steady(watch, model, _batch(0, dp_rank))
        results[str(norm_type)] = {
            "global": step["report"].global_norm,
            "collectives": step["collectives"],
            "warnings": step["warnings"],
        }
        watch.close()
    reference = _mlp()
    reference(torch.cat([_batch(0, r) for r in range(2)])).pow(2).mean().backward()
    grads = [p.grad for p in reference.parameters()]
    model.zero_grad()
    watch = gw.GradWatch(model, clip=gw.ClipNorm(max_norm), sinks=[])
    result = _sharded_result(watch, model, expected, max_norm, lambda: _batch(0, dp_rank))
    result["norm_types"] = results
    result["expected_norm_types"] = {
        str(p): torch.nn.utils.get_total_norm(grads, norm_type=p).item()
        for p in (2.0, math.inf, 3.0)
    }
    result["placements"] = {n: str(p.placements) for n, p in model.named_parameters()}
    watch.close()
    from torch.distributed.tensor import _redistribute
    from torch.distributed.tensor.debug import CommDebugMode

    from gradwatch.collect.meshes import full_l2_norms

    _redistribute._warned_flatten_issues.clear()
    seen = len(_HANDLER.messages)
    with CommDebugMode() as comm:  # weight norms of the sharded model (sampled by forensics)
        weights = full_l2_norms(list(model.parameters())).tolist()
    result["weight_norm_err"] = max(
        abs(w - q.detach().norm().item()) / q.detach().norm().item()
        for w, q in zip(weights, _mlp().parameters())
    )
    result["weight_collectives"] = {str(op): n for op, n in comm.get_comm_counts().items()}
    result["weight_warnings"] = _HANDLER.messages[seen:]
    seen = len(_HANDLER.messages)
    # DTensor's own way (torch's get_total_norm refuses the mix of a 2-D and a 1-D mesh).
    torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.device_mesh.ndim == 2])
    result["control_warnings"] = _HANDLER.messages[seen:]
    return result


class _Stack(nn.Module):
    """Four layers under their model-wide names; a stage keeps some of them (torchtitan's way)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        widths = [6, 8, 8, 8, 1]
        self.layers = nn.ModuleDict({str(i): nn.Linear(widths[i], widths[i + 1]) for i in range(4)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, layer in self.layers.items():
            x = layer(x)
            if name != "3":
                x = torch.tanh(x)
        return x


def _stage_model(stage: int) -> _Stack:
    model = _Stack()
    for name in [n for n in model.layers if n != str(stage)]:
        del model.layers[name]
    return model


def _pipeline(rank: int) -> dict[str, object]:
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    max_norm = 0.05
    micro = 2
    steps = 5  # step 1: a NaN in stage 2's weight; step 3: one from stage 3 reaching every stage

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (output - target).pow(2).mean()

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _batch(step, 0), _batch(step, 1, width=1)

    stage_model = _stage_model(rank)
    stage = PipelineStage(stage_model, rank, WORLD, torch.device("cpu"))
    schedule = ScheduleGPipe(stage, n_microbatches=micro, loss_fn=loss_fn)
    opt = torch.optim.SGD(stage_model.parameters(), lr=0.1)
    log = Path(_OUT["dir"], "pipeline.jsonl")
    watch = gw.GradWatch(
        stage_model,
        clip=gw.ClipNorm(max_norm),
        on_nonfinite="skip",
        sinks=[gw.JsonlSink(log)] if rank == 0 else [],  # rank 0 (log_rank) reports every stage
        pipeline_group=dist.group.WORLD,
    )  # checked explicitly: the last stage hands over the loss the schedule computed
    reference = _Stack()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    layer = stage_model.layers[str(rank)]
    poison = layer.weight.register_hook(
        lambda g: g * math.nan if rank == 2 and watch.step == 1 else g
    )

    def poison_output(module: nn.Module, args: object, output: torch.Tensor) -> None:
        if rank == WORLD - 1 and watch.step == 3:
            output.register_hook(lambda g: g * math.nan)  # flows back through every stage

    spread = layer.register_forward_hook(poison_output)
    out: dict[str, object] = {"names": list(watch.names), "steps": []}
    for step in range(steps):
        x, y = data(step)
        opt.zero_grad()
        before = [p.detach().clone() for p in stage_model.parameters()]
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(x)
        elif rank == WORLD - 1:
            schedule.step(target=y, losses=losses)
        else:
            schedule.step()
        report = watch.check(torch.stack(losses).mean() if losses else None)
        opt.step()  # a skipped step changes nothing: check() hid the gradients
        # The single process on the same micro-batches (mean of the micro-batch losses).
        ref_opt.zero_grad()
        reference_loss = 0.0
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            loss = loss_fn(reference(xs), ys) / micro
            loss.backward()
            reference_loss += loss.item()
        expected_global = torch.nn.utils.get_total_norm(
            [p.grad for p in reference.parameters()]
        ).item()
        expected = {n: p.grad.norm().item() for n, p in reference.named_parameters()}
        own = {n: expected[n] for n in watch.names}
        entry = {
            "loss": report.loss,
            "expected_loss": reference_loss,
            "reported": dict(report.param_norms.items()),
            "expected_all": expected,
            "spike_params": list(report.spike_params),
            "global": report.global_norm,
            "expected": expected_global,
            "skipped": report.skipped,
            "nonfinite_ranks": list(report.nonfinite_ranks),
            "nonfinite": list(report.nonfinite),
            "unchanged": all(torch.equal(a, b) for a, b in zip(before, stage_model.parameters())),
            "clip_coef": report.clip_coef,
        }
        if step in (0, 2, 4):
            entry["param_err"] = _err(report.param_norms, own)
            torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
            ref_opt.step()
            entry["weights_err"] = max(
                (p - dict(reference.named_parameters())[n]).abs().max().item()
                for n, p in stage_model.named_parameters()
            )
        out["steps"].append(entry)
    poison.remove()
    spread.remove()
    out["log"] = str(log)
    # Stages built as separate modules share their names ("weight"): reported with a stage prefix.
    layer = nn.Linear(2, 2)
    separate = gw.GradWatch(layer, sinks=[], pipeline_group=dist.group.WORLD)
    layer(torch.ones(1, 2)).sum().backward()
    out["separate_names"] = list(separate.check().param_norms.names)
    out["separate_own"] = list(separate.names)
    separate.close()
    # The step's cost: one check of the stage's gradients (no policy needing a decision).
    monitor = gw.GradWatch(stage_model, sinks=[], pipeline_group=dist.group.WORLD)
    monitor.check()  # the first check also samples the weight norms
    steady = _checked(monitor)
    out["collectives"], out["reads"] = steady["collectives"], steady["reads"]
    monitor.close()
    decision = _checked(watch)
    out["decision_collectives"] = decision["collectives"]
    out["decision_reads"] = decision["reads"]
    watch.close()
    return out


def _pipeline_fsdp(rank: int) -> dict[str, object]:
    """2 stages x 2 FSDP ranks: each stage's layers sharded over its ``dp`` slice."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage_index, dp = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    micro, max_norm = 2, 0.05

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (output - target).pow(2).mean()

    model = _Stack()
    for name in [n for n in model.layers if int(n) // 2 != stage_index]:
        del model.layers[name]
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    stage = PipelineStage(model, stage_index, 2, torch.device("cpu"), group=mesh["pp"].get_group())
    schedule = ScheduleGPipe(stage, n_microbatches=micro, loss_fn=loss_fn)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(max_norm), sinks=[], pipeline_group=mesh["pp"])
    from torch.distributed.tensor.debug import CommDebugMode

    out: dict[str, object] = {"names": list(watch.names)}
    for step in range(2):
        x, y = _batch(step, dp), _batch(step, 10 + dp, width=1)
        model.zero_grad()
        if stage_index == 0:
            schedule.step(x)
        else:
            schedule.step(target=y)
        with CommDebugMode() as comm:
            report = watch.check()
        out["collectives"] = {str(op): n for op, n in comm.get_comm_counts().items()}
    reference = _Stack()
    for d in range(2):  # mean over the dp replicas of the mean over micro-batches
        x, y = _batch(1, d), _batch(1, 10 + d, width=1)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (loss_fn(reference(xs), ys) / (micro * 2)).backward()
    grads = [p.grad for p in reference.parameters()]
    out["global"] = report.global_norm
    out["expected"] = torch.nn.utils.get_total_norm(grads).item()
    expected = {n: p.grad.norm().item() for n, p in reference.named_parameters()}
    out["param_err"] = _err(report.param_norms, {n: expected[n] for n in watch.names})
    out["clip_coef"] = report.clip_coef
    out["expected_coef"] = min(1.0, max_norm / (out["expected"] + 1e-6))
    watch.close()
    return out


def _examples() -> None:
    for script in SCALE_OUT_EXAMPLES:
        spec = importlib.util.spec_from_file_location(Path(script).stem, EXAMPLES / script)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        module.train(EXAMPLE_STEPS)
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"example {script}: done", flush=True)


_OUT: dict[str, str] = {}


def main(out_dir: str) -> None:
    """One process of the launch (under torchrun)."""
    _OUT["dir"] = out_dir
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logging.getLogger("torch.distributed.tensor._redistribute").addHandler(_HANDLER)
    result: dict[str, object] = {}
    scenarios = (
        ("hsdp", _hsdp),
        ("tp", _tp),
        ("pipeline", _pipeline),
        ("pipeline_fsdp", _pipeline_fsdp),
    )
    for name, scenario in scenarios:
        result[name] = scenario(rank)
        dist.barrier()
    Path(out_dir, f"mesh{rank}.json").write_text(json.dumps(result))
    _examples()
    dist.destroy_process_group()


_LAUNCHED: dict[str, object] = {}


def launch(out_dir: Path) -> tuple[list[dict], str]:
    """``(per-rank scenario results, the launch's stdout)``: launched once per test session."""
    if not _LAUNCHED:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(WORLD),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            __file__,
            str(out_dir),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
        _LAUNCHED.update(done=done, out_dir=out_dir)
    done: subprocess.CompletedProcess = _LAUNCHED["done"]  # type: ignore[assignment]
    assert done.returncode == 0, done.stderr[-4000:]
    out = Path(_LAUNCHED["out_dir"])  # type: ignore[arg-type]
    ranks = [json.loads((out / f"mesh{r}.json").read_text()) for r in range(WORLD)]
    return ranks, done.stdout


if __name__ == "__main__":
    main(sys.argv[1])
