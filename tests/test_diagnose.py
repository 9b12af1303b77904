"""Scenarios: small real models trained for real; each must get the right finding, and only it.

* a deep constant-init MLP explodes (geometric growth through depth);
* a deep sigmoid MLP vanishes;
* an RNN with a large recurrent weight, under a learning-rate ramp, spikes then overflows;
* a network with an unused branch has dead parameters (and one with a dead ReLU layer, zeros);
* a residual MLP trains stably: no finding at all.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch as gw
from gradwatch.report.jsonl import JsonlSink
from gradwatch.report.runlog import read_run

GAIN = 2.34


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Events(gw.Sink):
    def __init__(self) -> None:
        self.events: list[gw.Event] = []

    def write(self, record: object) -> None:
        if isinstance(record, gw.Event):
            self.events.append(record)


def train(model, batches, opt, *, lr=None, sinks=None, **watch_kwargs):
    """Train with a watcher attached; ``lr(step)`` sets the learning rate. Returns it closed."""
    watch = gw.GradWatch(model, sinks=sinks or [], **watch_kwargs).attach(opt)
    for step, (x, y) in enumerate(batches):
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        with watch.backward(loss=loss):
            loss.backward()
        opt.step()
    watch.close()
    return watch


def regression(steps: int, features: int = 8, batch: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, features, generator=gen)
    y = x[:, :1] * 2.0 - x[:, 1:2]
    return [(x[i], y[i]) for i in torch.randint(0, 512, (steps, batch), generator=gen)]


def kinds(watch: gw.GradWatch) -> list[str]:
    return [f.kind for f in watch.diagnose()]


def finding(watch: gw.GradWatch, kind: str) -> gw.Finding:
    (found,) = [f for f in watch.diagnose() if f.kind == kind]
    return found


# ----------------------------------------------------------------------------- exploding


def constant_mlp(depth: int = 20, width: int = 4, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(width, width if i < depth - 1 else 1, bias=bias)
        nn.init.constant_(linear.weight, GAIN / width)
        if bias:
            nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()] if i < depth - 1 else [linear]
    return nn.Sequential(*layers)


def chain_batches(steps: int, width: int = 4):
    gen = torch.Generator().manual_seed(0)
    x = (0.5 + torch.rand(512, width, generator=gen)) * GAIN**-20
    y = 3.0 * x.mean(dim=1, keepdim=True) * GAIN**20
    return [(x[i], y[i]) for i in torch.randint(0, 512, (steps, 32), generator=gen)]


def test_deep_constant_init_mlp_explodes_through_depth() -> None:
    model = constant_mlp()
    watch = train(model, chain_batches(30), torch.optim.SGD(model.parameters(), lr=1e-12))
    # The first SGD step moves the input layer's bias (gradient ~1e7) past its tiny inputs
    # (~1e-7): the ReLUs behind it die and stay dead, which is reported too, second.
    assert kinds(watch)[0] == "exploding" and set(kinds(watch)) <= {"exploding", "dead"}
    found = finding(watch, "exploding")
    assert "Linear bias gradients grow ×2.34 per layer in backward order through `38`…`0`" in (
        found.evidence
    )
    assert "Linear weight gradients stay flat (×1.00 per layer)" in found.evidence
    assert found.params[0] == "38.bias" and found.params[-1] == "0.bias"
    assert any("Kaiming" in r for r in found.remedies)
    # The suggested clip threshold is the run's median global norm (histogram: 2.3% bins).
    norms = [r.global_norm for r in watch.history]
    assert found.suggested["max_norm"] == pytest.approx(float(np.median(norms)), rel=0.03)
    assert f"gradwatch.ClipNorm({found.suggested['max_norm']:.3g})" in " ".join(found.remedies)


def test_bias_free_chain_explodes_only_in_the_backpropagated_signal() -> None:
    """Equal layers without biases: every weight gradient is the same, nothing grows in the
    parameter gradients; the signal each layer passes back grows ×2.34 (forensics sees it)."""
    batches = chain_batches(30)
    plain = constant_mlp(bias=False)
    watch = train(plain, batches, torch.optim.SGD(plain.parameters(), lr=1e-12))
    assert "exploding" not in kinds(watch)
    weight_log = watch.health_detector.report().grad_log[1:-1]
    assert np.ptp(weight_log) < 1e-4  # flat: what the gradients alone can show

    hooked = constant_mlp(bias=False)
    watch = train(hooked, batches, torch.optim.SGD(hooked.parameters(), lr=1e-12), forensics=True)
    found = finding(watch, "exploding")
    assert "the backpropagated signal (max |∂loss/∂output| of each Linear) grows ×2.34" in (
        found.evidence
    )
    assert found.params[0] == "38" and found.params[-1] == "0"


# ----------------------------------------------------------------------------- vanishing


def sigmoid_mlp(depth: int = 10, width: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(8 if i == 0 else width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def test_deep_sigmoid_mlp_vanishes() -> None:
    torch.manual_seed(0)
    model = sigmoid_mlp()
    watch = train(model, regression(40), torch.optim.SGD(model.parameters(), lr=0.1))
    assert kinds(watch) == ["vanishing"]
    found = finding(watch, "vanishing")
    assert "Linear weight gradients (relative to the parameter's norm) shrink ×0.1" in (
        found.evidence
    )
    assert "`0.weight` gets" in found.evidence or "`0.bias` gets" in found.evidence
    assert "0.weight" in found.params and "20.weight" not in found.params
    assert "below float32 resolution" in found.evidence  # SGD updates too small to register
    assert any("ReLU/GELU" in r for r in found.remedies)


# ----------------------------------------------------------------------------- RNN


class RNNRegressor(nn.Module):
    def __init__(self, hidden: int = 16, gain: float = 1.2) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, hidden, batch_first=True, nonlinearity="relu")
        nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=gain)  # recurrent gain above 1
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def test_rnn_with_large_recurrent_weight_spikes_then_overflows() -> None:
    torch.manual_seed(0)
    model = RNNRegressor()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 20, 4, generator=gen) for _ in range(60)]
    batches = [(x, x[:, :3, 0].sum(1, keepdim=True)) for x in xs]
    sink = Events()
    watch = train(
        model,
        batches,
        torch.optim.SGD(model.parameters(), lr=1e-3),
        lr=lambda step: 1e-3 * 1.15**step,  # a warm-up that overshoots
        sinks=[sink],
    )
    assert kinds(watch) == ["nonfinite", "spike", "loss_spike"]
    spike, nonfinite = finding(watch, "spike"), finding(watch, "nonfinite")
    first_spike = min(e.step for e in sink.events if e.kind == "spike")
    first_nan = min(e.step for e in sink.events if e.kind == "nonfinite")
    assert first_spike < first_nan
    assert f"first at step {first_spike}" in spike.evidence
    assert "rnn.weight_hh_l0" in spike.params
    assert any("recurrent weight drives them" in r for r in spike.remedies)
    assert spike.suggested["max_norm"] > 0
    assert f"first at step {first_nan}" in nonfinite.evidence
    assert "after a gradient-norm spike" in nonfinite.evidence
    assert "check the learning rate / warm-up" in " ".join(nonfinite.remedies)
    assert "exploding" not in kinds(watch) and "dead" not in kinds(watch)


# ----------------------------------------------------------------------------- dead


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.aux = nn.Linear(8, 1)  # built, never used in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_unused_branch_is_dead_and_nothing_else() -> None:
    torch.manual_seed(0)
    model = TwoBranches()
    watch = train(model, regression(40), torch.optim.SGD(model.parameters(), lr=0.05))
    assert kinds(watch) == ["dead"]
    found = finding(watch, "dead")
    assert found.params == ("aux.weight", "aux.bias")
    assert found.evidence == (
        "`aux.weight`, `aux.bias` received no gradient (grad is None) for all 40 steps seen: "
        "not used in the forward pass"
    )
    assert any("find_unused_parameters=True" in r for r in found.remedies)


def test_layer_behind_dead_relus_has_zero_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    )
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # every unit of the second layer is below zero: dead ReLUs
    watch = train(
        model,
        regression(30),
        torch.optim.SGD(model.parameters(), lr=0.05),
        health_detector=gw.HealthDetector(dead_after=10),
    )
    assert kinds(watch) == ["dead"]
    found = finding(watch, "dead")
    # Layers 0 and 2 get no signal through the dead ReLUs; 4.weight multiplies their zeros.
    assert found.params == ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight")
    assert "gradient exactly zero for all 30 steps seen: dead units" in found.evidence
    assert any("dead ReLU" in r for r in found.remedies)


# ----------------------------------------------------------------------------- stable


class ResidualMLP(nn.Module):
    """Pre-norm residual blocks, Kaiming-initialised, last layer of each block small."""

    def __init__(self, depth: int = 12, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)
            )
            for _ in range(depth)
        )
        for block in self.blocks:
            nn.init.kaiming_normal_(block[1].weight, nonlinearity="relu")
            nn.init.normal_(block[3].weight, std=0.02)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


@pytest.mark.parametrize("seed", [0, 1])
def test_residual_mlp_trains_stably_without_false_alarms(seed: int) -> None:
    torch.manual_seed(seed)
    model = ResidualMLP()
    batches = regression(60, seed=seed)
    watch = train(model, batches, torch.optim.Adam(model.parameters(), lr=1e-3), forensics=True)
    assert watch.diagnose() == []
    assert watch.close().findings == ()
    losses = [r.loss for r in watch.history]
    assert losses[-1] < 0.5 * losses[0]  # it did learn


# ----------------------------------------------------------------------------- reporting


def test_findings_end_the_console_summary_and_the_run_log(tmp_path) -> None:
    torch.manual_seed(0)
    model = TwoBranches()
    out = io.StringIO()
    sinks = [
        gw.ConsoleSink(every=0, console=Console(file=out, width=120)),
        JsonlSink(tmp_path / "r.jsonl"),
    ]
    watch = train(model, regression(25), torch.optim.SGD(model.parameters(), lr=0.05), sinks=sinks)
    text = out.getvalue()
    assert "`aux.weight`, `aux.bias` received no gradient (grad is None)" in text
    assert "find_unused_parameters=True" in text
    summary = read_run(tmp_path / "r.jsonl").summary
    assert summary is not None
    assert summary.findings == watch.close().findings
    assert watch.diagnose() == list(summary.findings)


def test_diagnose_mid_run_and_suggested_thresholds_are_plain_numbers() -> None:
    torch.manual_seed(0)
    model = RNNRegressor()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    watch = gw.GradWatch(model, sinks=[]).attach(opt)
    for step in range(55):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 1.15**step
        x = torch.randn(16, 20, 4, generator=gen)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), x[:, :3, 0].sum(1, keepdim=True))
        with watch.backward(loss=loss):
            loss.backward()
        opt.step()
        if step == 20:
            assert watch.diagnose() == []  # nothing wrong yet
    found = watch.diagnose()
    assert found and all(isinstance(f, gw.Finding) for f in found)
    for f in found:
        assert all(isinstance(v, float) and math.isfinite(v) for v in f.suggested.values())
    watch.close()


def test_periodic_spikes_point_at_the_data() -> None:
    """A bad batch every 15 steps (say, a corrupt shard): regular spikes, a data remedy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    batches = [
        (x * (10.0 if step % 15 == 14 else 1.0), y) for step, (x, y) in enumerate(regression(90))
    ]
    watch = train(model, batches, torch.optim.SGD(model.parameters(), lr=0.01))
    found = finding(watch, "spike")
    assert "every ~15 steps" in found.evidence
    assert any("spikes every ~15 steps point at the data" in r for r in found.remedies)
    norms = sorted(r.global_norm for r in watch.history if not r.spike)
    assert found.suggested["max_norm"] == pytest.approx(norms[int(0.9 * len(norms))], rel=0.1)
