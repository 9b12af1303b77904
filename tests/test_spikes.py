"""Spikes against the run's own history: flagged at the injected step and not before; policies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import mlp

import gradwatch as gw


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
    # Warm-up: no threshold and no spike before 25 finite steps.
    assert all(r.spike_threshold is None for r in reports[:25])


def test_spike_detector_matches_its_rule_on_a_hand_sequence() -> None:
    det = gw.SpikeDetector(alpha=0.5, z_threshold=2.0, warmup=3, min_ratio=1.0)
    assert [det.update(v) for v in (1.0, 2.0, 3.0)] == [False, False, False]
    assert det.mean == pytest.approx(2.0) and det.var == pytest.approx(2.0 / 3.0)
    threshold = 2.0 + 2.0 * math.sqrt(2.0 / 3.0)
    assert det.threshold == pytest.approx(threshold)
    assert det.update(10.0) is True  # outlier: enters the EMA at the threshold value
    mean = 0.5 * 2.0 + 0.5 * threshold
    var = 0.5 * (2.0 / 3.0) + 0.5 * (threshold - mean) ** 2
    assert det.mean == pytest.approx(mean) and det.var == pytest.approx(var)
    assert det.update(math.nan) is False and det.mean == pytest.approx(mean)


def test_an_outlier_during_warmup_does_not_blind_the_detector() -> None:
    rng = np.random.default_rng(0)
    values = 1.0 + 0.05 * rng.standard_normal(80)
    values[10] = 100.0  # a bad batch inside the 25-step warm-up
    values[40] = 5.0  # a later spike that the raw warm-up variance would hide
    det = gw.SpikeDetector()
    flags = [i for i, v in enumerate(values) if det.update(float(v))]
    assert flags == [40]
    # Without the cap the warm-up variance is about 100**2 / 25, a threshold near 50.
    raw = np.concatenate((values[:10], values[11:25]))
    assert det.update(1.0) is False and det.mean == pytest.approx(raw.mean(), rel=0.1)


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
