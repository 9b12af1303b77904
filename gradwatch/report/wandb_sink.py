"""Weights & Biases sink: gradient norms, alerts and the run's diagnosis in the run you opened.

    wandb.init(project="my-project")
    watch = gradwatch.GradWatch(model, sinks=[gradwatch.WandbSink()])

It writes to the run that is open (``wandb.run``, or the ``run=`` you pass, e.g. Lightning's
``WandbLogger.experiment``) and never starts or finishes one. With no run open when its first
point is due, it fails with a message saying to call ``wandb.init`` first; like any failing sink
it is then disabled with one warning and training goes on.

What it writes:

* Every ``every`` steps, the window metrics of :mod:`gradwatch.report.tracker`
  (``grad_norm/global``, ``grad_norm/clip_coef``, ``grad_norm/<layer>``, counts), the window's
  last step as ``gradwatch/step`` (their x-axis, through ``define_metric``), and
  ``gradwatch/layer_norms_log10``: a histogram over the layers of log10 of each layer's norm,
  which W&B draws over time like gradwatch's heatmap (a dead or exploding depth shows at a glance).
* Alerts: the first alert of each kind as a W&B alert (``run.alert``, e-mail/Slack) when the run
  is online; in every mode, ``gradwatch/alert_count`` and ``gradwatch/last_alert`` in the run's
  summary as alerts happen and a ``gradwatch/alerts`` table at the end (step, kind, cause,
  parameters, message), so an offline run keeps them once synced.
* At the end: run summary entries (``gradwatch/steps``, ``gradwatch/nan_steps``,
  ``gradwatch/diagnosis``, ...), a ``gradwatch/findings`` table (the diagnosis with its evidence
  and remedies) and a ``gradwatch/layers`` table (the per-layer statistics); the watcher's
  configuration under ``config["gradwatch"]``.

Points are logged with ``commit=False``, as ``wandb.watch`` does: they join your next
``wandb.log`` row, so your own step count (and ``wandb.log(..., step=...)``) is left alone; if you
log nothing between two windows, the earlier point is committed on its own rather than overwritten.

Needs the ``wandb`` package: ``pip install "gradwatch[wandb]"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradwatch._optional import require
from gradwatch.errors import StateError
from gradwatch.records import Event, RunStart, RunSummary
from gradwatch.report.tracker import (
    ALERT_LEVELS,
    TrackerSink,
    Window,
    finding_line,
    summary_line,
)

__all__ = ["WandbSink"]

STEP_KEY = "gradwatch/step"
HISTOGRAM_KEY = "gradwatch/layer_norms_log10"
LAYER_COLUMNS = ["layer", "min", "mean", "max", "last", "steps", "nan_steps", "spike_culprit"]
ALERT_COLUMNS = ["step", "kind", "cause", "params", "message"]
FINDING_COLUMNS = ["severity", "kind", "cause", "params", "first_step", "evidence", "remedies"]


class WandbSink(TrackerSink):
    """Writes gradient norms, alerts and the final diagnosis to an open W&B run.

    Args:
        run: The run to write to (a ``wandb.Run``); None: ``wandb.run``, the run open when the
            first point is due.
        every: Steps per point; the steps in between are aggregated (max, min, mean, counts).
        layer_depth: Group parameters into layers by their first ``layer_depth`` name parts
            (None: the watcher's ``layer_depth``, else by owning module).
        layers: Log ``grad_norm/<layer>`` only for layers matching these glob patterns
            (``"encoder.*"``); None: every layer. The histogram always covers every layer.

    Raises:
        MissingExtraError: ``wandb`` is not installed.
        ValueError, TypeError: An argument is invalid (the message names it).
    """

    def __init__(
        self,
        run: Any = None,
        *,
        every: int = 50,
        layer_depth: int | None = None,
        layers: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(every=every, layer_depth=layer_depth, layers=layers)
        self._wandb = require("wandb", extra="wandb")
        self._run = run
        self._ready = False
        self._start: RunStart | None = None
        self._uncommitted: int | None = None  # run.step of our last point, if not committed yet

    @property
    def run(self) -> Any:
        """The W&B run written to (found at the first point; see the class docstring).

        Raises:
            StateError: No run was passed and none is open.
        """
        run = self._run
        if run is None:
            run = self._wandb.run
            if run is None:
                raise StateError(
                    "WandbSink found no open W&B run: call wandb.init(...) before training (or "
                    "pass WandbSink(run=...)); gradwatch writes to your run and never starts one"
                )
            self._run = run
        if not self._ready:
            self._ready = True
            run.define_metric(STEP_KEY)
            for key in ("grad_norm/*", HISTOGRAM_KEY, "gradwatch/alert_count"):
                run.define_metric(key, step_metric=STEP_KEY)
            if self._start is not None:
                config = {"version": self._start.gradwatch_version, **self._start.config}
                run.config.update({"gradwatch": config}, allow_val_change=True)
        return run

    # ------------------------------------------------------------------------ writing

    def log_start(self, start: RunStart) -> None:
        self._start = start  # written with the first point: the run may not be open yet

    def log_window(self, window: Window) -> None:
        data: dict[str, Any] = {STEP_KEY: window.step, **window.metrics}
        values = window.layer_values[np.isfinite(window.layer_values) & (window.layer_values > 0)]
        if len(values):
            data[HISTOGRAM_KEY] = self._wandb.Histogram(np.log10(values))
        if window.events:
            data["gradwatch/alert_count"] = self.alert_count
            self.run.summary["gradwatch/last_alert"] = window.events[-1].message
        self._log(data)

    def log_alert(self, event: Event) -> None:
        run = self.run
        run.summary.update(
            {"gradwatch/alert_count": self.alert_count, "gradwatch/last_alert": event.message}
        )
        if _online(run):
            level = getattr(self._wandb.AlertLevel, ALERT_LEVELS.get(event.kind, "WARN"))
            run.alert(title=f"gradwatch: {event.kind}", text=event.message, level=level)

    def log_summary(self, summary: RunSummary, events: Sequence[Event]) -> None:
        run = self.run
        table = self._wandb.Table
        data: dict[str, Any] = {
            "gradwatch/layers": table(columns=LAYER_COLUMNS, data=_layer_rows(summary)),
        }
        if events:
            data["gradwatch/alerts"] = table(
                columns=ALERT_COLUMNS,
                data=[
                    [e.step, e.kind, e.cause or "", ", ".join(e.params), e.message] for e in events
                ],
            )
        if summary.findings:
            data["gradwatch/findings"] = table(columns=FINDING_COLUMNS, data=_finding_rows(summary))
        self._log(data)
        problems = [f for f in summary.findings if f.severity != "info"]
        origin = summary.nonfinite_origins[0] if summary.nonfinite_origins else None
        run.summary.update(
            {
                "gradwatch/steps": summary.steps,
                "gradwatch/global_norm_max": _cell(summary.global_max),
                "gradwatch/global_norm_mean": _cell(summary.global_mean),
                "gradwatch/clipped_steps": summary.clipped_steps,
                "gradwatch/clip_rate": summary.clip_rate,
                "gradwatch/spikes": summary.spikes,
                "gradwatch/loss_spikes": summary.loss_spikes,
                "gradwatch/nan_steps": summary.nonfinite_steps,
                "gradwatch/skipped_steps": summary.skipped_steps,
                "gradwatch/alert_count": self.alert_count,
                "gradwatch/first_nonfinite": f"step {origin[0]}: {origin[1]}" if origin else "",
                "gradwatch/diagnosis": finding_line(problems[0]) if problems else "",
                "gradwatch/totals": summary_line(summary),
            }
        )

    def finish(self) -> None:
        """Nothing to release: the run is yours (W&B writes in its own process)."""

    def _log(self, data: dict[str, Any]) -> None:
        run = self.run
        if self._uncommitted is not None and run.step == self._uncommitted:
            run.log({}, commit=True)  # nothing committed our last point since: commit it alone
        run.log(data, commit=False)
        self._uncommitted = run.step


def _layer_rows(s: RunSummary) -> list[list[Any]]:
    rows = []
    for layer in s.layers:
        norms = [_cell(v) for v in (layer.min, layer.mean, layer.max, layer.last)]
        rows.append([layer.name, *norms, layer.steps, layer.nonfinite_steps, layer.spike_culprit])
    return rows


def _finding_rows(s: RunSummary) -> list[list[Any]]:
    rows = []
    for f in s.findings:
        where, remedies = ", ".join(f.params), "\n".join(f.remedies)
        rows.append([f.severity, f.kind, f.cause, where, f.first_step, f.evidence, remedies])
    return rows


def _online(run: Any) -> bool:
    """True if ``run.alert`` reaches W&B now (not an offline or disabled run)."""
    return not getattr(run, "offline", False) and not getattr(run, "disabled", False)


def _cell(value: float) -> float | None:
    """A float for a W&B table or summary: None for NaN/Inf (they do not serialise)."""
    return value if math.isfinite(value) else None
