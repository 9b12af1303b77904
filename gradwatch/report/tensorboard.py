"""TensorBoard sink: gradient-norm scalars under the ecosystem's keys, events as text.

Scalars (one point per ``every`` steps, at the window's last step):

* ``grad_norm/global``: the global norm before clipping; with ``every > 1``, the largest finite
  one in the window, so a spike between two points is not lost (NaN if none was finite).
* ``grad_norm/clip_coef``: the factor gradients were scaled by; with ``every > 1``, the smallest
  in the window (the hardest clip).
* ``grad_norm/<layer>``: each layer's norm (its parameters' gradients taken together), grouped by
  owning module or ``layer_depth``; with ``every > 1``, the layer's largest finite norm.
* With ``every > 1`` only: ``grad_norm/global_mean`` and ``grad_norm/clip_rate``.

Text: ``gradwatch/events`` (the alerts of each step, one entry per step), ``gradwatch/run`` (the
configuration) and ``gradwatch/summary`` (the final per-layer table).

Needs the ``tensorboard`` package: ``pip install "gradwatch[tensorboard]"``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from gradwatch._optional import require
from gradwatch.config import check_int
from gradwatch.errors import ConfigError
from gradwatch.records import Event, Record, RunStart, RunSummary, StepReport
from gradwatch.report.base import NEVER, Sink, StepAggregator
from gradwatch.report.console import fmt

__all__ = ["TensorBoardSink"]


class TensorBoardSink(Sink):
    """Writes gradient norms and events to TensorBoard event files.

    Args:
        log_dir: Directory of the event files (as ``SummaryWriter(log_dir)``). Leave it out when
            passing ``writer``.
        every: Steps per point; values in between are aggregated (max, min, rate), not dropped.
        layer_depth: Group parameters into layers by their first ``layer_depth`` name parts
            (None: the watcher's ``layer_depth``, else by owning module).
        writer: An existing ``torch.utils.tensorboard.SummaryWriter`` to share with the rest of
            the training loop's metrics; the sink flushes it but does not close it.

    Raises:
        MissingExtraError: ``tensorboard`` is not installed.
        ValueError, TypeError: An argument is invalid (the message names it).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        every: int = 1,
        layer_depth: int | None = None,
        writer: Any = None,
    ) -> None:
        self.every = check_int("every", every)
        if layer_depth is not None:
            check_int("layer_depth", layer_depth)
        self.layer_depth = layer_depth
        if (log_dir is None) == (writer is None):
            raise ConfigError(
                "give exactly one of log_dir (a directory for new event files) or writer (an "
                f"existing SummaryWriter); got log_dir={log_dir!r}, writer={writer!r}"
            )
        if writer is None:
            require("tensorboard", extra="tensorboard")
            tensorboard = require("torch.utils.tensorboard", extra="tensorboard")
            writer = tensorboard.SummaryWriter(log_dir=os.fspath(log_dir))  # type: ignore[arg-type]
            self._owns_writer = True
        else:
            self._owns_writer = False
        self.writer = writer
        self._window: StepAggregator | None = None
        self._clip_min = math.inf
        self._events: list[Event] = []

    # ------------------------------------------------------------------------------ records

    def next_due(self, step: int) -> int:
        """Never early: tensorboard's background writer flushes on its own schedule anyway."""
        return NEVER

    def write(self, record: Record) -> None:
        if isinstance(record, StepReport):
            self._flush_events()
            self._step(record)
        elif isinstance(record, Event):
            self._events.append(record)
        elif isinstance(record, RunStart):
            depth = self.layer_depth
            if depth is None:
                depth = record.config.get("layer_depth")
            self._window = StepAggregator([p.name for p in record.params], depth=depth)
            self.writer.add_text("gradwatch/run", _run_text(record), 0)
        elif isinstance(record, RunSummary):
            self._flush_events()
            self._emit()
            step = record.last_step if record.last_step is not None else 0
            self.writer.add_text("gradwatch/summary", _summary_text(record), step)
            self.writer.flush()

    def close(self) -> None:
        """Write what is pending and close the writer (flush only, if it was passed in)."""
        self._flush_events()
        self._emit()
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()

    # ------------------------------------------------------------------------------ writing

    def _step(self, report: StepReport) -> None:
        if self._window is None:
            names = list(report.param_norms.names)
            self._window = StepAggregator(names, depth=self.layer_depth)
        self._window.update(report)
        self._clip_min = min(self._clip_min, report.clip_coef)
        if self._window.steps >= self.every:
            self._emit()

    def _emit(self) -> None:
        """One point per tag for the current window, at its last step."""
        window = self._window
        if window is None or not window.steps:
            return
        s = window.summary()
        step = s.last_step
        add = self.writer.add_scalar
        if self.every == 1:
            add("grad_norm/global", s.global_last, step)
            layers = [layer.last for layer in s.layers]
        else:
            add("grad_norm/global", s.global_max, step)  # NaN if no step was finite
            add("grad_norm/global_mean", s.global_mean, step)
            add("grad_norm/clip_rate", s.clip_rate, step)
            # largest finite norm of each layer; where none was finite, its last (NaN/inf) value
            layers = [layer.max if layer.steps else layer.last for layer in s.layers]
        add("grad_norm/clip_coef", self._clip_min, step)
        for layer, value in zip(s.layers, layers):
            add(f"grad_norm/{layer.name}", value, step)
        window.reset()
        self._clip_min = math.inf

    def _flush_events(self) -> None:
        if not self._events:
            return
        by_step: dict[int, list[str]] = {}
        for event in self._events:
            by_step.setdefault(event.step, []).append(f"**{event.kind}**: {event.message}")
        for step, lines in by_step.items():
            self.writer.add_text("gradwatch/events", "\n\n".join(lines), step)
        self._events = []


def _run_text(start: RunStart) -> str:
    config = ", ".join(f"{k}={v!r}" for k, v in start.config.items())
    return (
        f"gradwatch {start.gradwatch_version}, torch {start.torch_version}; "
        f"{len(start.params)} parameters watched\n\n{config}"
    )


def _summary_text(s: RunSummary) -> str:
    """The final summary as a markdown table (TensorBoard renders markdown in text entries)."""
    lines = [
        f"{s.steps} steps; global norm min {fmt(s.global_min)}, mean {fmt(s.global_mean)}, "
        f"max {fmt(s.global_max)}; clipped {s.clipped_steps}, spikes {s.spikes}, "
        f"NaN/Inf steps {s.nonfinite_steps}, skipped {s.skipped_steps}",
        "",
        "| layer | min | mean | max | last | NaN steps | spike culprit |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in s.layers:
        lines.append(
            f"| {layer.name} | {fmt(layer.min)} | {fmt(layer.mean)} | {fmt(layer.max)} | "
            f"{fmt(layer.last)} | {layer.nonfinite_steps} | {layer.spike_culprit} |"
        )
    if s.nonfinite_origins:
        step, name = s.nonfinite_origins[0]
        lines += ["", f"NaN/Inf first appeared at step {step} in `{name}`."]
    return "\n".join(lines)
