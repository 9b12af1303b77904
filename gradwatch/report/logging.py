"""Logging sink: alerts and summaries through Python's ``logging``, for runs that route logs.

Alerts (NaN/Inf, spikes, skipped steps) go out at WARNING as they happen, a one-line summary of
every ``every`` steps and the final per-layer table at INFO; both levels are configurable. Each
log record carries the gradwatch record it came from as ``record.gradwatch``, so a handler can
forward structured data instead of parsing the message.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from rich.console import Console

from gradwatch.config import check_int
from gradwatch.errors import ConfigTypeError
from gradwatch.records import Event, Record, RunStart, RunSummary, StepReport
from gradwatch.report.base import Sink, StepAggregator, window_due
from gradwatch.report.console import summary_notes, summary_table, window_line

__all__ = ["LoggingSink"]


class LoggingSink(Sink):
    """Sends alerts, periodic summaries and the final summary to a :mod:`logging` logger.

    Args:
        logger: A ``logging.Logger`` (or ``LoggerAdapter``), or the name of one. Default
            ``"gradwatch"``.
        every: Steps per periodic summary line (0: none). The line covers every step of the
            window: latest, mean and largest global norm, clip rate, counts, largest layers.
        level: Level of the periodic and final summaries (default INFO).
        alert_level: Level of alerts (default WARNING).
        top_k: Layers named in the periodic line.
        max_rows: Layers in the final table.
        layer_depth: Group parameters into layers by their first ``layer_depth`` name parts
            (None: the watcher's ``layer_depth``, else by owning module).

    Raises:
        TypeError, ValueError: An argument is invalid (the message names it).
    """

    def __init__(
        self,
        logger: logging.Logger | logging.LoggerAdapter[Any] | str = "gradwatch",
        *,
        every: int = 100,
        level: int = logging.INFO,
        alert_level: int = logging.WARNING,
        top_k: int = 3,
        max_rows: int = 40,
        layer_depth: int | None = None,
    ) -> None:
        if isinstance(logger, str):
            logger = logging.getLogger(logger)
        if not isinstance(logger, logging.Logger | logging.LoggerAdapter):
            raise ConfigTypeError(
                "logger must be a logging.Logger, a LoggerAdapter or a logger name, "
                f"got {type(logger).__name__}"
            )
        for name, value in (("level", level), ("alert_level", alert_level)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigTypeError(
                    f"{name} must be a logging level such as logging.INFO, got {value!r}"
                )
        self.logger = logger
        self.every = check_int("every", every, minimum=0)
        self.level = level
        self.alert_level = alert_level
        self.top_k = check_int("top_k", top_k, minimum=0)
        self.max_rows = check_int("max_rows", max_rows)
        if layer_depth is not None:
            check_int("layer_depth", layer_depth)
        self.layer_depth = layer_depth
        self._window: StepAggregator | None = None

    def next_due(self, step: int) -> int:
        """The step completing the current window, so its line is logged on time (0: never)."""
        return window_due(step, self.every, self._window.steps if self._window is not None else 0)

    def write(self, record: Record) -> None:
        if isinstance(record, StepReport):
            self._step(record)
        elif isinstance(record, Event):
            self._log(self.alert_level, "gradwatch: %s", record.message, record=record)
        elif isinstance(record, RunStart):
            depth = self.layer_depth
            if depth is None:
                depth = record.config.get("layer_depth")
            self._window = StepAggregator([p.name for p in record.params], depth=depth)
        elif isinstance(record, RunSummary) and self.logger.isEnabledFor(self.level):
            table = _plain(record, self.max_rows)
            self._log(self.level, "gradwatch: run finished\n%s", table, record=record)

    def _step(self, report: StepReport) -> None:
        if not self.every:
            return
        if self._window is None:
            names = list(report.param_norms.names)
            self._window = StepAggregator(names, depth=self.layer_depth)
        self._window.update(report)
        if self._window.steps >= self.every:
            if self.logger.isEnabledFor(self.level):
                window = self._window.summary()
                line = window_line(window, top_k=self.top_k).plain
                self._log(self.level, "%s", line, record=window)
            self._window.reset()

    def _log(self, level: int, message: str, *args: Any, record: Record) -> None:
        self.logger.log(level, message, *args, extra={"gradwatch": record})


def _plain(summary: RunSummary, max_rows: int) -> str:
    """The final table and notes as plain text (no colour codes), not folding layer names."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, color_system=None, force_terminal=False)
    console.print(summary_table(summary, max_rows=max_rows))
    return buffer.getvalue().rstrip("\n") + "\n" + summary_notes(summary)
