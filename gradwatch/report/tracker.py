"""The experiment-tracker sinks' shared mechanics: windows of steps, alerts, the final summary.

:class:`TrackerSink` owns what every tracker sink does alike. As a
:class:`~gradwatch.report.windowed.WindowedSink` it gets each window of ``every`` steps (every step
counts); it turns the window into the metric keys below, passes on each kind of alert the first
time it happens, and hands over the final summary. A subclass (:class:`~gradwatch.report.wandb_sink.
WandbSink`, :class:`~gradwatch.report.mlflow_sink.MLflowSink`) only writes these to its tracker.

Window metrics (one point per window, at the window's last step), the keys of
:class:`~gradwatch.TensorBoardSink` plus the window's counts:

* ``grad_norm/global``: the global norm before clipping; with ``every > 1`` the largest finite
  one of the window, so a spike between two points is not lost (NaN if none was finite).
* ``grad_norm/clip_coef``: the factor the gradients were scaled by (1.0: not clipped); with
  ``every > 1`` the smallest of the window (the hardest clip).
* ``grad_norm/<layer>``: each layer's norm (its parameters' gradients taken together); with
  ``every > 1`` its largest finite norm of the window.
* With ``every > 1`` only: ``grad_norm/global_mean`` (mean of the finite global norms) and
  ``grad_norm/clip_rate`` (fraction of the window's steps that were clipped).
* ``grad_norm/nan_steps``, ``grad_norm/skipped_steps``, ``grad_norm/spikes``: steps of the window
  with a NaN/Inf gradient, skipped, flagged as a gradient-norm spike.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.errors import ConfigError, ConfigTypeError
from gradwatch.records import Event, Finding, RunStart, RunSummary
from gradwatch.report.stats import LayerGroups
from gradwatch.report.tensorboard import window_scalars
from gradwatch.report.text import fmt
from gradwatch.report.windowed import StepWindow, WindowedSink

__all__ = [
    "ALERT_LEVELS",
    "MAX_EVENTS",
    "PREFIX",
    "TrackerSink",
    "Window",
    "finding_line",
    "layer_patterns",
    "match_layers",
    "summary_line",
]

PREFIX = "grad_norm/"
"""Namespace of the window metrics."""

MAX_EVENTS = 1000
"""Alerts a tracker sink keeps for its final table; later ones are counted only."""

ALERT_LEVELS = {
    "nonfinite": "ERROR",
    "loss_nonfinite": "ERROR",
    "exploding": "ERROR",
    "spike": "WARN",
    "loss_spike": "WARN",
    "skip": "WARN",
    "vanishing": "WARN",
    "dead": "WARN",
    "unused": "INFO",
}
"""How loud each kind of alert is, in the trackers' three levels (``INFO``, ``WARN``, ``ERROR``)."""


@dataclass(frozen=True)
class Window:
    """One window of steps, ready to be written to a tracker.

    Attributes:
        step: The window's last step (where its points go).
        metrics: Metric key -> value, the keys listed in this module's docstring (the layers
            kept by the sink's ``layers`` filter only).
        layer_values: The value of every layer in this window (the one its ``grad_norm/<layer>``
            key has), in model order, for a histogram over the layers.
        events: The alerts since the previous window.
    """

    step: int
    metrics: dict[str, float]
    layer_values: np.ndarray
    events: tuple[Event, ...]


class TrackerSink(WindowedSink):
    """Base class of the experiment-tracker sinks: subclasses write what this class prepares.

    A subclass implements :meth:`log_window`, :meth:`log_alert` and :meth:`log_summary`, and
    optionally :meth:`log_start` and :meth:`finish`. The tracker's run is the subclass's business;
    this class never opens or ends one.

    Args:
        every: Steps per window (one point per metric and window).
        layer_depth: Group parameters into layers by their first ``layer_depth`` name parts
            (None: the watcher's ``layer_depth``, else by owning module).
        layers: Log ``grad_norm/<layer>`` only for the layers matching these glob patterns
            (``"encoder.*"``, ``["embed", "head"]``); None: every layer.

    Attributes:
        events: The run's alerts so far (the first :data:`MAX_EVENTS`).
        alert_count: Every alert of the run, counted.
    """

    window_events = True  # the window's last alert goes to the tracker with it

    def __init__(
        self,
        *,
        every: int = 50,
        layer_depth: int | None = None,
        layers: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(every=every, layer_depth=layer_depth)
        self.layers = layer_patterns("layers", layers)
        self.events: list[Event] = []
        self.alert_count = 0
        self._keep: np.ndarray | None = None  # which layers get a grad_norm/<layer> key
        self._kinds_seen: set[str] = set()

    # ----------------------------------------------------------------- for subclasses

    def log_start(self, start: RunStart) -> None:
        """The watcher's configuration, once, before anything else (default: nothing)."""

    def log_window(self, window: Window) -> None:
        """Write one window's metrics."""
        raise NotImplementedError

    def log_alert(self, event: Event) -> None:
        """The first alert of its kind in this run, as soon as it happens."""
        raise NotImplementedError

    def log_summary(self, summary: RunSummary, events: Sequence[Event]) -> None:
        """The final summary with its findings, and the run's alerts (after the last window)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------- rendering

    def layer_groups(self, names: Sequence[str], depth: int | None) -> LayerGroups:
        groups = super().layer_groups(names, depth)
        self._keep = match_layers(groups.layers, self.layers)
        return groups

    def render_start(self, start: RunStart) -> None:
        self.log_start(start)

    def render_window(self, window: StepWindow) -> None:
        metrics = window_scalars(window, self.every)
        s = window.stats
        metrics[PREFIX + "nan_steps"] = float(s.nonfinite_steps)
        metrics[PREFIX + "skipped_steps"] = float(s.skipped_steps)
        metrics[PREFIX + "spikes"] = float(s.spikes)
        for layer, kept in zip(s.layers, self._keep if self._keep is not None else ()):
            value = metrics.pop(PREFIX + layer.name)  # after the counts, only the kept ones
            if kept:
                metrics[PREFIX + layer.name] = value
        self.log_window(Window(window.step, metrics, window.layer_peaks, window.events))

    def render_event(self, event: Event) -> None:
        self.alert_count += 1
        if len(self.events) < MAX_EVENTS:
            self.events.append(event)
        if event.kind not in self._kinds_seen:
            self._kinds_seen.add(event.kind)
            self.log_alert(event)

    def render_summary(self, summary: RunSummary) -> None:
        self.log_summary(summary, tuple(self.events))


def layer_patterns(name: str, layers: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Validate a ``layers`` argument: None, one glob pattern, or a sequence of them."""
    if layers is None:
        return None
    patterns = (layers,) if isinstance(layers, str) else tuple(layers)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigTypeError(
            f"{name} must be a glob pattern such as 'encoder.*', a list of them, or None (every "
            f"layer), got {layers!r}"
        )
    return patterns


def match_layers(names: Sequence[str], patterns: tuple[str, ...] | None) -> np.ndarray:
    """Which of the layers ``names`` match any of ``patterns`` (all of them for None).

    Raises:
        ConfigError: A pattern matches no layer (a typo would otherwise log nothing, silently).
    """
    if patterns is None:
        return np.ones(len(names), dtype=bool)
    keep = np.zeros(len(names), dtype=bool)
    for pattern in patterns:
        hits = np.array([fnmatch.fnmatchcase(n, pattern) for n in names], dtype=bool)
        if len(names) and not hits.any():
            shown = ", ".join(repr(n) for n in names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(
                f"layers pattern {pattern!r} matches no layer; the layers are {shown} (glob "
                "patterns: '*' matches any text, e.g. 'encoder.*')"
            )
        keep |= hits
    return keep


def finding_line(finding: Finding) -> str:
    """A finding in one line: severity, kind, cause, where, and its evidence."""
    where = f" at {', '.join(finding.params[:3])}" if finding.params else ""
    return f"{finding.severity} {finding.kind} ({finding.cause}){where}: {finding.evidence}"


def summary_line(s: RunSummary) -> str:
    """The run's totals in one line."""
    return (
        f"{s.steps} steps; global norm min {fmt(s.global_min)}, mean {fmt(s.global_mean)}, "
        f"max {fmt(s.global_max)}; clipped {s.clipped_steps} ({s.clip_rate:.1%}), spikes "
        f"{s.spikes}, loss spikes {s.loss_spikes}, NaN/Inf steps {s.nonfinite_steps}, skipped "
        f"{s.skipped_steps}"
    )
