"""The diagnosis's readings on their own: the time axis, live causes, and the new events.

Each reading is checked on plain series (no model) where its answer is known by construction,
and the live behaviour on small real runs: a non-finite loss with finite gradients is reported,
the first alert of an incident states its cause, unused parameters and dead layers are alerted
once, and state survives a checkpoint.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import Events
from torch import nn

import gradwatch as gw
from gradwatch.detect.trajectory import BLOCKS, Series, Trajectory
from gradwatch.diagnosis.trend import blowup, loss_progress


def _series(norms, losses=None, lrs=None) -> Series:
    n = len(norms)
    return Series(
        np.arange(n),
        np.asarray(norms, dtype=np.float64),
        np.asarray(losses if losses is not None else [math.nan] * n, dtype=np.float64),
        np.asarray(lrs if lrs is not None else [math.nan] * n, dtype=np.float64),
    )


def test_one_step_carrying_the_rise_is_a_jump_growth_over_steps_is_growth() -> None:
    rng = np.random.default_rng(0)
    steady = list(1.0 + 0.1 * rng.standard_normal(20))
    jump = blowup(_series([*steady, 500.0, 800.0, math.inf]))
    assert jump is not None and (jump.kind, jump.onset, jump.jump_step) == ("jump", 20, 20)
    assert jump.nonfinite_step == 22 and jump.jump == pytest.approx(500.0, rel=0.2)
    growth = blowup(_series([*steady, *(1.0 * 3.0**k for k in range(1, 8))]))
    assert growth is not None and growth.kind == "growth"
    assert growth.per_step == pytest.approx(3.0, rel=0.1) and growth.onset < 24


def test_a_spike_that_falls_back_or_noise_is_no_blowup() -> None:
    rng = np.random.default_rng(1)
    noisy = np.abs(rng.standard_normal(300)) + 0.5  # healthy, noisy, heavy at the low end
    assert blowup(_series(noisy)) is None
    spike = [1.0] * 20 + [80.0] + [1.0] * 20
    assert blowup(_series(spike)) is None


def test_a_jump_in_the_first_steps_is_not_blamed_on_a_batch() -> None:
    # Steady history is needed to blame one batch: a blow-up at the first update is the update.
    found = blowup(_series([1.0, 2e4, 3e4, 5e4]))
    assert found is not None and found.kind == "growth"


def test_loss_progress_compares_the_ends() -> None:
    assert loss_progress(_series([1.0] * 20, np.linspace(2.0, 0.2, 20))) < 0.3
    assert loss_progress(_series([1.0] * 20, np.geomspace(1.6, 2e3, 20))) > 100


def test_trajectory_memory_is_bounded_and_its_state_round_trips() -> None:
    trajectory = Trajectory()
    for step in range(5000):
        trajectory.update(step, 1.0 + step, 2.0, 0.1)
        if step == 1234:
            trajectory.freeze("spike")
    overview = trajectory.overview()
    assert len(overview) <= BLOCKS and overview.steps[0] == 0
    assert np.all(np.diff(overview.norms) > 0)  # a growing norm stays growing, block by block
    assert trajectory.run_up("spike").steps[-1] == 1234
    copy = Trajectory()
    copy.load_state_dict(trajectory.state_dict())
    for step in range(5000, 5100):
        trajectory.update(step, 1.0, 2.0, 0.1)
        copy.update(step, 1.0, 2.0, 0.1)
    np.testing.assert_array_equal(copy.overview().norms, trajectory.overview().norms)


def test_a_nonfinite_loss_with_finite_gradients_is_an_event_and_a_finding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink]).attach(opt)
    for _ in range(10):
        out = model(torch.randn(16, 8))
        target = torch.softmax(torch.randn(16, 4), 1)
        loss = -(target * torch.log(torch.relu(out))).mean()  # log(0) = -inf
        opt.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        opt.step()
    watch.close()
    first = sink.events[0]
    assert (first.kind, first.step, first.cause) == ("loss_nonfinite", 0, "forward_numerics")
    assert first.params == ("loss",) and "probable cause: forward numerics" in first.message
    top = watch.diagnose()[0]
    assert (top.kind, top.cause, top.severity, top.params) == (
        "loss_nonfinite",
        "forward_numerics",
        "error",
        ("loss",),
    )
    assert any("F.cross_entropy" in r for r in top.remedies)


def test_an_exploding_first_step_is_alerted_at_once_with_its_cause() -> None:
    layers: list[nn.Module] = []
    for _ in range(20):
        layer = nn.Linear(1, 1)
        nn.init.constant_(layer.weight, 2.34)
        nn.init.zeros_(layer.bias)
        layers += [layer, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink]).attach(opt)
    loss = (model(torch.ones(4, 1)) - 1).pow(2).mean()
    with watch.backward(loss=loss):
        loss.backward()
    opt.step()
    watch.flush()
    (event,) = [e for e in sink.events if e.kind == "exploding"]
    assert (event.step, event.cause, event.params[0]) == (0, "initialization", "0")
    assert "×2.34 per layer" in event.message
    found = watch.diagnose()[0]
    assert (found.cause, found.first_step) == ("initialization", 0)
    assert found.data["growth_per_layer"] == pytest.approx(2.34, rel=1e-3)
    watch.close()


def test_unused_parameters_and_dead_layers_are_alerted_once_when_clear() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
            )
            self.aux = nn.Linear(8, 1)  # never used

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.body[2].bias.fill_(-50.0)  # its units never activate
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], health_detector=gw.HealthDetector(dead_after=10))
    watch.attach(opt)
    for _ in range(40):
        x = torch.randn(16, 8)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    watch.close()
    told = [(e.kind, e.params, e.cause) for e in sink.events if e.kind in ("dead", "unused")]
    assert ("unused", ("aux.weight", "aux.bias"), "unused") in told
    assert ("dead", ("body.2",), "dead_units") in told
    assert len(told) == 2  # once each
    assert all(e.step == 10 for e in sink.events if e.kind in ("dead", "unused"))
