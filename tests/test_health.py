"""Per-layer health statistics are the numbers they claim to be.

The 20-layer chain of equal Linear+ReLU layers (gain 2.34 per layer) is worked by hand: every unit
of layer k carries 2.34^k times the input mean, so the gradient flowing into layer k's output is
2.34^(20-k) times the loss gradient. The weight gradient (signal × input) is then the same at every
depth while the bias gradient (the signal summed over the batch) grows ×2.34 per layer towards the
input, and so does the backpropagated signal.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw

GAIN = 2.34


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny layers: threads only add synchronisation (and on a shared box, waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chain(depth: int = 20, width: int = 4, bias: bool = True) -> nn.Sequential:
    """The textbook chain: ``depth`` Linear layers with every weight ``GAIN / width``, ReLUs."""
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(width, width if i < depth - 1 else 1, bias=bias)
        nn.init.constant_(linear.weight, GAIN / width)
        if bias:
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _chain_batch(width: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = (0.5 + torch.rand(32, width, generator=gen)) * GAIN**-20
    return x, torch.full((32, 1), 3.0)


def test_hand_worked_chain_weight_grads_flat_bias_grads_geometric() -> None:
    model = chain()
    x, y = _chain_batch()
    watch = gw.GradWatch(model, sinks=[], forensics=True)
    loss = nn.functional.mse_loss(model(x), y)
    with watch.backward(loss=loss):
        loss.backward()
    watch.flush()  # emitted rows reach the detector (in batches otherwise)
    health = watch.health_detector.report()
    log = dict(zip(health.names, health.grad_log))
    hidden = range(0, 36, 2)  # Linear layers 0..17 of 19 (sequential indices 0, 2, ..., 36)
    weights = np.array([log[f"{i}.weight"] for i in hidden])
    biases = np.array([log[f"{i}.bias"] for i in hidden])
    # Weight gradients: the same at every hidden depth (to float32 rounding); the first layer's
    # input is the data, not a uniform signal, so it differs by a hair.
    assert np.ptp(weights[1:]) < 1e-5
    assert abs(weights[0] - weights[1]) < 1e-3
    # Bias gradients: ×2.34 per layer towards the input (index 0 is nearest the input).
    np.testing.assert_allclose(-np.diff(biases), math.log10(GAIN), atol=1e-5)
    # The same through the torch gradients themselves (the statistic is not inventing it).
    b0, b2 = model[0].bias.grad.norm().item(), model[2].bias.grad.norm().item()
    assert b0 / b2 == pytest.approx(GAIN, rel=1e-5)
    # Backpropagated signal (forensics): max |dloss/doutput| grows ×2.34 per Linear.
    signal = dict(zip(health.signal_modules, health.signal_log))
    steps = np.diff([signal[str(i)] for i in hidden])
    np.testing.assert_allclose(-steps, math.log10(GAIN), atol=1e-5)
    # Activations: ×2.34 per Linear forwards.
    activation = dict(zip((*health.signal_modules, "<input>"), health.activation_log))
    np.testing.assert_allclose(
        np.diff([activation[str(i)] for i in hidden]), math.log10(GAIN), atol=1e-5
    )
    # Backward order is nearest the loss first: the head's parameters arrive first.
    assert health.names[health.backward_order[0]].startswith("38.")
    watch.close()


def test_gradient_to_weight_and_update_ratios_match_torch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    watch = gw.GradWatch(model, sinks=[]).attach(opt)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    grads = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    weights = {n: p.detach().norm().item() for n, p in model.named_parameters()}
    layer = {
        m: math.sqrt(sum(v**2 for n, v in weights.items() if n.startswith(m + "."))) for m in "02"
    }
    opt.step()
    watch.flush()
    health = watch.health_detector.report()
    assert health.update_rule == "sgd"
    for i, name in enumerate(health.names):
        assert 10 ** health.ratio_log[i] == pytest.approx(grads[name] / weights[name], rel=1e-5)
        expected = lr * grads[name] / layer[name.split(".")[0]]
        assert 10 ** health.update_log[i] == pytest.approx(expected, rel=1e-5)
        assert health.update_max_step[i] == 0
    watch.close()


def _reference_streaks(pattern: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Streak, missing-in-streak and start step per parameter, one step at a time."""
    n = pattern.shape[1]
    streak, missing, since = np.zeros(n, int), np.zeros(n, int), np.full(n, -1)
    for step, row in enumerate(pattern):
        for j, state in enumerate(row):
            if state == 0:  # alive
                streak[j], missing[j], since[j] = 0, 0, -1
            else:
                if streak[j] == 0:
                    since[j] = step
                streak[j] += 1
                missing[j] += state == 2
    return streak, missing, since


def test_dead_streaks_match_a_step_by_step_reference() -> None:
    """Vectorised streaks over batches equal the obvious per-step loop (random patterns)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    params = list(model.parameters())
    rng = np.random.default_rng(0)
    steps = 90  # crosses two 32-step batches and ends mid-batch
    pattern = rng.choice(3, size=(steps, len(params)), p=[0.5, 0.3, 0.2])  # alive/zero/None
    pattern[:, 0] = 0  # one parameter always alive: a step always has some gradient
    pattern[40:, 3] = 1  # a long zero run
    pattern[20:, 4] = 2  # a long missing run
    watch = gw.GradWatch(model, sinks=[])
    x = torch.randn(8, 4)
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        for p, state in zip(params, pattern[step]):
            if state == 1:
                p.grad.zero_()
            elif state == 2:
                p.grad = None
        watch.check()
    watch.flush()
    health = watch.health_detector.report()
    streak, missing, since = _reference_streaks(pattern)
    np.testing.assert_array_equal(health.dead_streak, streak)
    np.testing.assert_array_equal(health.dead_missing, missing)
    np.testing.assert_array_equal(health.dead_since, since)
    assert health.ever_alive.tolist() == (pattern == 0).any(axis=0).tolist()
    watch.close()


def _train(model, opt, watch, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        with watch.backward(loss=loss):
            loss.backward()
        opt.step()


def test_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen))]
    batches = [(x * (30.0 if i == 50 else 1.0), y) for i, (x, y) in enumerate(batches * 70)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, sinks=[], forensics=True).attach(opt)
    _train(model, opt, watch, batches[:37])
    watch.flush()
    state = watch.health_detector.state_dict()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.01)
    twin_opt.load_state_dict(opt.state_dict())
    resumed = gw.GradWatch(twin, sinks=[], forensics=True).attach(twin_opt)
    resumed.load_state_dict(watch.state_dict())
    resumed.health_detector.load_state_dict(state)
    _train(model, opt, watch, batches[37:])
    _train(twin, twin_opt, resumed, batches[37:])
    watch.flush()
    resumed.flush()
    a, b = watch.health_detector.state_dict(), resumed.health_detector.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key
    assert a["spike_count"] >= 1  # the step with 30x inputs was seen by both
    assert watch.diagnose() == resumed.diagnose()
    watch.close()
    resumed.close()


def test_state_dict_refuses_other_parameters() -> None:
    small = gw.GradWatch(nn.Linear(2, 2), sinks=[])
    big = gw.GradWatch(nn.Linear(3, 3, bias=False), sinks=[])
    with pytest.raises(ValueError, match="HealthDetector state covers 2 parameters"):
        big.health_detector.load_state_dict(small.health_detector.state_dict())


def test_health_detector_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="dead_after must be an int >= 1, got 0"):
        gw.HealthDetector(dead_after=0)
    with pytest.raises(TypeError, match="health_detector must be a HealthDetector"):
        gw.GradWatch(nn.Linear(2, 2), sinks=[], health_detector=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="forensics must be True or False"):
        gw.GradWatch(nn.Linear(2, 2), sinks=[], forensics=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"forensics=True needs the model as an nn\.Module"):
        gw.GradWatch(nn.Linear(2, 2).named_parameters(), sinks=[], forensics=True)


# ------------------------------------------------------------------------------ resume, context


def _resumable() -> tuple[nn.Module, torch.optim.Optimizer, gw.GradWatch]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    detector = gw.SpikeDetector(warmup=6)
    watch = gw.GradWatch(
        model, sinks=[], on_nonfinite="skip", forensics=True, spike_detector=detector
    )
    return model, opt, watch.attach(opt)


def _faulty_steps(model, opt, watch, start: int, stop: int) -> None:
    """Steps with two gradient spikes (27, 58) and a NaN gradient (44, skipped)."""
    for step in range(start, stop):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        with watch.backward(loss=loss):
            loss.backward()
        if step in (27, 58):
            _scale_grads(model, 30.0)
        if step == 44:
            model[0].bias.grad[0] = math.nan
        opt.step()


def _scale_grads(model: nn.Module, factor: float) -> None:
    torch._foreach_mul_([p.grad for p in model.parameters()], factor)


def test_resume_mid_batch_is_bit_identical_to_an_uninterrupted_run() -> None:
    """A checkpoint at step 20, mid-way through a 32-step batch, changes no bit of the report.

    The statistics are sums over steps: absorbed as one batch sum they rounded differently when
    ``state_dict()`` cut the batch at the checkpoint, so a resumed run drifted in the last bits.
    """
    model, opt, watch = _resumable()
    _faulty_steps(model, opt, watch, 0, 70)
    expected, expected_findings = watch.health_detector.report(), watch.diagnose()
    watch.close()
    assert {"nonfinite", "spike"} <= {f.kind for f in expected_findings}

    model, opt, watch = _resumable()
    _faulty_steps(model, opt, watch, 0, 20)
    checkpoint = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "gw": watch.state_dict()}
    )
    watch.close()
    model, opt, watch = _resumable()
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    watch.load_state_dict(checkpoint["gw"])
    _faulty_steps(model, opt, watch, 20, 70)
    report = watch.health_detector.report()
    for field in dataclasses.fields(report):
        _assert_same(getattr(expected, field.name), getattr(report, field.name), field.name)
    assert [f.evidence for f in watch.diagnose()] == [f.evidence for f in expected_findings]
    watch.close()


def test_spikes_record_the_rise_before_them_and_the_learning_rate_change() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    watch = gw.GradWatch(model, sinks=[]).attach(opt)

    def lr(step: int) -> float:
        return 1e-3 * (1 + step / 10)

    for step in range(60):
        opt.param_groups[0]["lr"] = lr(step)
        gen = torch.Generator().manual_seed(step)
        opt.zero_grad()
        nn.functional.mse_loss(
            model(torch.randn(32, 4, generator=gen)), torch.ones(32, 1)
        ).backward()
        if step == 45:
            _scale_grads(model, 40.0)
        opt.step()
    watch.flush()
    health = watch.health_detector.report()
    (spike,) = [s for s in health.spikes if s.step == 45]
    # The learning rate of the step before over the one 20 steps before that (known exactly).
    assert spike.lr_change == pytest.approx(lr(44) / lr(25), rel=1e-12)
    assert 0.5 < spike.rise < 2.0  # steady gradients before the bad batch
    watch.close()


def test_clipped_steps_and_clipped_spikes_are_counted() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    watch = gw.GradWatch(model, sinks=[], clip=gw.ClipNorm(2.5)).attach(opt)
    for step in range(50):
        gen = torch.Generator().manual_seed(step)
        opt.zero_grad()
        nn.functional.mse_loss(
            model(torch.randn(32, 4, generator=gen)), torch.ones(32, 1)
        ).backward()
        if step in (30, 40):
            _scale_grads(model, 40.0)
        opt.step()
    watch.flush()
    health = watch.health_detector.report()
    history = list(watch.history)
    summary = watch.close()
    assert 0 < health.clipped_steps == summary.clipped_steps < summary.steps
    assert health.spikes_clipped == sum(r.spike and r.clipped for r in history) >= 2
    assert health.calm_steps == sum(math.isfinite(r.global_norm) and not r.spike for r in history)


@pytest.mark.parametrize(
    ("growth", "noise", "expected"),
    [(1.05, 0.0, 1.05**19), (1.0, 0.3, 1.0)],
    ids=["steady-growth", "flat-noise"],
)
def test_rise_is_the_steady_trend_of_the_healthy_norm(growth, noise, expected) -> None:
    """Known gradients: x1.05 a step for 20 healthy steps is a rise of 1.05^19; noise is none."""
    model = nn.Linear(1, 1, bias=False)
    watch = gw.GradWatch(model, sinks=[], spike_detector=gw.SpikeDetector(min_ratio=50.0))
    rng = np.random.default_rng(0)
    for step in range(40):
        value = 1e6 if step == 39 else growth**step * (1 + noise * rng.uniform(-1, 1))
        model.weight.grad = torch.full((1, 1), value)
        watch.check()
    watch.flush()
    (spike,) = watch.health_detector.report().spikes
    assert spike.step == 39
    assert spike.rise == pytest.approx(expected, rel=1e-5)
    watch.close()


def _assert_same(a, b, name: str) -> None:
    """Exactly equal (not allclose), through arrays, tuples of arrays and dicts of them."""
    if isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=name)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), name
        for key in a:
            _assert_same(a[key], b[key], f"{name}[{key}]")
    elif isinstance(a, tuple) and a and isinstance(a[0], np.ndarray):
        assert len(a) == len(b), name
        for x, y in zip(a, b):
            _assert_same(x, y, name)
    else:
        assert a == b, name
