"""When records reach sinks: alerts at once, other steps in batches unless a sink asks for them.

Rows are judged (spike and loss detectors) as soon as they are on the host; the rest of the
emission is batched up to ``DRAIN_BATCH`` rows, earlier when a sink's ``next_due`` asks. These
tests pin that contract with real sinks and a real model on CPU, where rows are on the host at once.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backward, mlp

import gradwatch as gw
from gradwatch.emission import DRAIN_BATCH
from gradwatch.records import Event, StepReport
from gradwatch.report.sink import NEVER, SinkGroup


class Recorder(gw.Sink):
    """Records, and the watcher step at which each arrived."""

    def __init__(self, due: str = "every step", every: int = 10) -> None:
        self.due = due
        self.every = every
        self.arrived: list[tuple[int, object]] = []  # (watch.step when written, record)
        self.watch: gw.GradWatch | None = None

    def write(self, record: object) -> None:
        at = -1 if self.watch is None else self.watch.step  # RunStart comes from the constructor
        self.arrived.append((at, record))

    def next_due(self, step: int) -> int:
        if self.due == "never":
            return NEVER
        if self.due == "window":
            return ((step + 1) // self.every + 1) * self.every - 1
        return step + 1

    def steps(self) -> list[tuple[int, int]]:
        """(record's step, watcher step when it arrived) for every StepReport."""
        return [(r.step, at) for at, r in self.arrived if isinstance(r, StepReport)]


def _run(sink: Recorder, steps: int, *, blow_up_at: int | None = None) -> gw.GradWatch:
    model = mlp(depth=2)
    watch = gw.GradWatch(model, sinks=[sink])
    sink.watch = watch
    for step in range(steps):
        model.zero_grad()
        backward(model, seed=step)
        if step == blow_up_at:
            model[0].weight.grad[0, 0] = math.nan
        watch.check()
    return watch


def test_a_sink_that_wants_every_step_gets_each_at_once() -> None:
    sink = Recorder("every step")
    _run(sink, 40)
    assert sink.steps() == [(k, k + 1) for k in range(40)]


def test_a_sink_that_never_needs_steps_early_gets_them_in_batches_in_order() -> None:
    sink = Recorder("never")
    watch = _run(sink, 2 * DRAIN_BATCH + 5)
    steps = sink.steps()
    assert [s for s, _ in steps] == list(range(2 * DRAIN_BATCH))
    assert {at for _, at in steps} == {DRAIN_BATCH, 2 * DRAIN_BATCH}
    watch.close()
    assert [s for s, _ in sink.steps()] == list(range(2 * DRAIN_BATCH + 5))  # close flushes


def test_a_window_sink_gets_each_window_when_its_last_step_is_done() -> None:
    sink = Recorder("window", every=10)
    _run(sink, 30)
    for step, at in sink.steps():
        assert at <= (step // 10) * 10 + 10, (step, at)  # never later than its window's end
    assert (9, 10) in sink.steps() and (19, 20) in sink.steps() and (29, 30) in sink.steps()


def test_an_alert_is_never_held_back_by_batching() -> None:
    sink = Recorder("never")
    _run(sink, 12, blow_up_at=7)
    events = [(at, r) for at, r in sink.arrived if isinstance(r, Event)]
    assert [(at, e.kind, e.step) for at, e in events] == [(8, "nonfinite", 7)]
    assert [s for s, _ in sink.steps()] == list(range(8))  # every step before it, in order


def test_reading_a_report_resolves_it_without_delivering_out_of_order() -> None:
    sink = Recorder("never")
    model = mlp(depth=2)
    watch = gw.GradWatch(model, sinks=[sink])
    sink.watch = watch
    reports = []
    for step in range(5):
        model.zero_grad()
        backward(model, seed=step)
        reports.append(watch.check())
    assert sink.steps() == []
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert reports[-1].global_norm == pytest.approx(expected, rel=1e-6)
    assert [s for s, _ in sink.steps()] == [0, 1, 2, 3, 4]


def test_console_and_logging_sinks_ask_for_their_summary_step(tmp_path) -> None:
    import io
    import logging

    from rich.console import Console

    console = gw.ConsoleSink(every=10, console=Console(file=io.StringIO()))
    log = logging.getLogger("gradwatch.test_delivery")
    sinks = [console, gw.LoggingSink(log, every=25)]
    group = SinkGroup(sinks)
    assert group.next_due(-1) == 9
    quiet = gw.ConsoleSink(every=0, console=Console(file=io.StringIO()))
    assert SinkGroup([quiet]).next_due(5) == NEVER
    jsonl = gw.JsonlSink(tmp_path / "run.jsonl")
    assert SinkGroup([jsonl, console]).next_due(3) == 4  # JSONL: every step, for crash safety
    jsonl.close()


def test_a_sink_whose_next_due_raises_is_disabled_not_fatal() -> None:
    class Broken(Recorder):
        def next_due(self, step: int) -> int:
            raise RuntimeError("tracker down")

    sink, other = Broken(), Recorder("every step")
    model = mlp(depth=2)
    with pytest.warns(gw.GradWatchWarning, match="sink Broken failed and was disabled"):
        watch = gw.GradWatch(model, sinks=[sink, other])
        sink.watch = other.watch = watch
        for step in range(3):
            model.zero_grad()
            backward(model, seed=step)
            watch.check()
    assert [s for s, _ in other.steps()] == [0, 1, 2]
