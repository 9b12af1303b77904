"""MLflow sink: gradient norms, alerts and the run's diagnosis in the run you opened.

    with mlflow.start_run():
        watch = gradwatch.GradWatch(model, sinks=[gradwatch.MLflowSink()])

It writes to the active run (``mlflow.active_run()`` when its first point is due) or to the run
``run_id=`` names (e.g. Lightning's ``MLFlowLogger.run_id``, whose runs are not "active"), and
never starts or ends a run. With neither, it fails with a message saying to start a run first;
like any failing sink it is then disabled with one warning and training goes on.

What it writes:

* Every ``every`` steps, the window metrics of :mod:`gradwatch.report.tracker`
  (``grad_norm/global``, ``grad_norm/clip_coef``, ``grad_norm/<layer>``, counts) at the window's
  last step, in one ``log_batch`` call. Keys keep MLflow's characters (letters, digits,
  ``_-. :/``; anything else becomes ``_``, as the Hugging Face ``MLflowCallback`` does). An
  infinite norm is stored by MLflow as the largest float.
* Alerts as tags: ``gradwatch.alert.<kind>`` (the first alert of that kind, at once: where a NaN
  started), ``gradwatch.alerts`` (the count) and ``gradwatch.last_alert``, updated every window.
* At the end: tags ``gradwatch.summary`` (the totals), ``gradwatch.diagnosis`` (the first
  finding that is not benign), ``gradwatch.finding.<i>`` (each finding in one line) and
  ``gradwatch.first_nonfinite``; artifacts ``gradwatch/summary.json`` (totals, per-layer
  statistics, findings with their data and remedies, alerts) and ``gradwatch/summary.txt`` (the
  console's summary notes). The configuration is the tag ``gradwatch.config`` (a tag, not
  params, since params cannot change when a second watcher writes to the same run).

Needs the ``mlflow`` package (``mlflow-skinny`` is enough): ``pip install "gradwatch[mlflow]"``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Sequence
from typing import Any

from gradwatch._optional import require
from gradwatch.errors import StateError
from gradwatch.records import Event, RunStart, RunSummary
from gradwatch.report.logformat import encode_value
from gradwatch.report.text import summary_notes
from gradwatch.report.tracker import TrackerSink, Window, finding_line, summary_line

__all__ = ["MLflowSink"]

MAX_FINDING_TAGS = 20
"""Findings written as tags (all of them are in ``gradwatch/summary.json``)."""

_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_TAG_LENGTH = 5000  # below MLflow's limit on a tag value
_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. :/]")


class MLflowSink(TrackerSink):
    """Writes gradient norms, alerts and the final diagnosis to an MLflow run.

    Args:
        run_id: The run to write to; None: the active run (``mlflow.active_run()``) when the
            first point is due.
        tracking_uri: The tracking server or store of ``run_id`` (None: MLflow's current one,
            ``mlflow.get_tracking_uri()``).
        every: Steps per point; the steps in between are aggregated (max, min, mean, counts).
        layer_depth: Group parameters into layers by their first ``layer_depth`` name parts
            (None: the watcher's ``layer_depth``, else by owning module).
        layers: Log ``grad_norm/<layer>`` only for layers matching these glob patterns
            (``"encoder.*"``); None: every layer.

    Raises:
        MissingExtraError: ``mlflow`` is not installed.
        ValueError, TypeError: An argument is invalid (the message names it).
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        every: int = 50,
        layer_depth: int | None = None,
        layers: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(every=every, layer_depth=layer_depth, layers=layers)
        self._mlflow = require("mlflow", extra="mlflow")
        self._entities = require("mlflow.entities", extra="mlflow")
        self._run_id = run_id
        self._tracking_uri = tracking_uri
        self._client: Any = None
        self._start: RunStart | None = None

    @property
    def run_id(self) -> str:
        """The MLflow run written to (found at the first point; see the module docstring).

        Raises:
            StateError: No ``run_id`` was passed and no run is active.
        """
        if self._run_id is None:
            active = self._mlflow.active_run()
            if active is None:
                raise StateError(
                    "MLflowSink found no active MLflow run: call mlflow.start_run() before "
                    "training (or pass MLflowSink(run_id=...)); gradwatch writes to your run and "
                    "never starts one"
                )
            self._run_id = active.info.run_id
        if self._client is None:
            uri = self._tracking_uri or self._mlflow.get_tracking_uri()
            self._client = self._mlflow.MlflowClient(uri)
            if self._start is not None:
                config = {"version": self._start.gradwatch_version, **self._start.config}
                self._tags({"gradwatch.config": json.dumps(encode_value(config))})
        return self._run_id

    # ------------------------------------------------------------------------ writing

    def log_start(self, start: RunStart) -> None:
        self._start = start  # written with the first point: the run may not be active yet

    def log_window(self, window: Window) -> None:
        run_id = self.run_id
        now = int(time.time() * 1000)
        metric = self._entities.Metric
        metrics = [
            metric(_key(key), value, now, window.step) for key, value in window.metrics.items()
        ]
        tags = []
        if window.events:
            tags = [
                self._entities.RunTag("gradwatch.alerts", str(self.alert_count)),
                self._entities.RunTag("gradwatch.last_alert", _clip(window.events[-1].message)),
            ]
        for i in range(0, len(metrics), _BATCH):
            self._client.log_batch(run_id, metrics=metrics[i : i + _BATCH], tags=tags)
            tags = []

    def log_alert(self, event: Event) -> None:
        self._tags({f"gradwatch.alert.{event.kind}": event.message})

    def log_summary(self, summary: RunSummary, events: Sequence[Event]) -> None:
        run_id = self.run_id
        problems = [f for f in summary.findings if f.severity != "info"]
        tags = {
            "gradwatch.summary": summary_line(summary),
            "gradwatch.alerts": str(self.alert_count),
            "gradwatch.diagnosis": finding_line(problems[0]) if problems else "no problem found",
        }
        if summary.nonfinite_origins:
            step, name = summary.nonfinite_origins[0]
            tags["gradwatch.first_nonfinite"] = f"step {step}: {name}"
        for i, finding in enumerate(summary.findings[:MAX_FINDING_TAGS]):
            tags[f"gradwatch.finding.{i}"] = finding_line(finding)
        self._tags(tags)
        record = {
            "summary": encode_value(dataclasses.asdict(summary)),
            "alerts": [encode_value(dataclasses.asdict(e)) for e in events],
            "alert_count": self.alert_count,
        }
        self._client.log_dict(run_id, record, "gradwatch/summary.json")
        self._client.log_text(run_id, summary_notes(summary) + "\n", "gradwatch/summary.txt")

    def _tags(self, tags: dict[str, str]) -> None:
        run_tag = self._entities.RunTag
        self._client.log_batch(
            self.run_id, tags=[run_tag(key, _clip(value)) for key, value in tags.items()]
        )


def _key(key: str) -> str:
    """A metric key MLflow accepts."""
    return _UNSAFE.sub("_", key)


def _clip(text: str) -> str:
    """A tag value MLflow accepts (its length is bounded)."""
    return text if len(text) <= _TAG_LENGTH else text[: _TAG_LENGTH - 3] + "..."
