"""The step policy and the settings, without a watcher: decisions over plain numbers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import gradwatch as gw
from gradwatch.act.policy import StepPolicy, verdict


@pytest.mark.parametrize(
    ("norm", "threshold", "on_nonfinite", "on_spike", "expected"),
    [
        (1.0, 5.0, "skip", "skip", (None, None)),
        (math.nan, 5.0, "skip", "warn", ("non-finite gradient", "skipped")),
        (math.inf, 5.0, "raise", "warn", ("non-finite gradient", "raise")),
        (math.nan, 5.0, "warn", "warn", (None, None)),  # reported, never acted on
        (9.0, 5.0, "warn", "skip", ("gradient norm spike", "skipped")),
        (9.0, 5.0, "warn", "raise", ("gradient norm spike", "raise")),
        (9.0, None, "warn", "skip", (None, None)),  # no threshold before the first step
        (9.0, 5.0, "warn", "clip", (None, None)),  # clipping is not a decision
        (math.inf, 5.0, "warn", "skip", ("gradient norm spike", "skipped")),  # Inf is above it
    ],
)
def test_verdict(norm, threshold, on_nonfinite, on_spike, expected) -> None:
    assert verdict(norm, threshold, on_nonfinite, on_spike) == expected


def test_policy_asks_for_the_threshold_only_when_a_spike_policy_decides() -> None:
    asked = []

    def threshold() -> float:
        asked.append(True)
        return 2.0

    assert StepPolicy("skip", "warn", threshold).decide(torch.tensor(3.0)) == (None, None)
    assert not asked
    quiet = StepPolicy("warn", "warn", threshold)
    assert not quiet.decides and quiet.decide(torch.tensor(math.nan)) == (None, None)
    skip = StepPolicy("warn", "skip", threshold)
    assert skip.decide(torch.tensor(3.0)) == ("gradient norm spike", "skipped") and asked


def test_clip_to_threshold_rescales_gradients_and_multiplies_the_coefficient() -> None:
    from gradwatch.collect.norms import GradCollector

    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 2.0)  # norm 4
    collector = GradCollector([param], param.device, torch.float32)
    batch = collector.gather()
    coef = torch.tensor(0.5)  # a clipper already halved the gradients (norm now 2)
    param.grad.mul_(0.5)
    StepPolicy("warn", "clip", lambda: 1.0).clip_to_threshold_(batch, torch.tensor(4.0), coef)
    assert torch.linalg.vector_norm(param.grad).item() == pytest.approx(1.0, rel=1e-5)
    assert coef.item() == pytest.approx(0.25, rel=1e-5)


def test_settings_are_frozen_resolved_and_checked() -> None:
    watch = gw.GradWatch(torch.nn.Linear(2, 2), clip=gw.ClipNorm(1.0, norm_type=1.0), sinks=[])
    settings = watch.settings
    assert settings.norm_type == 1.0  # the clipper's order
    assert settings.config(watch.spike_detector)["clip"] == settings.clip.config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.on_spike = "skip"  # type: ignore[misc]
    with pytest.raises(ValueError, match="on_spike"):
        gw.WatchSettings(on_spike="ignore")  # type: ignore[arg-type]
    watch.close()
