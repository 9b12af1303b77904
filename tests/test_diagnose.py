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
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import Events
from rich.console import Console
from torch import nn

import gradwatch as gw
from gradwatch.detect.health_report import SpikeRecord
from gradwatch.diagnosis import diagnose as diagnose_health
from gradwatch.diagnosis.episodes import episodes
from gradwatch.report.jsonl import JsonlSink
from gradwatch.report.runlog import read_run

GAIN = 2.34


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    # The spikes that follow are the same story: every finding blames the initialisation.
    assert kinds(watch)[0] == "exploding"
    assert {f.cause for f in watch.diagnose() if f.kind != "dead"} == {"initialization"}
    found = finding(watch, "exploding")
    assert "Linear bias gradient grows ×2.34 per layer through `38`…`0`" in (found.evidence)
    assert (found.cause, found.first_step) == ("initialization", 0)
    assert found.data["growth_per_layer"] == pytest.approx(GAIN, rel=1e-3)
    assert found.params[0] == "0" and found.params[-1] == "38"  # the input end first
    assert any("Kaiming" in r for r in found.remedies)
    # No healthy step to learn a threshold from: the bound keeps an SGD step below 1% of the
    # weights' norm.
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
    assert "the backpropagated signal grows ×2.34 per layer" in (found.evidence)
    assert found.params[0] == "0" and found.params[-1] == "38"
    assert found.cause == "initialization"


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
    assert not any("RNN" in r or "LSTM" in r for r in found.remedies)  # no recurrence here


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
    assert kinds(watch)[:2] == ["nonfinite", "spike"]
    spike, nonfinite = finding(watch, "spike"), finding(watch, "nonfinite")
    first_spike = min(e.step for e in sink.events if e.kind == "spike")
    first_nan = min(e.step for e in sink.events if e.kind == "nonfinite")
    assert first_spike < first_nan
    assert f"first at step {first_spike}" in spike.evidence
    assert "rnn.weight_hh_l0" in spike.params
    assert any("recurrent weight drives them" in r for r in spike.remedies)
    assert spike.suggested["max_norm"] > 0
    # A warm-up that overshoots: the norm grows over steps while the learning rate rises, so
    # the learning rate is blamed, by the NaN finding and the spikes alike, with a lower lr.
    assert nonfinite.cause == spike.cause == "learning_rate"
    assert nonfinite.first_step == nonfinite.data["start"] < first_nan  # the growth began there
    assert nonfinite.severity == "error"
    assert f"Inf in the gradients at step {first_nan}" in nonfinite.evidence
    assert "while the learning rate rose" in nonfinite.evidence
    assert nonfinite.data["growth_per_step"] > 1.0
    assert 0 < nonfinite.suggested["lr"] < 1e-3 * 1.15**first_nan
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
    assert kinds(watch) == ["unused"]
    found = finding(watch, "unused")
    assert (found.cause, found.severity) == ("unused", "warning")
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
    # Layer 2's units never activate: it is named; layer 0 gets no signal through them and
    # 4.weight multiplies their zeros: victims, listed as such.
    assert (found.cause, found.params) == ("dead_units", ("2",))
    assert found.data["victims"] == 3
    assert "the units of `2` never activate for all 30 steps seen" in found.evidence
    assert "`4.weight`" in found.evidence and "victims, not the cause" in found.evidence
    assert any("LeakyReLU" in r for r in found.remedies)


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
    # The suggested threshold cuts every spike and spares the healthy steps (a 90th percentile
    # would clip 1 healthy step in 10). It is the median of the healthy log norms plus 3 robust
    # standard deviations (1.4826 MAD). The first 10x batch comes during the spike detector's
    # warm-up and is flagged all the same.
    max_norm = found.suggested["max_norm"]
    spikes = [r.global_norm for r in watch.history if r.spike]
    healthy = np.array([r.global_norm for r in watch.history if not r.spike])
    above = int(sum(healthy > max_norm))
    assert len(spikes) == 6 and min(spikes) > max_norm and above <= 1
    logs = np.log10(healthy)
    mad = np.median(np.abs(logs - np.median(logs)))
    # Read from a histogram of 0.01-wide log bins: one bin on the median and one on the MAD
    # (times 3 x 1.4826) bound the error by 10**(0.01 * (1 + 4.45)) - 1 = 13%.
    assert max_norm == pytest.approx(10 ** (np.median(logs) + 3 * 1.4826 * mad), rel=0.13)
    assert f"ClipNorm({max_norm:.3g}) would have scaled down 6 of the 6 spikes and {above} of " in (
        found.evidence
    )
    assert "3 robust standard deviations above the healthy steps' median norm" in found.evidence


# ----------------------------------------------------------------------------- wording


def _spiky_run(clip=None, *, nan_at=None, steps: int = 70) -> gw.GradWatch:
    """A small MLP at a tiny learning rate; gradients scaled at known steps (x2 and x40)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    detector = gw.SpikeDetector(warmup=10)
    watch = gw.GradWatch(
        model, sinks=[], clip=clip, on_nonfinite="skip", spike_detector=detector
    ).attach(opt)
    for step, (x, y) in enumerate(regression(steps)):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        with watch.backward(loss=loss):
            loss.backward()
        factor = {22: 2.0, 33: 2.0, 36: 40.0, 55: 2.0, 63: 40.0}.get(step, 1.0)
        torch._foreach_mul_([p.grad for p in model.parameters()], factor)
        if step == nan_at:
            model[0].weight.grad[0, 0] = math.nan
        opt.step()
    return watch


def test_spike_counts_come_from_one_source() -> None:
    """Small spikes (x2) and large ones (x40): the finding counts them all, as the summary does,
    and sizes each by the ratio it was recorded with."""
    watch = _spiky_run()
    health = watch.health_detector.report()
    summary = watch.close()
    found = finding(watch, "spike")
    assert summary.spikes == health.spike_count >= 2
    assert found.evidence.startswith(f"{summary.spikes} gradient-norm spikes flagged")
    top = max(health.spikes, key=lambda s: s.ratio)
    assert f"the largest ×{top.ratio:.3g} the recent healthy norm" in found.evidence


def test_the_demo_blames_the_record_not_the_learning_rate() -> None:
    """The demo's bad record (step 30): one spike out of steady gradients, under a warm-up that
    raised the learning rate x2.8 in 20 steps. The data is blamed; the learning rate is not."""
    from gradwatch import demo

    run = demo.train({}, demo.BAD_STEP + 10, sinks=[])
    found = {f.kind: f for f in run.summary.findings}
    assert {"nonfinite", "spike", "loss_spike"} <= set(found)
    for kind in ("nonfinite", "spike", "loss_spike"):
        assert found[kind].cause == "data", kind
    assert (
        "jumped" in found["nonfinite"].evidence
        and "one batch did it" in found["nonfinite"].evidence
    )
    assert found["nonfinite"].data["onset"] == demo.BAD_STEP
    assert found["spike"].remedies[0].startswith("inspect the batch of step 30")
    assert "lr" not in found["nonfinite"].suggested


def test_a_clipped_run_is_not_told_to_add_clipping() -> None:
    watch = _spiky_run(gw.ClipNorm(1.0), nan_at=47)
    watch.flush()
    health = watch.health_detector.report()
    config = watch.settings.clip.config()
    watch.close()
    assert 0 < health.clipped_steps < health.steps
    # With the clipper's settings, and from the clipped steps alone.
    for findings in (diagnose_health(health, clip=config), diagnose_health(health)):
        spike = next(f for f in findings if f.kind == "spike")
        nonfinite = next(f for f in findings if f.kind == "nonfinite")
        for f in findings:
            advice = [r for r in f.remedies if "ClipNorm(" in r or r.startswith("clip by norm")]
            assert advice == [] and not any("clip gradients" in r for r in f.remedies), f.kind
            assert "max_norm" not in f.suggested
        assert (
            f"{health.clipped_steps} of {health.steps} steps were scaled down, "
            f"{health.spikes_clipped} of the {health.spike_count} spikes among them"
        ) in spike.evidence
        assert any(r.startswith("clipping cannot undo NaN/Inf") for r in nonfinite.remedies)
    spike = next(f for f in diagnose_health(health, clip=config) if f.kind == "spike")
    assert "already clipped by ClipNorm(max_norm=1.0, norm_type=2.0)" in spike.evidence


def test_a_clipper_above_the_spikes_is_told_to_lower_its_threshold() -> None:
    watch = _spiky_run(gw.ClipNorm(1e6))
    watch.flush()
    health = watch.health_detector.report()
    watch.close()
    assert health.clipped_steps == 0  # the threshold never acted
    spike = next(
        f
        for f in diagnose_health(health, clip={"name": "ClipNorm", "max_norm": 1e6})
        if f.kind == "spike"
    )
    max_norm = spike.suggested["max_norm"]
    assert any(
        r.startswith(
            f"ClipNorm(max_norm=1000000.0) let {health.spike_count} spikes through: "
            f"lower max_norm to about {max_norm:.3g}"
        )
        for r in spike.remedies
    )
    assert all(s.value > max_norm for s in health.spikes if s.ratio > 10)


class WordLSTM(nn.Module):
    def __init__(self, vocab: int = 20, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim)
        self.decoder = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.lstm(self.embed(tokens))[0])


def test_an_lstm_is_not_told_to_use_an_lstm() -> None:
    torch.manual_seed(0)
    model = WordLSTM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, sinks=[]).attach(opt)
    gen = torch.Generator().manual_seed(0)
    for step in range(60):
        tokens = torch.randint(0, 20, (9, 4), generator=gen)
        opt.zero_grad()
        logits = model(tokens[:-1])
        nn.functional.cross_entropy(logits.reshape(-1, 20), tokens[1:].reshape(-1)).backward()
        if step in (35, 50):
            model.lstm.weight_hh_l0.grad.mul_(300.0)  # the recurrent weight drives a spike
        opt.step()
    found = finding(watch, "spike")
    assert "lstm.weight_hh_l0" in found.params
    (remedy,) = [r for r in found.remedies if "weight_hh" in r]
    assert remedy.startswith(
        "the LSTM's recurrent weight `lstm.weight_hh_l0` drives them (the cell is already gated)"
    )
    assert not any("use an LSTM" in r for r in found.remedies)
    # Vanishing: an LSTM is pointed at its forget gate, a plain RNN at gated cells.
    health = watch.health_detector.report()
    watch.close()
    ratio = health.ratio_log.copy()
    ratio[health.names.index("lstm.weight_hh_l0")] = -12.0  # below the floor
    (vanishing,) = diagnose_health(replace(health, ratio_log=ratio))[:1]
    assert vanishing.kind == "vanishing"
    assert any("forget-gate biases to 1" in r for r in vanishing.remedies)
    assert not any("instead of a plain" in r for r in vanishing.remedies)
    plain = replace(health, types=tuple("RNN" if t == "LSTM" else t for t in health.types))
    (vanishing,) = diagnose_health(replace(plain, ratio_log=ratio))[:1]
    assert "for recurrence, use an LSTM/GRU instead of a plain RNN" in vanishing.remedies


def _record(step: int, value: float, rise: float | None = 1.0, lr: float | None = 1.0):
    return SpikeRecord(step, value, value, (), rise, lr)


@pytest.mark.parametrize(
    ("records", "cause", "reason"),
    [
        ([_record(30, 1e4, lr=2.8)], "data", "a single spike out of steady gradients"),
        ([_record(30, 50.0), _record(31, 20.0)], "data", "the largest spike first out of"),
        ([_record(30, 50.0, rise=2.5)], "learning_rate", "gradient norm rose steadily ×2.5"),
        ([_record(30, 5.0), _record(31, 50.0)], "learning_rate", "spikes grew from 5 at step 30"),
        ([_record(30, 9.0, lr=3.0), _record(32, 8.0)], "learning_rate", "learning rate rose ×3"),
        ([_record(30, 9.0, lr=3.0), _record(32, 5.0, lr=3.0)], "learning_rate", "rose ×3"),
        ([_record(30, 50.0), _record(31, 60.0)], "data", "spikes that do not grow, out of"),
    ],
)
def test_spike_episodes_blame_the_learning_rate_only_on_evidence(records, cause, reason) -> None:
    (episode,) = episodes(records)
    assert episode.cause == cause
    assert reason in episode.reason


@pytest.mark.parametrize("forensics", [False, True])
def test_a_forward_nan_never_names_its_first_victim(forensics: bool) -> None:
    """A NaN in one input batch reaches the output layer's parameters first in backward: they
    are victims. Without forensics the place is unknown (and the evidence says how to learn it);
    with forensics it is the input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    batches = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(20)]
    batches[12][0][2, 1] = float("nan")
    sink = Events()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = train(model, batches, opt, sinks=[sink], forensics=forensics)
    finding = next(f for f in watch.diagnose() if f.kind == "nonfinite")
    assert finding.cause == "data"
    assert finding.first_step == 12
    event = next(e for e in sink.events if e.kind == "nonfinite")
    assert event.cause == "data"
    if forensics:
        assert finding.params[:1] == ("input",)
        assert "from the input" in event.message
    else:
        assert finding.params == ()
        assert "forensics=True" in finding.evidence
        assert "from the forward pass" in event.message
