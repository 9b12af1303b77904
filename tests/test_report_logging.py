"""LoggingSink: alerts, window summaries and the final table through the logging module."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import train_steps
from torch import nn

from gradwatch.errors import ConfigError, ConfigTypeError
from gradwatch.records import Event, RunSummary
from gradwatch.report.logging import LoggingSink


def _train(sinks, steps=12, **kwargs):
    """``train_steps`` on a fresh, seeded model; returns the watcher's reports."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return list(train_steps(model, sinks, steps, **kwargs).history)


def _records(caplog, name="gradwatch"):
    return [r for r in caplog.records if r.name == name]


def test_alerts_warn_windows_and_summary_inform(caplog):
    caplog.set_level(logging.DEBUG, logger="gradwatch")
    _train([LoggingSink(every=5)], nan_at=7)
    records = _records(caplog)

    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage().startswith("gradwatch: step 7: ")
    assert "2.weight" in warnings[0].getMessage()
    assert isinstance(warnings[0].gradwatch, Event) and warnings[0].gradwatch.step == 7

    infos = [r for r in records if r.levelno == logging.INFO]
    lines = [r.getMessage() for r in infos[:-1]]
    assert [line.split(" |")[0] for line in lines] == [
        "gradwatch steps 0-4",
        "gradwatch steps 5-9",
    ]
    assert "nan steps 1" in lines[1] and "nan steps 0" in lines[0]
    assert all("\x1b[" not in line for line in lines)  # plain text, no colour codes

    final = infos[-1]
    assert isinstance(final.gradwatch, RunSummary) and final.gradwatch.steps == 12
    text = final.getMessage()
    assert text.startswith("gradwatch: run finished\n")
    assert "gradwatch summary: 12 steps" in text and "NaN/Inf started in: step 7: 2.weight" in text
    assert "\x1b[" not in text


def test_window_line_reports_the_max_not_the_last_step(caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")
    history = _train([LoggingSink(every=5)], steps=5, spike_at=2)
    line = next(r.getMessage() for r in _records(caplog) if r.levelno == logging.INFO)
    peak = max(r.global_norm for r in history)
    assert f"max {peak:.4g})" in line
    assert f"norm {history[-1].global_norm:.4g} " in line


def test_named_logger_levels_and_disabled_logger(caplog):
    caplog.set_level(logging.DEBUG, logger="train.grad")
    sink = LoggingSink("train.grad", every=4, level=logging.DEBUG, alert_level=logging.ERROR)
    _train([sink], steps=8, nan_at=3)
    records = _records(caplog, "train.grad")
    # window 0-3 closes with step 3's report; step 3's alert follows it; then 4-7; the summary
    assert [r.levelno for r in records] == [
        logging.DEBUG,
        logging.ERROR,
        logging.DEBUG,
        logging.DEBUG,
    ]

    caplog.clear()
    quiet = logging.getLogger("quiet.grad")
    quiet.setLevel(logging.WARNING)  # INFO disabled: no window line, no summary table rendered
    _train([LoggingSink(quiet, every=2)], steps=6)
    assert _records(caplog, "quiet.grad") == []


def test_invalid_arguments():
    with pytest.raises(ConfigTypeError, match=r"logger must be a logging\.Logger"):
        LoggingSink(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigTypeError, match="level must be a logging level"):
        LoggingSink(level="INFO")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="every must be an int >= 0, got -1"):
        LoggingSink(every=-1)
