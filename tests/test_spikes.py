"""Spikes against the run's own history: flagged at the injected step and not before; policies.

The detector is judged on small real runs: healthy ones (the README example, noisy small-batch SGD,
a BatchNorm CNN with biased convs, an LSTM LM with clipping, a GPT under warm-up and cosine decay,
a StepLR run, a residual net, AdamW) raise no spike and no loss spike over several seeds, while an
outlier batch is flagged at its step and a divergence that starts at step 0 is flagged while the
norm is blowing up.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import mlp
from torch import nn

import gradwatch as gw

# attach() wraps optimizer.step, which the LR schedulers mistake for a misordered call.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)`:UserWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models run faster on one thread, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(watch: gw.GradWatch, model, steps: int, spike_at: int, factor: float = 50.0):
    reports = []
    for step in range(steps):
        model.zero_grad()
        gen = torch.Generator().manual_seed(step)
        model(torch.randn(16, 8, generator=gen)).pow(2).mean().backward()
        if step == spike_at:
            model[2].weight.grad.mul_(factor)
        reports.append(watch.check())
    return reports


def test_spike_flagged_at_step_k_and_not_before() -> None:
    model = mlp(depth=2)
    watch = gw.GradWatch(model, sinks=[])
    reports = _run(watch, model, 60, spike_at=45)
    flags = [r.step for r in reports if r.spike]
    assert flags == [45]
    spike = reports[45]
    assert spike.spike_params[0] == "2.weight"  # the parameter driving it, named first
    assert spike.spike_threshold is not None and spike.global_norm > spike.spike_threshold
    # No threshold before the first value; during the warm-up, one far above every norm so far.
    assert reports[0].spike_threshold is None
    first = reports[0].global_norm
    assert all(r.spike_threshold > 5 * max(first, r.global_norm) for r in reports[1:25])


def test_spike_detector_matches_its_rule_on_a_hand_sequence() -> None:
    """Level and spread of log(value); the warm-up bar from step changes; spikes enter capped."""
    det = gw.SpikeDetector(alpha=0.5, z_threshold=2.0, warmup=3, min_ratio=4.0, warmup_ratio=3.0)
    assert det.threshold is None
    assert det.update(1.0) is False and det.threshold == pytest.approx(3.0)  # x3 the level
    assert det.update(math.e) is False
    # log-values 0, 1: level 0.5, variance 0.25, squared step change 1 (spread sqrt(1/2))
    assert det.mean == pytest.approx(0.5) and det.var == pytest.approx(0.25)
    assert det.threshold == pytest.approx(math.exp(0.5 + 2.0 * math.sqrt(0.5)))  # 2 step changes
    assert det.update(1.0) is False  # warm-up over: level 0.25, variance 0.1875
    assert det.mean == pytest.approx(0.25) and det.var == pytest.approx(0.1875)
    bar = 0.25 + max(2.0 * math.sqrt(0.1875), math.log(4.0))  # the ratio wins: x4 the level
    assert det.threshold == pytest.approx(math.exp(bar))
    assert det.update(6.0) is True  # a spike enters the level at the threshold,
    assert det.mean == pytest.approx(0.5 * 0.25 + 0.5 * bar)
    assert det.var == pytest.approx(0.5 * (0.1875 + 0.5 * 0.1875))  # the spread as one spread
    mean = det.mean
    for ignored in (math.nan, math.inf, 0.0, -3.0):  # never a spike, never in the statistics
        assert det.update(ignored) is False
    assert det.mean == mean and det.count == 4


def test_an_outlier_during_warmup_is_flagged_and_does_not_blind_the_detector() -> None:
    rng = np.random.default_rng(0)
    values = 1.0 + 0.05 * rng.standard_normal(80)
    values[10] = 100.0  # a bad batch inside the 25-step warm-up: x100 everything seen so far
    values[40] = 5.0  # a later spike that a raw warm-up variance would hide
    det = gw.SpikeDetector()
    flags = [i for i, v in enumerate(values) if det.update(float(v))]
    assert flags == [10, 40]
    # The x100 batch entered capped: the level is still that of the healthy values.
    assert det.update(1.0) is False and math.exp(det.mean) == pytest.approx(1.0, rel=0.1)


def test_recurring_bad_batches_stay_flagged_and_a_lasting_shift_stops_being_one() -> None:
    """A x20 batch every 9th step is flagged every time: spikes do not widen the spread. A lasting
    x5 shift of the level is flagged at first, then becomes the new level."""
    det = gw.SpikeDetector()
    wobble = [1.0 + 0.1 * math.sin(step) for step in range(900)]
    values = [v * (20.0 if step % 9 == 0 and step > 30 else 1.0) for step, v in enumerate(wobble)]
    flags = [step for step, v in enumerate(values) if det.update(v)]
    assert flags == [step for step in range(31, 900) if step % 9 == 0]
    det = gw.SpikeDetector()
    flags = [
        step for step, v in enumerate(wobble[:100] + [5 * v for v in wobble[:300]]) if det.update(v)
    ]
    assert flags[0] == 100 and 5 <= len(flags) <= 30 and flags[-1] < 140


def test_early_transients_of_a_healthy_run_are_not_spikes() -> None:
    """A model leaving its initialisation: the norm x2-5 in the first steps, or falling x10."""
    rising = [0.2, 0.5, 0.9, 1.0, 0.8, 1.1, 0.9] + [1.0] * 40
    falling = [10.0, 6.0, 3.0, 2.0, 1.2, 1.0, 1.3, 0.9, 1.1] + [1.0, 1.2, 0.9] * 15
    for values in (rising, falling):
        det = gw.SpikeDetector()
        assert not any(det.update(v) for v in values)


def test_geometric_growth_from_step_zero_is_flagged_while_it_grows() -> None:
    """x3 per step from step 0 (learning rate too high): flagged soon after it reached x10."""
    det = gw.SpikeDetector()
    flags = [step for step in range(12) if det.update(0.5 * 3.0**step)]
    assert flags and flags[0] <= 4  # 0.5 * 3**3 = 27x the first step's norm at step 3


def test_detector_state_round_trips_mid_run() -> None:
    """Saved during the warm-up and after it, a restored detector continues identically."""
    rng = np.random.default_rng(1)
    values = np.exp(0.4 * rng.standard_normal(120))
    values[[7, 50, 90]] *= [30.0, 20.0, 50.0]
    values[60] = math.nan
    for cut in (5, 30, 70):
        straight = gw.SpikeDetector()
        expected = [(straight.update(v), straight.threshold) for v in values]
        first = gw.SpikeDetector()
        got = [(first.update(v), first.threshold) for v in values[:cut]]
        resumed = gw.SpikeDetector()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        got += [(resumed.update(v), resumed.threshold) for v in values[cut:]]
        assert got == expected
        assert [i for i, (spike, _) in enumerate(expected) if spike] == [7, 50, 90]


def test_a_state_saved_before_the_log_scale_still_loads() -> None:
    """Checkpoints of the raw-value detector (mean, var, warm list) are converted, not refused."""
    during = gw.SpikeDetector()
    during.load_state_dict({"count": 3, "mean": 0.0, "var": 0.0, "warm": [1.0, 1.1, 0.9]})
    assert during.count == 3 and math.exp(during.mean) == pytest.approx(1.0, rel=0.05)
    after = gw.SpikeDetector()
    after.load_state_dict({"count": 40, "mean": 2.0, "var": 0.04, "warm": []})
    assert after.count == 40 and math.exp(after.mean) == pytest.approx(2.0, rel=0.05)
    assert after.update(2.1) is False and after.update(40.0) is True


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": 1.0}, ValueError, r"alpha must be a number in \(0, 1\), got 1.0"),
        ({"z_threshold": 0}, ValueError, r"z_threshold must be a finite number > 0, got 0"),
        ({"warmup": 0}, ValueError, r"warmup must be an int >= 1, got 0"),
        ({"min_ratio": 0.5}, ValueError, r"min_ratio must be a finite number >= 1, got 0.5"),
        ({"warmup_ratio": math.inf}, ValueError, r"warmup_ratio must be .* >= 1, got inf"),
        ({"min_ratio": "3"}, TypeError, r"min_ratio must be a finite number >= 1, got '3'"),
    ],
)
def test_detector_arguments_are_validated(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        gw.SpikeDetector(**kwargs)


def test_on_spike_clip_rescales_to_threshold() -> None:
    model = mlp(depth=2)
    watch = gw.GradWatch(model, on_spike="clip", sinks=[])
    reports = _run(watch, model, 40, spike_at=35)
    spike = reports[35]
    assert spike.spike and spike.clip_coef < 1.0
    assert spike.clipped_norm == pytest.approx(spike.spike_threshold, rel=1e-4)
    grads = [p.grad for p in model.parameters()]  # the last step's grads are the clipped ones
    assert all(r.clip_coef == 1.0 for r in reports[:35])
    assert torch.isfinite(torch.nn.utils.get_total_norm(grads))


def test_on_spike_skip_and_raise() -> None:
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, on_spike="skip", sinks=[]).attach(opt)
    for step in range(35):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        if step == 30:
            model[0].weight.grad.mul_(100.0)
            before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        if step == 30:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert [r.step for r in watch.history if r.skipped] == [30]
    assert watch.history[30].skip_reason == "gradient norm spike"

    model = mlp(depth=2)
    watch = gw.GradWatch(model, on_spike="raise", sinks=[])
    with pytest.raises(gw.GradientSpikeError, match="step 30") as info:
        _run(watch, model, 35, spike_at=30, factor=100.0)
    assert info.value.step == 30 and info.value.global_norm > info.value.threshold


def test_loss_spike_detected_when_loss_given() -> None:
    model = mlp(depth=1)
    watch = gw.GradWatch(model, sinks=[])
    for step in range(40):
        model.zero_grad()
        loss = model(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        watch.check(loss=loss * (30.0 if step == 33 else 1.0))
    flagged = [r.step for r in watch.history if r.loss_spike]
    assert flagged == [33]
    assert watch.history[33].loss == pytest.approx(watch.history[33].loss)
    assert all(r.loss is not None for r in watch.history)


def test_culprits_are_named_only_when_they_stand_out() -> None:
    from gradwatch.detect.spikes import ParamBaseline

    baseline = ParamBaseline(5)
    baseline.update(np.ones(5))
    # Every parameter grew x100: a chain of equal layers. Naming three of them would be arbitrary.
    assert baseline.culprits(np.full(5, 100.0)).size == 0
    assert baseline.growth(np.full(5, 100.0)) == pytest.approx(100.0)
    # One parameter grew x50 while the others doubled: it is named, alone.
    assert baseline.culprits(np.array([2.0, 2.0, 50.0, 2.0, 2.0])).tolist() == [2]


def test_a_spike_does_not_enter_the_parameters_baselines() -> None:
    """A x50 step is named a spike and leaves every parameter's baseline as it was."""
    model = mlp(depth=2)
    watch = gw.GradWatch(model, sinks=[])
    baselines = []
    for step in range(45):
        model.zero_grad()
        gen = torch.Generator().manual_seed(step)
        model(torch.randn(16, 8, generator=gen)).pow(2).mean().backward()
        if step == 40:
            for p in model.parameters():
                p.grad.mul_(50.0)
        report = watch.check()
        watch.flush()
        baselines.append(watch._emission.baseline.ema.copy())
    assert report.step == 44 and [r.step for r in watch.history if r.spike] == [40]
    assert np.array_equal(baselines[40], baselines[39])  # unchanged by the spike
    assert not np.array_equal(baselines[41], baselines[40])  # healthy steps go on updating it
    watch.close()


# ------------------------------------------------------------------ small real runs, judged


def _bars(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of 4 classes, each a bright bar at its own row, in noise."""
    labels = torch.randint(0, 4, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 1, 16, 16, generator=gen)
    for i, label in enumerate(labels.tolist()):
        x[i, 0, 1 + 3 * label : 3 + 3 * label, :] += 1.0
    return x, labels


def _warmup_cosine(opt: torch.optim.Optimizer, warm: int, steps: int):
    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (t - warm) / (steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class _Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class _GPT(nn.Module):
    def __init__(self, vocab: int = 16, context: int = 12, dim: int = 32) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(context, dim))
        self.ln1, self.ln2, self.ln = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.size(1))
        x = self.tok(tokens) + self.pos[: tokens.size(1)]
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln(x)).flatten(0, 1)


class _WordLSTM(nn.Module):
    def __init__(self, vocab: int, dim: int = 32) -> None:
        super().__init__()
        self.embed, self.lstm, self.decoder = (
            nn.Embedding(vocab, dim),
            nn.LSTM(dim, dim),
            nn.Linear(dim, vocab),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.lstm(self.embed(tokens))[0]).flatten(0, 1)


_TEXT = " ".join(
    (
        "the cat sat on the mat and the dog sat on the rug . the cat saw the dog and the dog saw",
        "the cat . a bird flew over the house and the cat watched the bird . the dog slept .",
    )
).split(" ")


def _setup(name: str, seed: int, lr_scale: float = 1.0):
    """(model, optimizer, scheduler, batch(step) -> (x, y), loss_fn, watcher kwargs)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ce, mse = nn.functional.cross_entropy, nn.functional.mse_loss
    if name == "readme":  # the README's Reports example: i.i.d. gradients, no optimizer
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
        return model, None, None, lambda t: (torch.randn(16, 8, generator=gen), None), None, {}
    if name == "noisy_sgd":  # batch 4, noisy targets
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
        w = torch.randn(10, 1, generator=gen)

        def batch(t):
            x = torch.randn(4, 10, generator=gen)
            return x, x @ w + 0.5 * torch.randn(4, 1, generator=gen)

        return model, torch.optim.SGD(model.parameters(), lr=0.02), None, batch, mse, {}
    if name == "bn_cnn":  # Conv2d(bias=True) before BatchNorm, warm-up + cosine
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
        )  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=0.1 * lr_scale, momentum=0.9)
        return model, opt, _warmup_cosine(opt, 20, 150), lambda t: _bars(32, gen), ce, {}
    if name == "lstm":  # word LM, SGD lr 20 with clipping at 0.25 (PyTorch's example)
        vocab = sorted(set(_TEXT))
        ids = torch.tensor([vocab.index(w) for w in _TEXT] * 8)
        data = ids[: ids.numel() // 4 * 4].view(4, -1).t()
        model = _WordLSTM(len(vocab))

        def batch(t):
            start = (12 * t) % (data.size(0) - 13)
            return data[start : start + 12], data[start + 1 : start + 13].flatten()

        opt = torch.optim.SGD(model.parameters(), lr=20.0)
        return model, opt, None, batch, ce, {"clip": gw.ClipNorm(0.25)}
    if name == "gpt":  # AdamW, warm-up then cosine decay; noisy counting sequences
        model = _GPT()

        def batch(t):
            seq = (torch.randint(0, 16, (8, 1), generator=gen) + torch.arange(13)) % 16
            noise = torch.randint(0, 16, seq.shape, generator=gen)
            seq = torch.where(torch.rand(seq.shape, generator=gen) < 0.9, seq, noise)
            return seq[:, :-1], seq[:, 1:].flatten()

        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        return model, opt, _warmup_cosine(opt, 20, 150), batch, ce, {}
    if name == "steplr":  # SGD momentum, learning rate / 10 at step 60
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
        w = torch.randn(20, 10, generator=gen)

        def batch(t):
            x = torch.randn(32, 20, generator=gen)
            return x, (x @ w).argmax(1)

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, 60, gamma=0.1), batch, ce, {}
    if name == "resnet":  # residual MLP, AdamW
        model = nn.Sequential(
            nn.Linear(16, 32), *[_Residual(32) for _ in range(4)], nn.Linear(32, 1)
        )
        w = torch.randn(16, 1, generator=gen)

        def batch(t):
            x = torch.randn(32, 16, generator=gen)
            return x, torch.sin(x @ w) + 0.1 * torch.randn(32, 1, generator=gen)

        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, batch, mse, {}
    if name in ("mlp_lr", "mlp_record"):  # SGD regression; lr too high, or one record x1000
        model = nn.Sequential(
            nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
        )
        w = torch.randn(10, 1, generator=gen)

        def batch(t):
            x = torch.randn(32, 10, generator=gen)
            y = 3.0 * (x @ w)
            if name == "mlp_record" and t == 31:  # a record entered in mm instead of m
                x, y = x.clone(), y.clone()
                x[3], y[3] = 1000.0 * x[3], 1000.0 * y[3]
            return x, y

        opt = torch.optim.SGD(model.parameters(), lr=0.08 if name == "mlp_lr" else 0.01)
        return model, opt, None, batch, mse, {}
    raise AssertionError(name)


def _train(name: str, seed: int, steps: int, *, boost_at: int | None = None, factor: float = 1.0,
           lr_scale: float = 1.0, loss_factor: float = 1.0) -> list:  # fmt: skip
    """Train ``steps`` steps watched with default detectors; optionally multiply the gradients
    (and the loss given to the watcher) of step ``boost_at``. Returns the step reports."""
    model, opt, sched, batch, loss_fn, kwargs = _setup(name, seed, lr_scale)
    watch = gw.GradWatch(model, sinks=[], history=steps, **kwargs)
    if opt is not None:
        watch.attach(opt)
    for step in range(steps):
        x, y = batch(step)
        out = model(x)
        loss = out.pow(2).mean() if loss_fn is None else loss_fn(out, y)
        if opt is not None:
            opt.zero_grad()
        given = loss.detach() * (loss_factor if step == boost_at else 1.0)
        if opt is None:  # the README's loop: backward, check, zero_grad
            loss.backward()
            _boost(model, factor if step == boost_at else 1.0)
            watch.check(loss=given)
            model.zero_grad()
        else:
            with watch.backward(loss=given):  # attached: the check runs in opt.step()
                loss.backward()
            _boost(model, factor if step == boost_at else 1.0)
            opt.step()
        if sched is not None:
            sched.step()
    watch.close()
    return list(watch.history)


def _boost(model: nn.Module, factor: float) -> None:
    if factor != 1.0:
        for p in model.parameters():
            p.grad.mul_(factor)


HEALTHY = {
    "readme": 200,
    "noisy_sgd": 300,
    "bn_cnn": 150,
    "lstm": 200,
    "gpt": 150,
    "steplr": 180,
    "resnet": 200,
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_runs_raise_no_spike_and_no_loss_spike(name: str, seed: int) -> None:
    """The old z-score on the raw norm flagged ~1 % of these steps; none of them is a spike."""
    reports = _train(name, seed, HEALTHY[name])
    assert len(reports) == HEALTHY[name]
    assert [r.step for r in reports if r.spike] == []
    assert [r.step for r in reports if r.loss_spike] == []


@pytest.mark.parametrize("factor", [10.0, 50.0])
@pytest.mark.parametrize(
    ("name", "at"), [("readme", 120), ("resnet", 90), ("gpt", 100), ("steplr", 150)]
)
def test_an_outlier_batch_in_a_steady_run_is_flagged_at_its_step(name, at, factor) -> None:
    reports = _train(name, 0, at + 5, boost_at=at, factor=factor, loss_factor=factor)
    assert [r.step for r in reports if r.spike] == [at]
    assert [r.step for r in reports if r.loss_spike] == [at]
    assert reports[at].global_norm > reports[at].spike_threshold


def test_a_record_1000x_too_large_is_flagged_at_its_step() -> None:
    reports = _train("mlp_record", 0, 34)
    first = next(r.step for r in reports if r.spike)
    assert first == 31 and reports[31].loss_spike


def test_learning_rate_too_high_from_step_zero_is_flagged_while_the_norm_blows_up() -> None:
    """SGD, lr too high: the norm grows x2-5 per step and is Inf within ~10 steps."""
    reports = _train("mlp_lr", 0, 12)
    norms = np.array([r.global_norm for r in reports])
    grown = int(np.argmax(norms >= 10 * norms[0]))  # the growth is unmistakable here
    nonfinite = int(np.argmax(~np.isfinite(norms)))
    assert norms[grown] >= 10 * norms[0] and nonfinite > grown + 1
    first = next(r.step for r in reports if r.spike)
    assert first <= grown + 1 and first < nonfinite


def test_peak_lr_100x_too_high_under_warmup_is_flagged_during_the_warmup() -> None:
    """The BatchNorm CNN at 100x its peak learning rate: the norm grows x20-30 in 20 steps."""
    reports = _train("bn_cnn", 0, 30, lr_scale=100.0)
    norms = np.array([r.global_norm for r in reports])
    early = float(np.median(norms[:5]))
    grown = int(np.argmax(norms >= 10 * early))
    assert norms[grown] >= 10 * early and norms.max() > 20 * early  # it did blow up
    first = next(r.step for r in reports if r.spike)
    assert grown <= first <= grown + 3 and first < 25  # inside the old detector's warm-up
