"""Bad input fails with a clear error naming the argument, the value and what is valid."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mlp

import gradwatch as gw


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"on_nonfinite": "ignore"}, ValueError, r"on_nonfinite must be one of 'warn', 'skip', "),
        ({"on_spike": "stop"}, ValueError, r"on_spike must be one of .*got 'stop'"),
        ({"clip": 1.0}, TypeError, r"clip must be a gradwatch clipper .*got float"),
        ({"norm_type": -1}, ValueError, r"norm_type must be a number > 0 .*got -1"),
        ({"norm_type": "two"}, TypeError, r"norm_type must be a number"),
        ({"sinks": "console"}, TypeError, r"sinks must be a list"),
        ({"sinks": [object()]}, TypeError, r"sinks\[0\] must have a write\(record\) method"),
        ({"accumulation_steps": 0}, ValueError, r"accumulation_steps must be an int >= 1, got 0"),
        ({"history": 2.5}, TypeError, r"history must be an int >= 1, got 2.5"),
        ({"spike_detector": "zclip"}, TypeError, r"spike_detector must be a SpikeDetector"),
        (
            {"clip": gw.ClipNorm(1.0, 2.0), "norm_type": 1.0},
            ValueError,
            r"norm_type=1.0 differs from the clipper's norm_type=2.0",
        ),
    ],
)
def test_bad_configuration(kwargs, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern) as info:
        gw.GradWatch(mlp(), **kwargs)
    assert isinstance(info.value, gw.GradWatchError)


@pytest.mark.parametrize(
    ("make", "exc", "pattern"),
    [
        (
            lambda: gw.ClipNorm(-1.0),
            ValueError,
            r"ClipNorm\(max_norm\) must be a finite number > 0, got -1",
        ),
        (
            lambda: gw.ClipNorm(math.nan),
            ValueError,
            r"max_norm\) must be a finite number > 0, got nan",
        ),
        (lambda: gw.ClipNorm(0), ValueError, r"got 0"),
        (lambda: gw.ClipNorm("1"), TypeError, r"got '1'"),
        (lambda: gw.ClipNorm(1.0, norm_type=0), ValueError, r"ClipNorm\(norm_type\)"),
        (lambda: gw.ClipValue(math.inf), ValueError, r"ClipValue\(clip_value\) .*got inf"),
        (lambda: gw.SpikeDetector(alpha=1.0), ValueError, r"alpha must be a number in \(0, 1\)"),
        (lambda: gw.SpikeDetector(warmup=0), ValueError, r"warmup must be an int >= 1"),
        (lambda: gw.SpikeDetector(z_threshold=-2), ValueError, r"z_threshold must be"),
    ],
)
def test_bad_components(make, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        make()


def test_bad_models() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module .*got int"):
        gw.GradWatch(3)
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match=r"has no parameter with requires_grad=True"):
        gw.GradWatch(frozen)
    with pytest.raises(ValueError, match=r"has no parameter"):
        gw.GradWatch(torch.nn.ReLU())
    with torch.device("meta"):
        meta = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"'weight' is on the meta device"):
        gw.GradWatch(meta)
    with pytest.raises(TypeError, match=r"\(name, parameter\) pairs"):
        gw.GradWatch([torch.nn.Parameter(torch.ones(1))])


def test_named_parameters_iterable_is_accepted() -> None:
    model = mlp(depth=1)
    watch = gw.GradWatch(model.named_parameters(), sinks=[])
    assert watch.names == tuple(n for n, _ in model.named_parameters())


def test_state_errors() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, sinks=[]).attach(opt)
    with pytest.raises(gw.StateError, match=r"attach\(\) was already called with SGD"):
        watch.attach(opt)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, got str"):
        gw.GradWatch(model, sinks=[]).attach("adam")
    with pytest.raises(TypeError, match=r"scaler must be a torch.amp.GradScaler or None, got int"):
        gw.GradWatch(model, sinks=[]).attach(opt, scaler=3)
    with pytest.raises(TypeError, match=r"loss must be a tensor or a number, got str"):
        watch.check(loss="0.1")
    watch.close()
    for call in (watch.check, lambda: watch.attach(opt), lambda: watch.backward().__enter__()):
        with pytest.raises(gw.StateError, match=r"called after close\(\)"):
            call()
    with pytest.raises(ValueError, match=r"different parameters"):
        gw.GradWatch(mlp(depth=1), sinks=[]).load_state_dict(watch.state_dict())
