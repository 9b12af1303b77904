"""``gradwatch demo`` tells a true story: real runs, a real spike, a real Inf, a real recovery."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch as gw
from gradwatch import demo
from gradwatch.records import Event, Record, StepReport

PARAMS = {name for name, _ in demo.exploding_mlp().named_parameters()}


class Collect(gw.Sink):
    """Keeps every event and step report."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.reports: list[StepReport] = []

    def write(self, record: Record) -> None:
        if isinstance(record, Event):
            self.events.append(record)
        elif isinstance(record, StepReport):
            self.reports.append(record)


def _train(watch_kwargs: dict, steps: int) -> tuple[demo.DemoRun, Collect, str]:
    out = io.StringIO()
    collect = Collect()
    console = gw.ConsoleSink(every=demo.EVERY, console=Console(file=out, width=120))
    run = demo.train(watch_kwargs, steps, sinks=[console, collect])
    return run, collect, out.getvalue()


@pytest.fixture(scope="module")
def unprotected() -> tuple[demo.DemoRun, Collect, str]:
    return _train({}, demo.BAD_STEP + 10)


@pytest.fixture(scope="module")
def protected() -> tuple[demo.DemoRun, Collect, str]:
    return _train({"clip": gw.ClipNorm(demo.MAX_NORM), "on_nonfinite": "skip"}, 60)


def test_unprotected_spike_is_flagged_before_the_first_nonfinite_step(unprotected):
    run, collect, text = unprotected
    first_nonfinite = min(r.step for r in collect.reports if r.nonfinite)
    spikes = [e.step for e in collect.events if e.kind == "spike"]
    assert spikes and min(spikes) < first_nonfinite
    # The story as told: quiet until the batch with the bad record, spike there, Inf right after.
    assert min(e.step for e in collect.events) == demo.BAD_STEP == min(spikes)
    assert first_nonfinite == demo.BAD_STEP + 1 == run.stopped_at
    spike = next(e for e in collect.events if e.kind == "spike")
    assert spike.message in text  # the alert was printed as it happened, on one line
    assert math.isnan(run.final_loss)


def test_unprotected_nonfinite_event_names_the_parameter(unprotected):
    _, collect, text = unprotected
    (event,) = [e for e in collect.events if e.kind == "nonfinite"]
    first = event.params[0]
    assert first in PARAMS
    assert first == event.data["first"]
    assert event.step == demo.BAD_STEP + 1 and first in event.message
    assert event.message in text


def test_the_inf_is_real_not_a_norm_overflow():
    """Replays the unprotected run without gradwatch: the gradients hold Inf, not just big values.

    A float32 gradient above ~1.8e19 is finite but its L2 norm overflows; the demo claims more.
    """
    model = demo.exploding_mlp()
    data = demo.make_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=demo.lr_at(0))
    norms = []
    with demo.one_thread():
        for step, batch in enumerate(data.batches(demo.BAD_STEP + 2)):
            for group in optimizer.param_groups:
                group["lr"] = demo.lr_at(step)
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(data.x[batch]), data.y[batch])
            loss.backward()
            grads = [p.grad for p in model.parameters()]
            norms.append(float(torch.nn.utils.get_total_norm(grads)))
            optimizer.step()
    usual = sorted(norms[: demo.BAD_STEP])[demo.BAD_STEP // 2]
    assert norms[demo.BAD_STEP] > 1e3 * usual  # "about 10^4 times the usual one"
    assert not math.isfinite(loss.item())
    assert all(not torch.isfinite(g).all() for g in grads)


def test_protected_run_converges_without_nonfinite(protected):
    run, collect, _ = protected
    assert run.stopped_at is None and run.steps == 60
    assert run.summary.nonfinite_steps == 0
    assert all(math.isfinite(r.global_norm) and not r.nonfinite for r in collect.reports)
    assert run.final_loss < 0.01 * run.initial_loss
    # gradwatch still sees every bad batch; the clipper cut each of them.
    assert run.bad_steps and run.bad_steps[0] == demo.BAD_STEP
    spikes = {e.step for e in collect.events if e.kind == "spike"}
    assert set(run.bad_steps) <= spikes
    assert all(collect.reports[s].clip_coef < 1e-2 for s in run.bad_steps)
    assert all(e.kind != "nonfinite" for e in collect.events)


def test_cli_runs_both_acts_and_writes_a_fresh_log(tmp_path: Path):
    log = tmp_path / "run.jsonl"
    log.write_text("an old log\n")
    steps = demo.BAD_STEP + 10
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch", "demo", "--steps", str(steps), "--log", str(log)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"gradwatch report {log}" in done.stdout  # on one line, ready to copy
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["type"] == "header"
    kinds = {r.get("kind") for r in records if r["type"] == "event"}
    assert {"spike", "nonfinite"} <= kinds
    assert records[-1]["type"] == "summary"


def test_part_one_diagnoses_the_textbook_network_and_each_remedy_helps() -> None:
    from gradwatch.demo_remedies import remedies_table

    out = io.StringIO()
    outcomes = {o.name.split(" (")[0]: o for o in remedies_table(Console(file=out, width=120))}
    text = out.getvalue()
    plain = outcomes["none"]
    assert plain.first_norm > 1e14 and (plain.cause, plain.place) == ("initialization", "0")
    assert plain.finding.data["growth_per_layer"] == pytest.approx(2.34, rel=1e-3)
    assert "cause initialization" in text and "×2.34 per layer" in text
    clipped = outcomes["gradient clipping"]
    assert clipped.final_loss < 1.0 < plain.final_loss  # the suggested max_norm rescues the run
    for healthy in ("careful initialisation", "batch normalisation after each layer"):
        outcome = outcomes[healthy]
        assert outcome.cause is None and outcome.final_loss < 0.5 * outcome.first_loss, healthy
    fewer = outcomes["fewer layers"]
    assert fewer.first_norm < 1e-9 * plain.first_norm and fewer.final_loss < 1.0
