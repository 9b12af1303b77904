"""WandbSink: real offline W&B runs, read back from the run's own transaction log (no mocks).

An offline run writes every record (history rows, summary updates, config, alerts) to
``run-<id>.wandb``, a LevelDB-style log of ``wandb.proto`` ``Record`` messages that ``wandb sync``
uploads later. :func:`_records` reads that file; tables are the JSON files it points to.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import train_steps
from torch import nn

import gradwatch as gw
from gradwatch._optional import MissingExtraError

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from gradwatch.report.wandb_sink import WandbSink  # noqa: E402


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


@pytest.fixture
def run(tmp_path):
    """An offline run in ``tmp_path``, finished after the test."""
    settings = wandb.Settings(silent=True, console="off", save_code=False, x_disable_stats=True)
    opened = wandb.init(mode="offline", dir=str(tmp_path), project="gradwatch", settings=settings)
    yield opened
    opened.finish()


# --------------------------------------------------------------------- reading the run back


def _records(run) -> list[Any]:
    """Every record of a finished run, read from its ``.wandb`` file.

    ``run.finish()`` can return before W&B's writer process has flushed the file: read it until
    it ends with the run's ``exit`` record (its last), for up to 20 s.
    """
    path = Path(run.dir).parent / f"run-{run.id}.wandb"
    deadline = time.monotonic() + 20
    while True:
        records = _parse(path.read_bytes())
        done = records and records[-1].WhichOneof("record_type") == "exit"
        if done or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def _parse(data: bytes) -> list[Any]:
    """The records of a ``.wandb`` file.

    It starts with a 7-byte header (``:W&B``, magic, version) and is cut into 32 KiB blocks of
    chunks; each chunk is ``crc32 (4) | length (2) | type (1) | data``, the type saying whether it
    holds a whole record or its first, middle or last part. A chunk still being written (its
    checksum does not match yet) ends the read.
    """
    if len(data) < 7:
        return []  # not written yet
    assert data[:4] == b":W&B", "not a W&B run file"
    out, parts, pos, block = [], [], 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            break
        parts.append(chunk)
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            out.append(record)
            parts = []
    return out


def _key(item: Any) -> str | tuple[str, ...]:
    keys = tuple(item.nested_key) if item.nested_key else (item.key,)
    return keys[0] if len(keys) == 1 else keys


def _history(records) -> list[dict]:
    """The run's history rows, user keys only, values decoded."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {_key(i): json.loads(i.value_json) for i in r.history.item}
            rows.append({k: v for k, v in row.items() if not str(k).startswith("_")})
    return rows


def _summary(records) -> dict:
    """The run's final summary: every update applied in order."""
    out: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                out[_key(item)] = json.loads(item.value_json)
    return out


def _table(run, summary: dict, key: str) -> list[dict]:
    """A logged table, read from the JSON file its summary entry points to."""
    table = json.loads((Path(run.dir) / summary[(key, "path")]).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def _layer(report, *names: str) -> float:
    return math.sqrt(sum(report.param_norms[n] ** 2 for n in names))


# ------------------------------------------------------------------------------- tests


def test_windows_alerts_and_summary_read_back_from_the_offline_run(run):
    watch = train_steps(_model(), [WandbSink(every=5)], 12, nan_at=8, clip=gw.ClipNorm(0.2))
    history, summary = list(watch.history), watch.close()
    run.finish()
    records = _records(run)

    points = {row["gradwatch/step"]: row for row in _history(records) if "gradwatch/step" in row}
    assert sorted(points) == [4, 9, 11]  # windows 0-4, 5-9, then 10-11 when the watcher closed
    windows = {4: history[0:5], 9: history[5:10], 11: history[10:12]}
    for step, reports in windows.items():
        row = points[step]
        norms = np.array([r.global_norm for r in reports])
        finite = norms[np.isfinite(norms)]
        assert row["grad_norm/global"] == pytest.approx(finite.max(), rel=1e-6)
        assert row["grad_norm/global_mean"] == pytest.approx(finite.mean(), rel=1e-6)
        coefs = [r.clip_coef for r in reports if math.isfinite(r.clip_coef)]
        assert row["grad_norm/clip_coef"] == pytest.approx(min(coefs), rel=1e-6)
        assert row["grad_norm/clip_rate"] == pytest.approx(np.mean([r.clipped for r in reports]))
        assert row["grad_norm/nan_steps"] == sum(not r.is_finite for r in reports)
        layer2 = [_layer(r, "2.weight", "2.bias") for r in reports]
        assert row["grad_norm/2"] == pytest.approx(np.nanmax(layer2), rel=1e-6)
        # The histogram over the layers holds log10 of the three layers' logged values.
        values = [row[f"grad_norm/{name}"] for name in ("0", "2", "4")]
        hist = row[("gradwatch/layer_norms_log10", "values")]
        bins = row[("gradwatch/layer_norms_log10", "bins")]
        assert sum(hist) == 3
        assert bins[0] == pytest.approx(np.log10(min(values)), rel=1e-6)
        assert bins[-1] == pytest.approx(np.log10(max(values)), rel=1e-6)
    assert [points[s]["grad_norm/nan_steps"] for s in (4, 9, 11)] == [0, 1, 0]

    final = _summary(records)
    assert final["gradwatch/steps"] == 12
    assert final["gradwatch/nan_steps"] == summary.nonfinite_steps == 1
    assert final["gradwatch/clipped_steps"] == summary.clipped_steps
    assert final["gradwatch/first_nonfinite"] == "step 8: 2.weight"
    assert final["gradwatch/alert_count"] == 1
    alerts = _table(run, final, "gradwatch/alerts")
    assert [(a["step"], a["kind"]) for a in alerts] == [(8, "nonfinite")]
    assert "2.weight" in alerts[0]["params"]
    assert final["gradwatch/last_alert"] == alerts[0]["message"]
    findings = _table(run, final, "gradwatch/findings")
    assert [(f["kind"], f["cause"]) for f in findings] == [
        (f.kind, f.cause) for f in summary.findings
    ]
    assert final["gradwatch/diagnosis"].startswith(f"{summary.findings[0].severity} ")
    layers = _table(run, final, "gradwatch/layers")
    assert [row["layer"] for row in layers] == ["0", "2", "4"]
    assert layers[1]["nan_steps"] == 1
    assert layers[1]["max"] == pytest.approx(summary.layers[1].max, rel=1e-6)

    config = next(r.config for r in records if r.WhichOneof("record_type") == "config")
    gradwatch_config = {i.key: json.loads(i.value_json) for i in config.update}["gradwatch"]
    assert gradwatch_config["clip"]["max_norm"] == 0.2
    # Offline, run.alert would go nowhere: the alert is in the summary and the table instead.
    assert not [r for r in records if r.WhichOneof("record_type") == "alert"]


def test_points_join_the_users_own_rows_and_steps(run):
    """The sink logs with commit=False: the user's step count and explicit steps are untouched."""

    def user_logs() -> None:
        step = len(watch.history) - 1
        run.log({"loss": float(step)}, step=step)
        run.log({"lr": 0.1}, step=step)  # a second call at the same step is not dropped

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, sinks=[WandbSink(every=1)])
    for _ in range(6):
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        watch.check()
        opt.step()
        user_logs()
    history = list(watch.history)
    watch.close()
    run.finish()

    rows = [r for r in _history(_records(run)) if "loss" in r]
    assert [r["loss"] for r in rows] == [0, 1, 2, 3, 4, 5]  # one row per user step, none dropped
    assert all(r["lr"] == 0.1 for r in rows)
    for row, report in zip(rows, history):
        assert row["gradwatch/step"] == report.step
        assert row["grad_norm/global"] == pytest.approx(report.global_norm, rel=1e-6)
        assert row["grad_norm/clip_coef"] == 1.0


def test_points_are_committed_when_the_user_logs_nothing(run):
    watch = train_steps(_model(), [WandbSink(run=run, every=2, layers="4")], 6)
    history = list(watch.history)
    run.finish()
    points = [r for r in _history(_records(run)) if "gradwatch/step" in r]
    assert [r["gradwatch/step"] for r in points] == [1, 3, 5]  # none overwritten by the next
    for row in points:
        reports = history[row["gradwatch/step"] - 1 : row["gradwatch/step"] + 1]
        assert row["grad_norm/global"] == pytest.approx(max(r.global_norm for r in reports))
        layer_keys = [k for k in row if str(k).startswith("grad_norm/") and k[10:].isdigit()]
        assert layer_keys == ["grad_norm/4"]  # the layers filter


def test_online_runs_get_the_first_alert_of_each_kind(run, monkeypatch):
    """run.alert needs W&B's servers; an offline run records the call, so the call is checked."""
    monkeypatch.setattr("gradwatch.report.wandb_sink._online", lambda run: True)
    detector = gw.SpikeDetector(warmup=1)
    train_steps(_model(), [WandbSink(every=4)], 12, nan_at=8, spike_at=3, spike_detector=detector)
    run.finish()
    alerts = [r.alert for r in _records(run) if r.WhichOneof("record_type") == "alert"]
    assert [(a.title, a.level) for a in alerts] == [
        ("gradwatch: spike", "WARN"),
        ("gradwatch: nonfinite", "ERROR"),
    ]
    assert alerts[1].text.startswith("step 8: ") and "2.weight" in alerts[1].text


def test_no_open_run_disables_the_sink_with_the_fix_named(tmp_path):
    assert wandb.run is None
    with pytest.warns(gw.GradWatchWarning, match=r"wandb\.init\(\.\.\.\) before training"):
        watch = train_steps(_model(), [WandbSink(every=2)], 4)
    assert len(watch.history) == 4  # training went on


def test_layers_pattern_that_matches_nothing_is_named(run):
    with pytest.warns(gw.GradWatchWarning, match=r"layers pattern 'encoder\.\*' matches no layer"):
        train_steps(_model(), [WandbSink(every=2, layers="encoder.*")], 2)
    with pytest.raises(gw.ConfigError, match="every must be an int >= 1"):
        WandbSink(every=0)


def test_missing_wandb_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # None makes the import fail
    with pytest.raises(MissingExtraError, match=r'pip install "gradwatch\[wandb\]"'):
        WandbSink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gw.WandbSink is WandbSink  # importing the name needs no wandb
