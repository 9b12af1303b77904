"""The base of every sink that reports windows of steps: it owns the windowing, a subclass renders.

:class:`WindowedSink` receives the records, groups parameters into layers (its ``layer_depth``,
else the watcher's), aggregates every step of each window of ``every`` steps with one
:class:`~gradwatch.report.stats.StepAggregator` (nothing between two windows is sampled away),
asks for each window's last step as soon as it is computed (:meth:`~gradwatch.report.sink.
Sink.next_due`), and closes the last, partial window at the end. A subclass writes only what it
shows: :meth:`~WindowedSink.render_window`, and if it wants them :meth:`~WindowedSink.
render_event`, :meth:`~WindowedSink.render_summary`, :meth:`~WindowedSink.render_start` and
:meth:`~WindowedSink.finish` (the model is rich's ``ProgressColumn``: the base owns the
mechanics, ``FileSizeColumn`` is a few lines of ``render``). A sink of a few lines::

    class PeakSink(gradwatch.WindowedSink):
        def render_window(self, window):
            print(window.step, window.stats.global_max)
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from gradwatch.records import Event, Record, RunStart, RunSummary, StepReport
from gradwatch.report.sink import Sink, window_due
from gradwatch.report.stats import LayerGroups, StepAggregator
from gradwatch.validation import check_int

__all__ = ["WINDOW_EVENTS", "StepWindow", "WindowedSink"]

WINDOW_EVENTS = 100
"""Events a window keeps for its sink (the latest); a bad run's long window holds no more."""


class StepWindow:
    """One closed window of steps, as a :class:`WindowedSink` renders it.

    Its statistics are computed when first read (a sink that shows only the last step never
    pays for them) and never change afterwards.

    Attributes:
        last: The window's last step.
        events: For a sink with ``window_events`` on, the events that arrived since the previous
            window closed (alerts of a window's last step arrive just after it, so they open the
            next window), the latest :data:`WINDOW_EVENTS` of them: a long window of a bad run
            keeps no more.
        events_seen: How many events arrived in all (more than ``len(events)`` when some were
            dropped).
    """

    def __init__(
        self,
        aggregator: StepAggregator,
        last: StepReport,
        events: Sequence[Event],
        events_seen: int | None = None,
    ) -> None:
        self._aggregator = aggregator
        self.last = last
        self.events = tuple(events)
        self.events_seen = len(self.events) if events_seen is None else events_seen

    @property
    def step(self) -> int:
        """The window's last step (where a point for the window goes)."""
        return self.last.step

    @property
    def steps(self) -> int:
        """How many steps the window holds."""
        return self._aggregator.steps

    @functools.cached_property
    def stats(self) -> RunSummary:
        """The window's statistics (every step counts): norms, counts, per-layer rows."""
        return self._aggregator.summary()

    @functools.cached_property
    def totals(self) -> RunSummary:
        """The window's statistics without the per-layer rows (cheaper for many layers)."""
        if "stats" in self.__dict__:
            return self.stats
        return self._aggregator.summary(layers=False)

    @functools.cached_property
    def clip_min(self) -> float:
        """The window's smallest finite clip coefficient (its hardest clip), NaN if none."""
        return self._aggregator.clip_min()

    @functools.cached_property
    def layer_max(self) -> np.ndarray:
        """Each layer's largest finite norm in the window, NaN where none was finite."""
        return self._aggregator.layer_max()

    @functools.cached_property
    def layer_peaks(self) -> np.ndarray:
        """Each layer's value for one point per window: its largest finite norm, or where none
        was finite its last value (NaN/inf, so a broken layer shows as broken)."""
        last = np.array([layer.last for layer in self.stats.layers], dtype=np.float64)
        return np.where(np.isnan(self.layer_max), last, self.layer_max)


class WindowedSink(Sink):
    """Base class of the sinks that report every ``every`` steps: subclasses render windows.

    Args:
        every: Steps per window. 0 (where ``minimum_every`` allows it): no windows, only events
            and the summary.
        layer_depth: Group parameters into layers by their first ``layer_depth`` name parts
            (None: the watcher's ``layer_depth``, else by owning module).
        minimum_every: The smallest ``every`` this sink accepts.

    Raises:
        TypeError, ValueError: ``every`` or ``layer_depth`` is invalid (the message names it).
    """

    render_partial: ClassVar[bool] = True
    """Render the last window at the end even when it holds fewer than ``every`` steps."""

    window_events: ClassVar[bool] = False
    """Hand each window the events that arrived during it (:attr:`StepWindow.events`); a sink
    that renders events as they come leaves it off and keeps none."""

    def __init__(
        self, *, every: int = 50, layer_depth: int | None = None, minimum_every: int = 1
    ) -> None:
        self.every = check_int("every", every, minimum=minimum_every)
        if layer_depth is not None:
            check_int("layer_depth", layer_depth)
        self.layer_depth = layer_depth
        self._groups: LayerGroups | None = None
        self._window: StepAggregator | None = None
        self._last: StepReport | None = None
        self._events: deque[Event] = deque(maxlen=WINDOW_EVENTS)
        self._events_seen = 0

    # ----------------------------------------------------------------- for subclasses

    def render_start(self, start: RunStart) -> None:
        """The watcher's configuration, once, before anything else (default: nothing)."""

    def render_window(self, window: StepWindow) -> None:
        """Show or store one closed window."""
        raise NotImplementedError

    def render_event(self, event: Event) -> None:
        """An alert, as soon as it happens (default: nothing)."""

    def render_summary(self, summary: RunSummary) -> None:
        """The final summary, after the last window (default: nothing)."""

    def finish(self) -> None:
        """Release what the sink holds, after the last record (default: nothing)."""

    def layer_groups(self, names: Sequence[str], depth: int | None) -> LayerGroups:
        """How this sink groups parameters (default: into layers, as ``layer_depth`` says)."""
        return LayerGroups(names, depth)

    # ----------------------------------------------------------------------- records

    def next_due(self, step: int) -> int:
        """Each window as soon as its last step is computed (never, for ``every=0``)."""
        return window_due(step, self.every, self._window.steps if self._window else 0)

    def write(self, record: Record) -> None:
        if isinstance(record, StepReport):
            self._step(record)
        elif isinstance(record, Event):
            if self.every and self.window_events:
                self._events.append(record)
                self._events_seen += 1
            self.render_event(record)
        elif isinstance(record, RunStart):
            depth = self.layer_depth
            if depth is None:
                depth = record.config.get("layer_depth")
            self._groups = self.layer_groups([p.name for p in record.params], depth)
            self.render_start(record)
        elif isinstance(record, RunSummary):
            self._close_window(partial=self.render_partial)
            self.render_summary(record)

    def close(self) -> None:
        """Render the pending window (if partial windows are rendered), then :meth:`finish`."""
        self._close_window(partial=self.render_partial)
        self.finish()

    # ----------------------------------------------------------------------- windows

    def _step(self, report: StepReport) -> None:
        if not self.every:
            return
        window = self._window
        if window is None:
            if self._groups is None:  # fed without a RunStart
                self._groups = self.layer_groups(list(report.param_norms.names), self.layer_depth)
            window = self._window = StepAggregator.of(self._groups)
        window.update(report)
        self._last = report
        if window.steps >= self.every:
            self._close_window(partial=True)

    def _close_window(self, *, partial: bool) -> None:
        window, last = self._window, self._last
        if window is None or last is None or not window.steps:
            return
        self._window = None
        events, seen = tuple(self._events), self._events_seen
        self._events.clear()
        self._events_seen = 0
        if partial or window.steps >= self.every:
            self.render_window(StepWindow(window, last, events, seen))
