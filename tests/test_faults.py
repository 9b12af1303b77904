"""Faults around the training loop: failing sinks, SIGKILL, Ctrl-C, resuming from a checkpoint.

A failing sink (a real full disk: ``/dev/full``; a real broken pipe; a real TensorBoard writer
whose background thread hits a full disk) is disabled with one ``GradWatchWarning`` naming it and
the error, the other sinks and training go on. A run killed with SIGKILL leaves a JSONL log that
reads back; Ctrl-C in a sink or in the middle of backward leaves the model, the hooks and the
log consistent, and ``close()`` still writes the summary. A checkpoint (``watch.state_dict()``
through ``torch.save``/``torch.load(weights_only=True)``) continues a run exactly.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import glob
import importlib.util
import io
import math
import os
import re
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mlp
from rich.console import Console
from torch import nn

import gradwatch as gw
from gradwatch.report.jsonl import JsonlSink
from gradwatch.report.runlog import read_run

FULL_DISK = "/dev/full"  # every write fails with ENOSPC: a real full disk
needs_full_disk = pytest.mark.skipif(not os.path.exists(FULL_DISK), reason="needs /dev/full")


def _batch(step: int) -> torch.Tensor:
    return torch.randn(8, 8, generator=torch.Generator().manual_seed(step))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        opt.zero_grad()
        model(_batch(step)).pow(2).mean().backward()
        opt.step()


def _hooks(model: nn.Module) -> int:
    count = 0
    for p in model.parameters():
        count += len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
    return count + sum(len(m._forward_hooks) for m in model.modules())


def _gradwatch_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, gw.GradWatchWarning)]


# ------------------------------------------------------------------------------ failing sinks


class _FillingDisk(io.RawIOBase):
    """A file on a disk with ``capacity`` free bytes: writes beyond it fail with ENOSPC."""

    def __init__(self, capacity: int) -> None:
        self.free = capacity

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.free -= len(data)
        return len(data)


@needs_full_disk
def test_full_disk_disables_that_sink_only(tmp_path: Path) -> None:
    """A JSONL log on a full disk from the start, a console log whose disk fills mid-run."""
    model = mlp(depth=2)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    healthy = io.StringIO()
    filling = io.TextIOWrapper(io.BufferedWriter(_FillingDisk(800), buffer_size=64))
    sinks = [
        JsonlSink(FULL_DISK, mode="a"),
        gw.ConsoleSink(every=5, console=Console(file=filling, width=100)),
        JsonlSink(tmp_path / "ok.jsonl"),
        gw.ConsoleSink(every=5, console=Console(file=healthy, width=100)),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = gw.GradWatch(model, clip=gw.ClipNorm(0.5), sinks=sinks).attach(opt)
        _train(model, opt, 30)
        watch.flush()  # emit the 30 steps: 6 console lines, more than its disk holds
        mid_run = len(_gradwatch_warnings(caught))
        _train(model, opt, 30, start=30)
        summary = watch.close()
    with contextlib.suppress(OSError):
        filling.close()  # its buffer cannot be flushed: the disk is full
    messages = _gradwatch_warnings(caught)
    assert len(messages) == 2, messages
    assert mid_run == 2
    assert (
        "sink JsonlSink failed and was disabled (OSError: [Errno 28] No space left" in messages[0]
    )
    assert "sink ConsoleSink failed and was disabled (OSError: [Errno 28]" in messages[1]
    assert all("training and the other sinks continue" in m for m in messages)
    ours = [w for w in caught if issubclass(w.category, gw.GradWatchWarning)]
    assert all(w.filename == __file__ for w in ours)  # the warnings point at the loop
    # Training was not touched: the same weights as clipping with torch.
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for step in range(60):
        ref_opt.zero_grad()
        reference(_batch(step)).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        ref_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    # The healthy sinks got everything.
    log = read_run(tmp_path / "ok.jsonl")
    assert list(log.step) == list(range(60)) and log.summary is not None
    assert log.summary.steps == summary.steps == 60
    assert healthy.getvalue().count("gradwatch steps") == 12
    assert "gradwatch summary: 60 steps" in healthy.getvalue()


@needs_full_disk
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_tensorboard_writer_failure_in_its_thread_disables_the_sink(tmp_path: Path) -> None:
    """TensorBoard writes from a background thread; when its disk is full the error reaches the
    training thread at the next write, and only the TensorBoard sink is disabled."""
    from gradwatch.report.tensorboard import TensorBoardSink

    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("the full disk is injected through tensorboard's own file layer")
    writer = tensorboard.SummaryWriter(str(tmp_path / "tb"))
    (events,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    os.remove(events)
    os.symlink(FULL_DISK, events)  # the writer reopens its file for every append
    out = io.StringIO()
    model = mlp(depth=2)
    sinks = [TensorBoardSink(writer=writer), gw.ConsoleSink(every=10, console=Console(file=out))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = gw.GradWatch(model, sinks=sinks)
        for step in range(50):
            model.zero_grad()
            model(_batch(step)).pow(2).mean().backward()
            watch.check()
        summary = watch.close()
    messages = _gradwatch_warnings(caught)
    assert len(messages) == 1, messages
    assert "sink TensorBoardSink failed and was disabled (OSError: [Errno 28]" in messages[0]
    assert summary.steps == 50
    assert out.getvalue().count("gradwatch steps") == 5 and "gradwatch summary" in out.getvalue()
    with pytest.raises(OSError, match="No space left"):  # the writer really is broken
        writer.close()


_BROKEN_PIPE_CHILD = """
import os, sys, warnings, torch, gradwatch as gw
from rich.console import Console
from torch import nn

warnings.simplefilter("always", gw.GradWatchWarning)


def train(sinks, steps=20):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, sinks=sinks).attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    return watch.close().steps


def broken_pipe():
    read, write = os.pipe()
    os.close(read)
    return write


# A: the console sink's own file is a broken pipe; stdout is healthy.
console_file = os.fdopen(broken_pipe(), "w")
steps = train([gw.ConsoleSink(every=1, console=Console(file=console_file, width=100))])
print(f"A: trained {steps} steps", file=sys.stderr, flush=True)
print("stdout alive after A", flush=True)
# B: stdout itself is a broken pipe, as in `python train.py | head -1`.
os.dup2(broken_pipe(), 1)
steps = train([gw.ConsoleSink(every=1)])
print(f"B: trained {steps} steps", file=sys.stderr, flush=True)
"""


@pytest.fixture(scope="module")
def broken_pipe_run(tmp_path_factory) -> subprocess.CompletedProcess[str]:
    script = tmp_path_factory.mktemp("pipe") / "child.py"
    script.write_text(_BROKEN_PIPE_CHILD)
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )


def test_broken_pipe_never_kills_training(broken_pipe_run) -> None:
    """rich raises SystemExit on a broken pipe; the sink is disabled, training goes on."""
    result = broken_pipe_run
    assert result.returncode == 0, result.stderr
    assert "A: trained 20 steps" in result.stderr and "B: trained 20 steps" in result.stderr
    warned = [line for line in result.stderr.splitlines() if "GradWatchWarning" in line]
    assert len(warned) == 2, result.stderr
    assert all("sink ConsoleSink failed and was disabled" in line for line in warned)
    assert all("BrokenPipeError" in line for line in warned)
    assert "Traceback" not in result.stderr


def test_broken_console_pipe_leaves_stdout_alone(broken_pipe_run) -> None:
    assert "stdout alive after A" in broken_pipe_run.stdout


# -------------------------------------------------------------------------------- SIGKILL

_KILLED_CHILD = """
import sys, torch, gradwatch as gw
from torch import nn
from gradwatch.report.jsonl import JsonlSink

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
plain = gw.GradWatch(model, sinks=[JsonlSink(sys.argv[1])])
flushed = gw.GradWatch(model, sinks=[JsonlSink(sys.argv[2])])
step = 0
while True:
    opt.zero_grad()
    loss = model(torch.randn(16, 8)).pow(2).mean()
    loss.backward()
    plain.check(loss=loss)
    flushed.check(loss=loss)
    flushed.flush()
    opt.step()
    print(step, flush=True)
    step += 1
"""
KILL_AFTER = 100


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> tuple[Path, Path, int]:
    """A run SIGKILLed after step KILL_AFTER; returns both logs and the last step it finished."""
    tmp = tmp_path_factory.mktemp("killed")
    script = tmp / "child.py"
    script.write_text(_KILLED_CHILD)
    plain, flushed = tmp / "plain.jsonl", tmp / "flushed.jsonl"
    child = subprocess.Popen(
        [sys.executable, str(script), str(plain), str(flushed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    done = -1
    try:
        for line in child.stdout:
            done = int(line)
            if done >= KILL_AFTER:
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return plain, flushed, done


def test_jsonl_log_survives_sigkill(killed_run) -> None:
    plain, flushed, done = killed_run
    assert done >= KILL_AFTER
    every = read_run(flushed)
    # With flush() after each step, every step the run finished is in the log.
    assert list(every.step[: done + 1]) == list(range(done + 1))
    assert every.summary is None and every.bad_lines == 0
    # Without it, the log is a readable prefix: steps are emitted in batches of up to 32.
    prefix = read_run(plain)
    assert list(prefix.step) == list(range(len(prefix)))
    assert len(prefix) >= done + 1 - 32 and prefix.bad_lines == 0
    n = len(prefix)
    assert (prefix.global_norm == every.global_norm[:n]).all()
    assert (prefix.norms == every.norms[:n]).all() and (prefix.loss == every.loss[:n]).all()


def test_torn_last_line_is_skipped(killed_run, tmp_path: Path) -> None:
    """A write torn by the kill (half a line at the end) costs that line only."""
    _, flushed, _ = killed_run
    data = flushed.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(data[: last + (len(data) - last) // 2])
    whole, cut = read_run(flushed), read_run(torn)
    assert cut.truncated and len(cut) == len(whole) - 1
    assert (cut.global_norm == whole.global_norm[:-1]).all()


def test_every_completed_step_survives_sigkill_without_flush(killed_run) -> None:
    plain, _, done = killed_run
    assert list(read_run(plain).step[: done + 1]) == list(range(done + 1))


# ------------------------------------------------------------------------------- Ctrl-C


class _InterruptAt(gw.Sink):
    """A sink that raises KeyboardInterrupt once, when it receives the report of ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.fired = False

    def write(self, record: object) -> None:
        if isinstance(record, gw.StepReport) and record.step == self.step and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


@pytest.mark.parametrize("on_spike", ["warn", "skip"])
def test_keyboard_interrupt_from_a_sink(tmp_path: Path, on_spike: str) -> None:
    """Ctrl-C while a sink writes: it propagates out of optimizer.step() before the weights move;
    every sink still gets the record; close() removes the hooks and writes the summary.

    The record is emitted inside the step's own check (rows reach the sinks as soon as they are
    on the host), so the interrupted step never reaches the optimizer.
    """
    model = mlp(depth=2)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    out = io.StringIO()
    sinks = [
        _InterruptAt(step=5),
        JsonlSink(tmp_path / "run.jsonl"),
        gw.ConsoleSink(console=Console(file=out, width=120)),
    ]
    watch = gw.GradWatch(model, clip=gw.ClipNorm(0.5), on_spike=on_spike, sinks=sinks)
    watch.attach(opt)
    interrupted = None
    for step in range(40):
        opt.zero_grad()
        model(_batch(step)).pow(2).mean().backward()
        try:
            opt.step()
        except KeyboardInterrupt:
            interrupted = step
            break
    summary = watch.close()
    # Step 5 is emitted as soon as its row is on the host: inside step 5's own check, before
    # the optimizer steps, so step 5's optimizer step never ran.
    assert interrupted == 5
    checked = 6
    assert watch.step == summary.steps == checked
    assert _hooks(model) == 0 and "step" not in vars(opt)
    # The weights moved exactly for the optimizer steps that returned.
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for step in range(interrupted):
        ref_opt.zero_grad()
        reference(_batch(step)).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        ref_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    # Every checked step, including the interrupted record, reached the other sinks.
    log = read_run(tmp_path / "run.jsonl")
    assert list(log.step) == list(range(checked))
    assert log.summary is not None and log.summary.steps == checked
    assert f"gradwatch summary: {checked} steps" in out.getvalue()


def _interrupt_backward(model: nn.Module, module: nn.Module, when: list[bool]):
    """Raise KeyboardInterrupt from a tensor hook while backward runs through ``module``."""

    def on_grad(grad):
        if when[0]:
            raise KeyboardInterrupt
        return grad

    def forward_hook(mod, args, output):
        output.register_hook(on_grad)

    return module.register_forward_hook(forward_hook)


def test_keyboard_interrupt_mid_backward_then_close(tmp_path: Path) -> None:
    model = mlp(depth=3)
    interrupt = [False]
    handle = _interrupt_backward(model, model[2], interrupt)
    out = io.StringIO()
    sinks = [JsonlSink(tmp_path / "run.jsonl"), gw.ConsoleSink(console=Console(file=out))]
    watch = gw.GradWatch(model, sinks=sinks, forensics=True)
    with pytest.raises(KeyboardInterrupt):
        for step in range(10):
            interrupt[0] = step == 4
            model.zero_grad(set_to_none=True)
            loss = model(_batch(step)).pow(2).mean()
            with watch.backward(loss=loss):
                loss.backward()
    # Backward stopped halfway: the last layers have gradients, the first do not.
    assert model[4].weight.grad is not None and model[0].weight.grad is None
    summary = watch.close()
    handle.remove()
    assert summary.steps == watch.step == 4  # the interrupted step was never checked
    assert _hooks(model) == 0
    log = read_run(tmp_path / "run.jsonl")
    assert list(log.step) == [0, 1, 2, 3] and log.summary is not None
    assert "gradwatch summary: 4 steps" in out.getvalue()


def _continue_after_interrupt(**watch_kwargs):
    """Interrupt one backward, carry on training: the next reports must be the truth."""
    model = mlp(depth=3)
    interrupt = [False]
    _interrupt_backward(model, model[2], interrupt)
    watch = gw.GradWatch(model, sinks=[], **watch_kwargs)
    reports, truth = [], []
    for step in range(6):
        interrupt[0] = step == 2
        model.zero_grad(set_to_none=True)
        loss = model(_batch(step)).pow(2).mean()
        try:
            with watch.backward(loss=loss) as scope:
                loss.backward()
                if step == 4:
                    model[0].weight.grad[0, 0] = math.nan
        except KeyboardInterrupt:
            continue
        reports.append(scope.report)
        grads = [p.grad for p in model.parameters()]
        truth.append(torch.nn.utils.get_total_norm(grads).item())
    watch.close()
    return reports, truth


def test_training_continues_correctly_after_an_interrupted_backward() -> None:
    reports, truth = _continue_after_interrupt()
    assert [r.step for r in reports] == [0, 1, 2, 3, 4]
    for report, norm in zip(reports, truth):
        assert report.global_norm == norm or (math.isnan(norm) and math.isnan(report.global_norm))
    assert [r.nonfinite for r in reports] == [(), (), (), ("0.weight",), ()]


def test_micro_batch_norms_after_an_interrupted_backward() -> None:
    reports, truth = _continue_after_interrupt(track_micro_batches=True)
    after = reports[2]  # the first step after the interrupted one
    assert after.global_norm == truth[2]
    assert after.micro_batch_norms == pytest.approx([truth[2]], rel=1e-6)


# ---------------------------------------------------------------------- checkpoint, resume


def _plain(value: object, path: str = "state") -> None:
    """Raise unless ``value`` holds only plain Python types and tensors."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{path} has a key of type {type(key).__name__}"
            _plain(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _plain(item, f"{path}[{i}]")
    else:
        plain = (str, int, float, bool, type(None), torch.Tensor)
        assert isinstance(value, plain), f"{path} is a {type(value).__name__}"


CLIPPERS = {
    "none": lambda: None,
    "norm": lambda: gw.ClipNorm(1.0),
    "value": lambda: gw.ClipValue(0.05),
    "zscore": lambda: gw.ClipZScore(warmup=5),
    "percentile": lambda: gw.ClipPercentile(50.0, history=8),
    "unitwise": lambda: gw.ClipUnitwise(0.05),
}


def _segment(model, opt, watch, start: int, stop: int) -> list[tuple]:
    for step in range(start, stop):
        opt.zero_grad()
        loss = model(_batch(step)).pow(2).mean()
        loss.backward()
        if step == 12:
            model[2].weight.grad.mul_(60.0)  # gradient spikes
        if step == 31:
            torch._foreach_mul_([p.grad for p in model.parameters()], 1e4)  # a real spike
        if step == 17:
            model[0].bias.grad[0] = math.nan  # skipped, and kept out of every statistic
        opt.step()
    fields = ("step", "clip_coef", "spike", "spike_threshold", "spike_params", "skipped")
    return [(repr(r.global_norm), *(getattr(r, f) for f in fields)) for r in watch.history]


def _build(clip: str):
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    detector = gw.SpikeDetector(warmup=6)
    watch = gw.GradWatch(
        model, clip=CLIPPERS[clip](), on_nonfinite="skip", spike_detector=detector, sinks=[]
    )
    return model, opt, watch.attach(opt)


@pytest.mark.parametrize("clip", list(CLIPPERS))
def test_checkpoint_resume_continues_exactly(tmp_path: Path, clip: str) -> None:
    model, opt, watch = _build(clip)
    straight = _segment(model, opt, watch, 0, 40)
    final = [p.detach().clone() for p in model.parameters()]
    watch.close()

    model, opt, watch = _build(clip)
    first = _segment(model, opt, watch, 0, 20)
    state = watch.state_dict()
    _plain(state)
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gw": state}, checkpoint)
    watch.close()

    model, opt, watch = _build(clip)
    loaded = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["opt"])
    watch.load_state_dict(loaded["gw"])
    resumed = _segment(model, opt, watch, 20, 40)
    assert first + resumed == straight
    assert any(spike for _, _, _, spike, *_ in resumed)  # the continuation had a spike
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), final))
    watch.close()


def test_checkpoint_resume_keeps_the_diagnosis() -> None:
    model, opt, watch = _build("none")
    _segment(model, opt, watch, 0, 40)
    expected = [(f.kind, f.params) for f in watch.diagnose()]
    assert {"nonfinite", "spike"} <= {kind for kind, _ in expected}
    watch.close()

    model, opt, watch = _build("none")
    _segment(model, opt, watch, 0, 20)
    state = copy.deepcopy(watch.state_dict())
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    watch.close()
    model, opt, watch = _build("none")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    watch.load_state_dict(state)
    _segment(model, opt, watch, 20, 40)
    assert [(f.kind, f.params) for f in watch.diagnose()] == expected


# ------------------------------------------------------------------------------- threads
# gradwatch starts no thread of its own; TensorBoardSink writes through tensorboard's
# background writer thread, and several watchers may run in threads of one process.


def _tensorboard_run(tmp_path: Path, steps: int = 300) -> tuple[gw.GradWatch, Path]:
    from gradwatch.report.tensorboard import TensorBoardSink

    model = mlp(depth=2)
    log_dir = tmp_path / "tb"
    watch = gw.GradWatch(model, sinks=[TensorBoardSink(log_dir)], history=steps)
    for step in range(steps):
        model.zero_grad()
        model(_batch(step)).pow(2).mean().backward()
        if step % 50 == 49:
            model[0].weight.grad[0, 0] = math.nan
        watch.check()
    watch.close()
    return watch, log_dir


def _read_tensorboard(log_dir: Path):
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = loader.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_background_writer_loses_nothing(tmp_path: Path) -> None:
    _, log_dir = _tensorboard_run(tmp_path)
    events = _read_tensorboard(log_dir)
    for tag in ("grad_norm/global", "grad_norm/clip_coef", "grad_norm/0", "grad_norm/4"):
        assert [s.step for s in events.Scalars(tag)] == list(range(300)), tag
    alerts = {
        a.step: a.tensor_proto.string_val[0].decode()
        for a in events.Tensors("gradwatch/events/text_summary")
    }
    nonfinite = [step for step, text in alerts.items() if "**nonfinite**" in text]
    assert nonfinite == [49, 99, 149, 199, 249, 299]
    for step in nonfinite:
        assert f"**nonfinite**: step {step}: NaN in the gradients" in alerts[step]
        assert "`0.weight`" in alerts[step]
    (summary,) = events.Tensors("gradwatch/summary/text_summary")
    assert b"300 steps" in summary.tensor_proto.string_val[0]


def test_tensorboard_scalars_equal_the_reports(tmp_path: Path) -> None:
    """Regression: the sink once wrote StepAggregator fields before absorbing the queued steps,
    so every scalar was NaN."""
    watch, log_dir = _tensorboard_run(tmp_path, steps=60)
    written = [s.value for s in _read_tensorboard(log_dir).Scalars("grad_norm/global")]
    expected = [float(np.float32(r.global_norm)) for r in watch.history]
    assert np.array_equal(written, expected, equal_nan=True)


def test_watchers_in_threads_never_interleave_output(tmp_path: Path) -> None:
    """Four watchers in four threads share one console and each write their own JSONL log."""
    out = io.StringIO()
    console = Console(file=out, width=200)
    start = threading.Barrier(4)
    histories: dict[int, list[float]] = {}
    summaries: dict[int, gw.RunSummary] = {}

    def train(worker: int) -> None:
        torch.manual_seed(worker)
        model = mlp(depth=2)
        sinks = [gw.ConsoleSink(every=1, console=console), JsonlSink(tmp_path / f"{worker}.jsonl")]
        watch = gw.GradWatch(model, sinks=sinks, history=200)
        start.wait()
        for step in range(200):
            model.zero_grad()
            model(_batch(1000 * worker + step)).pow(2).mean().backward()
            watch.check()
        summaries[worker] = watch.close()
        histories[worker] = [r.global_norm for r in watch.history]

    threads = [threading.Thread(target=train, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(summaries) == 4
    lines = out.getvalue().splitlines()
    window = re.compile(r"gradwatch steps (\d+)-\1 \| norm [\d.e+-]+ \(mean .*\| top: .*")
    alert = re.compile(r"gradwatch . step \d+: gradient norm spike .*; reported")
    is_window = [bool(window.fullmatch(line.rstrip())) for line in lines]
    alerts = sum(bool(alert.fullmatch(line.rstrip())) for line in lines)
    assert sum(is_window) == 4 * 200
    assert alerts == sum(s.spikes for s in summaries.values())
    # Each final table appears in one piece, exactly as it renders alone.
    tables = []
    for summary in summaries.values():
        alone = io.StringIO()
        gw.ConsoleSink(console=Console(file=alone, width=200)).write(summary)
        tables.append(alone.getvalue().splitlines())
    table_lines = sum(len(t) for t in tables)
    titles = [i for i, line in enumerate(lines) if "gradwatch summary: 200 steps" in line]
    assert len(titles) == 4
    for i in titles:
        match = next(t for t in tables if lines[i : i + len(t)] == t)  # StopIteration: torn
        tables.remove(match)
    assert sum(is_window) + alerts + table_lines == len(lines)  # nothing else was written
    for worker, norms in histories.items():
        log = read_run(tmp_path / f"{worker}.jsonl")
        assert list(log.step) == list(range(200)) and log.summary is not None
        assert np.array_equal(log.global_norm.astype(np.float32), np.float32(norms))
