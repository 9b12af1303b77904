"""MLflowSink: real runs in a local SQLite tracking store, read back with ``MlflowClient``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_steps
from torch import nn

import gradwatch as gw
from gradwatch._optional import MissingExtraError

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")  # the SQLite store
from mlflow import MlflowClient  # noqa: E402

from gradwatch.report.mlflow_sink import MLflowSink  # noqa: E402


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes seconds), set as MLflow's."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{path}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def experiment(store, tmp_path, request) -> str:
    """A fresh experiment whose artifacts go to ``tmp_path``."""
    return MlflowClient(store).create_experiment(
        request.node.name, artifact_location=(tmp_path / "artifacts").as_uri()
    )


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _layer(report, *names: str) -> float:
    return math.sqrt(sum(report.param_norms[n] ** 2 for n in names))


def test_windows_alerts_and_summary_read_back_from_the_store(store, experiment):
    with mlflow.start_run(experiment_id=experiment) as run:
        watch = train_steps(_model(), [MLflowSink(every=5)], 12, nan_at=8, clip=gw.ClipNorm(0.2))
        history, summary = list(watch.history), watch.close()
        assert mlflow.active_run().info.run_id == run.info.run_id  # the user's run, still open
    client = MlflowClient(store)
    run_id = run.info.run_id

    windows = {4: history[0:5], 9: history[5:10], 11: history[10:12]}
    global_norm = _history(client, run_id, "grad_norm/global")
    assert sorted(global_norm) == [4, 9, 11]  # windows 0-4, 5-9, then 10-11 when it closed
    mean = _history(client, run_id, "grad_norm/global_mean")
    coef = _history(client, run_id, "grad_norm/clip_coef")
    rate = _history(client, run_id, "grad_norm/clip_rate")
    layer2 = _history(client, run_id, "grad_norm/2")
    for step, reports in windows.items():
        norms = np.array([r.global_norm for r in reports])
        finite = norms[np.isfinite(norms)]
        assert global_norm[step] == pytest.approx(finite.max(), rel=1e-6)
        assert mean[step] == pytest.approx(finite.mean(), rel=1e-6)
        coefs = [r.clip_coef for r in reports if math.isfinite(r.clip_coef)]
        assert coef[step] == pytest.approx(min(coefs), rel=1e-6)
        assert rate[step] == pytest.approx(np.mean([r.clipped for r in reports]))
        assert layer2[step] == pytest.approx(
            np.nanmax([_layer(r, "2.weight", "2.bias") for r in reports]), rel=1e-6
        )
    assert _history(client, run_id, "grad_norm/nan_steps") == {4: 0, 9: 1, 11: 0}
    assert _history(client, run_id, "grad_norm/skipped_steps") == {4: 0, 9: 0, 11: 0}

    tags = client.get_run(run_id).data.tags
    alert = tags["gradwatch.alert.nonfinite"]  # the first NaN, tagged when it happened
    assert alert.startswith("step 8: ") and "2.weight" in alert
    assert tags["gradwatch.alerts"] == "1"
    assert tags["gradwatch.last_alert"] == alert
    assert tags["gradwatch.first_nonfinite"] == "step 8: 2.weight"
    assert tags["gradwatch.summary"].startswith("12 steps; ")
    first = summary.findings[0]
    assert tags["gradwatch.diagnosis"].startswith(f"{first.severity} {first.kind} ({first.cause})")
    assert tags["gradwatch.finding.0"] == tags["gradwatch.diagnosis"]
    assert json.loads(tags["gradwatch.config"])["clip"]["max_norm"] == 0.2

    artifacts = Path(client.download_artifacts(run_id, "gradwatch"))
    record = json.loads((artifacts / "summary.json").read_text())
    assert record["summary"]["steps"] == 12
    assert record["summary"]["nonfinite_steps"] == 1
    assert [f["kind"] for f in record["summary"]["findings"]] == [f.kind for f in summary.findings]
    assert [(a["step"], a["kind"]) for a in record["alerts"]] == [(8, "nonfinite")]
    assert record["summary"]["layers"][1]["max"] == pytest.approx(summary.layers[1].max)
    assert first.evidence in (artifacts / "summary.txt").read_text()


def test_every_step_with_run_id_and_a_layers_filter(store, experiment):
    run = MlflowClient(store).create_run(experiment)  # not active: e.g. Lightning's MLFlowLogger
    run_id = run.info.run_id
    sink = MLflowSink(run_id, tracking_uri=store, every=1, layers=["0", "4"])
    history = list(train_steps(_model(), [sink], 4).history)
    client = MlflowClient(store)
    global_norm = _history(client, run_id, "grad_norm/global")
    assert global_norm == pytest.approx({r.step: r.global_norm for r in history}, rel=1e-6)
    layer0 = _history(client, run_id, "grad_norm/0")
    assert layer0 == pytest.approx(
        {r.step: _layer(r, "0.weight", "0.bias") for r in history}, rel=1e-6
    )
    logged = set(client.get_run(run_id).data.metrics)
    assert {"grad_norm/0", "grad_norm/4"} <= logged
    assert "grad_norm/2" not in logged  # filtered out
    assert "grad_norm/global_mean" not in logged  # every=1: the step's own norm only
    assert client.get_run(run_id).info.status == "RUNNING"  # gradwatch never ends a run


def test_no_active_run_disables_the_sink_with_the_fix_named(store):
    assert mlflow.active_run() is None
    with pytest.warns(gw.GradWatchWarning, match=r"call mlflow\.start_run\(\) before training"):
        watch = train_steps(_model(), [MLflowSink(every=2)], 4)
    assert len(watch.history) == 4  # training went on


def test_missing_mlflow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # None makes the import fail
    with pytest.raises(MissingExtraError, match=r'pip install "gradwatch\[mlflow\]"'):
        MLflowSink()
    assert gw.MLflowSink is MLflowSink  # importing the name needs no mlflow
