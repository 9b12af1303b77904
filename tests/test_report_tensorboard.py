"""TensorBoardSink: event files written by real runs, read back with TensorBoard's own reader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import train_steps
from torch import nn

import gradwatch as gw
from gradwatch.errors import ConfigError

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)
from torch.utils.tensorboard import SummaryWriter

from gradwatch.report.tensorboard import TensorBoardSink


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(x)))


def _train(model, sinks, steps=12, **kwargs):
    """``train_steps``; returns the watcher's reports."""
    return list(train_steps(model, sinks, steps, **kwargs).history)


def _read(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


def _texts(events: EventAccumulator, tag: str) -> dict[int, str]:
    return {
        e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")
    }


def _layer(report, *names: str) -> float:
    return math.sqrt(sum(report.param_norms[n] ** 2 for n in names))


def test_every_step_global_clip_layers_and_events(tmp_path):
    history = _train(_model(), [TensorBoardSink(tmp_path)], nan_at=8, clip=gw.ClipNorm(0.2))
    events = _read(tmp_path)
    assert set(events.Tags()["scalars"]) == {
        "grad_norm/global",
        "grad_norm/clip_coef",
        "grad_norm/0",
        "grad_norm/2",
        "grad_norm/4",
    }
    global_norm = _scalars(events, "grad_norm/global")
    coef = _scalars(events, "grad_norm/clip_coef")
    layer2 = _scalars(events, "grad_norm/2")
    assert sorted(global_norm) == list(range(12))
    for report in history:
        step = report.step
        if step == 8:
            assert math.isnan(global_norm[8]) and math.isnan(layer2[8])
            continue
        assert global_norm[step] == pytest.approx(report.global_norm, rel=1e-6)
        assert coef[step] == pytest.approx(report.clip_coef, rel=1e-6)
        assert layer2[step] == pytest.approx(_layer(report, "2.weight", "2.bias"), rel=1e-6)
    assert min(coef.values()) < 1.0

    texts = _texts(events, "gradwatch/events")
    assert list(texts) == [8]
    assert "2.weight" in texts[8] and "nonfinite" in texts[8]
    summary = _texts(events, "gradwatch/summary")[11]
    assert "| 2 |" in summary and "NaN/Inf first appeared at step 8 in `2.weight`" in summary
    assert "parameters watched" in _texts(events, "gradwatch/run")[0]


def test_windows_keep_the_spike_and_the_last_partial_window(tmp_path):
    detector = gw.SpikeDetector(warmup=1)
    history = _train(
        _model(), [TensorBoardSink(tmp_path, every=5)], spike_at=2, spike_detector=detector
    )
    events = _read(tmp_path)
    global_norm = _scalars(events, "grad_norm/global")
    assert sorted(global_norm) == [4, 9, 11]  # windows 0-4, 5-9, then 10-11 at close
    norms = np.array([r.global_norm for r in history])
    assert norms.argmax() == 2
    assert global_norm[4] == pytest.approx(norms[0:5].max(), rel=1e-6)  # the spike, not step 4
    assert global_norm[4] > 100 * norms[4]
    mean = _scalars(events, "grad_norm/global_mean")
    assert mean[9] == pytest.approx(norms[5:10].mean(), rel=1e-5)
    assert mean[11] == pytest.approx(norms[10:12].mean(), rel=1e-5)
    layer0 = _scalars(events, "grad_norm/0")
    layer_norms = [_layer(r, "0.weight", "0.bias") for r in history]
    assert layer0[4] == pytest.approx(max(layer_norms[0:5]), rel=1e-6)
    assert _scalars(events, "grad_norm/clip_rate") == {4: 0.0, 9: 0.0, 11: 0.0}
    assert 2 in _texts(events, "gradwatch/events")  # the spike's alert, at its own step


def test_layer_depth_groups_parameters(tmp_path):
    history = _train(_Net(), [TensorBoardSink(tmp_path, layer_depth=1)], steps=3)
    events = _read(tmp_path)
    assert {t for t in events.Tags()["scalars"] if t not in ("grad_norm/global",)} == {
        "grad_norm/clip_coef",
        "grad_norm/encoder",
        "grad_norm/head",
    }
    encoder = _scalars(events, "grad_norm/encoder")
    names = ("encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias")
    for report in history:
        assert encoder[report.step] == pytest.approx(_layer(report, *names), rel=1e-6)


def test_shared_writer_stays_open_for_the_training_loop(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    _train(_model(), [TensorBoardSink(writer=writer)], steps=3)
    writer.add_scalar("train/loss", 0.5, 3)  # the watcher closed; the user's writer did not
    writer.close()
    events = _read(tmp_path)
    assert {"grad_norm/global", "train/loss"} <= set(events.Tags()["scalars"])


def test_log_dir_or_writer_exactly_one(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of log_dir"):
        TensorBoardSink()
    writer = SummaryWriter(str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="exactly one of log_dir"):
            TensorBoardSink(tmp_path, writer=writer)
    finally:
        writer.close()
    with pytest.raises(ConfigError, match="every must be an int >= 1"):
        TensorBoardSink(tmp_path, every=0)
