"""Logging sink: alerts and summaries through Python's ``logging``, for runs that route logs.

Alerts (NaN/Inf, spikes, skipped steps) go out at WARNING as they happen, a one-line summary of
every ``every`` steps and the final per-layer table at INFO; both levels are configurable. Each
log record carries the gradwatch record it came from as ``record.gradwatch``, so a handler can
forward structured data instead of parsing the message.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from gradwatch.errors import ConfigTypeError
from gradwatch.records import Event, Record, RunSummary
from gradwatch.report.console import ConsoleSink
from gradwatch.report.sink import Sink
from gradwatch.report.text import summary_notes, summary_table, window_line
from gradwatch.report.windowed import StepWindow, WindowedSink
from gradwatch.validation import check_int

__all__ = ["LoggingSink"]


class LoggingSink(WindowedSink):
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

    When logging is not configured (no handler anywhere on the logger's way to the root),
    Python prints warnings through its "last resort" handler on stderr; next to a
    :class:`~gradwatch.ConsoleSink` that prints the same alerts, the sink then leaves them to the
    console rather than show each alert twice. Configure logging (``logging.basicConfig()``, a
    handler) and every alert is logged.

    Raises:
        TypeError, ValueError: An argument is invalid (the message names it).
    """

    render_partial = False  # the final table covers the steps after the last full window

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
        super().__init__(every=every, layer_depth=layer_depth, minimum_every=0)
        self.logger = logger
        self.level = level
        self.alert_level = alert_level
        self.top_k = check_int("top_k", top_k, minimum=0)
        self.max_rows = check_int("max_rows", max_rows)
        self._console_alerts = False  # a ConsoleSink of the same watcher prints the alerts

    def join(self, sinks: Sequence[Sink]) -> None:
        """Note whether a :class:`~gradwatch.ConsoleSink` of the same watcher prints alerts."""
        self._console_alerts = any(isinstance(s, ConsoleSink) and s.alerts for s in sinks)

    def render_window(self, window: StepWindow) -> None:
        if self.logger.isEnabledFor(self.level):
            line = window_line(window.stats, top_k=self.top_k).plain
            self._log(self.level, "%s", line, record=window.stats)

    def render_event(self, event: Event) -> None:
        if self._console_alerts and not self.logger.hasHandlers():
            return  # logging's last resort would print the console's alert a second time
        self._log(self.alert_level, "gradwatch: %s", event.message, record=event)

    def render_summary(self, summary: RunSummary) -> None:
        if self.logger.isEnabledFor(self.level):
            table = _plain(summary, self.max_rows)
            self._log(self.level, "gradwatch: run finished\n%s", table, record=summary)

    def _log(self, level: int, message: str, *args: Any, record: Record) -> None:
        self.logger.log(level, message, *args, extra={"gradwatch": record})


def _plain(summary: RunSummary, max_rows: int) -> str:
    """The final table and notes as plain text (no colour codes), not folding layer names."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, color_system=None, force_terminal=False)
    console.print(summary_table(summary, max_rows=max_rows))
    return buffer.getvalue().rstrip("\n") + "\n" + summary_notes(summary)
