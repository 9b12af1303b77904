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

import os
from typing import Any

from gradwatch._optional import require
from gradwatch.errors import ConfigError
from gradwatch.records import Event, RunStart, RunSummary
from gradwatch.report.sink import NEVER
from gradwatch.report.text import fmt
from gradwatch.report.windowed import StepWindow, WindowedSink

__all__ = ["TensorBoardSink", "window_scalars"]


class TensorBoardSink(WindowedSink):
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
        super().__init__(every=every, layer_depth=layer_depth)
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
        self._pending: list[Event] = []

    def next_due(self, step: int) -> int:
        """Never early: tensorboard's background writer flushes on its own schedule anyway."""
        return NEVER

    # ---------------------------------------------------------------------------- rendering

    def render_start(self, start: RunStart) -> None:
        self.writer.add_text("gradwatch/run", _run_text(start), 0)

    def render_window(self, window: StepWindow) -> None:
        """One point per tag for the window, at its last step."""
        self._flush_events()
        for tag, value in window_scalars(window, self.every).items():
            self.writer.add_scalar(tag, value, window.step)

    def render_event(self, event: Event) -> None:
        self._pending.append(event)

    def render_summary(self, summary: RunSummary) -> None:
        self._flush_events()
        step = summary.last_step if summary.last_step is not None else 0
        self.writer.add_text("gradwatch/summary", _summary_text(summary), step)
        self.writer.flush()

    def finish(self) -> None:
        """Close the writer (flush only, if it was passed in)."""
        self._flush_events()
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()

    def _flush_events(self) -> None:
        """The events so far, one text entry per step (TensorBoard shows one entry per step)."""
        if not self._pending:
            return
        by_step: dict[int, list[str]] = {}
        for event in self._pending:
            by_step.setdefault(event.step, []).append(f"**{event.kind}**: {event.message}")
        for step, lines in by_step.items():
            self.writer.add_text("gradwatch/events", "\n\n".join(lines), step)
        self._pending = []


def window_scalars(window: StepWindow, every: int) -> dict[str, float]:
    """The ``grad_norm/*`` values of one window (see the module docstring), layers last."""
    s = window.stats
    if every == 1:
        out = {"grad_norm/global": s.global_last}
    else:
        out = {
            "grad_norm/global": s.global_max,  # NaN if no step was finite
            "grad_norm/global_mean": s.global_mean,
            "grad_norm/clip_rate": s.clip_rate,
        }
    out["grad_norm/clip_coef"] = window.clip_min  # NaN when no step had a finite factor
    for layer, value in zip(s.layers, window.layer_peaks):
        out[f"grad_norm/{layer.name}"] = float(value)
    return out


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
