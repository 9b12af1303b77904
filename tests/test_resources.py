"""Resource bounds: memory flat over many steps, nothing kept alive, clean close/GC/exit.

The fast test runs 7500 steps (the machine is shared); the 100k-step soak (RSS per 10k steps)
is ``benchmarks/soak.py``, run by :func:`test_soak_100k_steps_memory_flat` under ``-m slow``.
"""

from __future__ import annotations

import gc
import io
import math
import os
import subprocess
import sys
import tracemalloc
import weakref
from pathlib import Path

import pytest
import torch
from conftest import mlp
from rich.console import Console
from torch import nn

import gradwatch as gw
from gradwatch.report.jsonl import JsonlSink

ROOT = Path(__file__).resolve().parents[1]


def _hooks(model: nn.Module) -> int:
    """Hooks gradwatch can leave behind: on parameters (both kinds) and on modules."""
    count = 0
    for p in model.parameters():
        count += len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
    for m in model.modules():
        count += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    return count


def _live() -> tuple[int, int]:
    """(objects tracked by the garbage collector, live tensors) after a full collection."""
    gc.collect()
    objects = gc.get_objects()
    return len(objects), sum(1 for o in objects if issubclass(type(o), torch.Tensor))


def test_memory_flat_over_7500_steps(tmp_path: Path) -> None:
    """Every bounded buffer fills during warm-up (history 256, the stats ring, 100 NaN origins,
    the health detector's 200 spikes and origins); after that, no Python object, tensor or byte
    is added per step."""
    model = mlp(depth=2, width=8)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    base = [g.clone() for g in grads]
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
    watch = gw.GradWatch(
        model,
        clip=gw.ClipNorm(1.0),
        sinks=[
            JsonlSink(tmp_path / "run.jsonl", every=100),
            gw.ConsoleSink(every=1000, console=Console(file=devnull)),
        ],
    )

    def run(start: int, stop: int) -> None:
        for step in range(start, stop):
            torch._foreach_copy_(grads, base)
            torch._foreach_mul_(grads, 1.0 + 0.1 * math.sin(step))
            if step % 7 == 0:
                grads[0][0, 0] = math.nan  # NaN origins fill up
            elif step % 9 == 0:
                grads[2].mul_(50.0)  # spikes fill up
            watch.check()

    run(0, 2500)
    objects, tensors = _live()
    run(2500, 6000)
    tracemalloc.start()
    try:
        run(6000, 6300)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        run(6300, 7500)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    objects_after, tensors_after = _live()
    summary = watch.close()
    devnull.close()
    assert summary.steps == 7500 and summary.nonfinite_steps == 1072 and summary.spikes > 200
    assert len(watch.history) == 256 and len(summary.nonfinite_origins) == 100
    # Fluctuations come from the batch of pending steps (<= 32) and the history's turnover;
    # a leak of one object per step would add 3500 objects, of one report per step ~150 kB.
    assert objects_after - objects < 500, (objects, objects_after)
    assert tensors_after - tensors <= 2, (tensors, tensors_after)
    assert grown < 48 * 1024, f"{grown} bytes over 1200 steps"


@pytest.mark.slow
def test_soak_100k_steps_memory_flat() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--max-growth-kib", "1024"],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "after warm-up: RSS growth per 10k steps" in result.stdout
    assert "run: 100000 steps" in result.stdout


def test_no_gradient_activation_or_graph_kept_alive() -> None:
    model = mlp(depth=3, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, sinks=[], track_micro_batches=True, forensics=True).attach(opt)
    refs: list[weakref.ref] = []

    def keep_ref(module, args, output):
        refs.append(weakref.ref(output))  # tanh/relu outputs are saved by the graph

    handles = [m.register_forward_hook(keep_ref) for m in model]
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        out = model(torch.randn(16, 8))
        loss = out.pow(2).mean()
        refs += [weakref.ref(out), weakref.ref(loss)]
        with watch.backward(loss=loss):
            loss.backward()
        refs += [weakref.ref(p.grad) for p in model.parameters()]
        opt.step()
        del out, loss
    # A forward whose graph is never backpropagated, its loss handed to check() only.
    out = model(torch.randn(16, 8))
    loss = out.pow(2).mean()
    refs += [weakref.ref(out), weakref.ref(loss)]
    watch.check(loss=loss)
    del out, loss
    opt.zero_grad(set_to_none=True)
    for handle in handles:
        handle.remove()
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{len(alive)} of {len(refs)} tensors kept alive while the watch is open"
    assert len(watch.history) == 4
    watch.close()


def _drop_watch(**kwargs) -> tuple[nn.Module, int]:
    model = mlp(depth=2)
    bare = _hooks(model)
    watch = gw.GradWatch(model, sinks=[], **kwargs)
    assert _hooks(model) > bare
    for _ in range(3):
        model.zero_grad()
        with watch.backward():
            model(torch.randn(4, 8)).sum().backward()
    ref = weakref.ref(watch)
    del watch
    gc.collect()
    assert ref() is None
    return model, bare


def test_dropped_watch_is_collected_and_removes_its_hooks() -> None:
    model, bare = _drop_watch(forensics=True)
    assert _hooks(model) == bare
    model(torch.randn(4, 8)).sum().backward()  # the model trains on without gradwatch


def test_dropped_watch_removes_micro_batch_hooks() -> None:
    model, bare = _drop_watch(track_micro_batches=True)
    for _ in range(10):
        model(torch.randn(4, 8)).sum().backward()
    assert _hooks(model) == bare


def test_closed_watch_keeps_nothing_alive() -> None:
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, sinks=[], forensics=True).attach(opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    watch.close()
    assert _hooks(model) == 0 and "step" not in vars(opt)
    refs = [weakref.ref(model), weakref.ref(opt), weakref.ref(watch)]
    del model, opt, watch
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_close_is_idempotent(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    out = io.StringIO()
    model = mlp(depth=2)
    sinks = [JsonlSink(log), gw.ConsoleSink(console=Console(file=out, width=120))]
    with gw.GradWatch(model, sinks=sinks) as watch:
        model(torch.randn(4, 8)).sum().backward()
        watch.check()
        first = watch.close()
    assert watch.close() is first and watch.closed  # the with-block closed it a second time
    assert watch.close() is first
    assert out.getvalue().count("gradwatch summary: 1 steps") == 1
    records = log.read_text().splitlines()
    assert sum('"type":"summary"' in line for line in records) == 1
    assert len(records) == 3  # header, the step, the summary


_CHILD = """
import gc, sys, torch, gradwatch as gw
from torch import nn
from gradwatch.report.jsonl import JsonlSink
model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
watch = gw.GradWatch(
    model, track_micro_batches=True, forensics=True,
    sinks=[JsonlSink(sys.argv[1]), gw.ConsoleSink(every=10)],
).attach(opt)
other = nn.Linear(4, 1)
dropped = gw.GradWatch(other, forensics=True, sinks=[JsonlSink(sys.argv[2])])
for step in range(25):
    opt.zero_grad()
    loss = model(torch.randn(16, 8)).pow(2).mean()
    with watch.backward(loss=loss):
        loss.backward()
    if step == 20:
        model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    other(torch.randn(2, 4)).sum().backward()
    dropped.check()
del dropped
gc.collect()
left = sum(len(p._post_accumulate_grad_hooks or {}) for p in other.parameters())
print("hooks left on the dropped watch's model:", left)
print("exiting", flush=True)
"""


@pytest.fixture(scope="module")
def unclosed(tmp_path_factory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A process that never closes its watches: one attached, one dropped mid-run."""
    tmp = tmp_path_factory.mktemp("unclosed")
    script = tmp / "child.py"
    script.write_text(_CHILD)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp / "run.jsonl"), str(tmp / "dropped.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, tmp


def test_unclosed_watch_exits_cleanly(unclosed) -> None:
    """Never closed: the interpreter exits, and the GC collects a dropped watch, without error."""
    result, _ = unclosed
    assert result.returncode == 0, result.stderr
    assert "exiting" in result.stdout
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert "hooks left on the dropped watch's model: 0" in result.stdout


def test_unclosed_watch_is_closed_at_interpreter_exit(unclosed) -> None:
    from gradwatch.report.runlog import read_run

    result, tmp = unclosed
    assert result.returncode == 0, result.stderr
    log = read_run(tmp / "run.jsonl")
    assert len(log) == 25
    assert log.summary is not None and log.summary.steps == 25
