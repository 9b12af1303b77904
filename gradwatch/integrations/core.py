"""What a framework callback does, without the framework: the adapters only translate hooks.

:class:`CallbackCore` holds a callback's settings (the public constructor parameters of both
adapters), builds the watcher when training starts, collects each optimizer step with what the
framework did after gradwatch's check (its own clipping, a step its GradScaler skipped), closes a
window of steps into the metrics the adapter logs, counts the framework's clipping into the run
summary, and keeps the watcher's state for checkpoints. The Lightning and Hugging Face adapters
(:mod:`gradwatch.integrations.lightning`, :mod:`gradwatch.integrations.transformers`) call it from
their hooks and add nothing but where each step is taken from the framework.

Every arrow points one way. The framework's clipping happens after the watcher's check, so the
watcher's step reports (and the sinks receiving them) hold the norms gradwatch measured, before
the framework clipped; the core measures the norm after that clipping and writes it into the
window's metrics and :attr:`CallbackCore.history`. The run summary is completed before any sink
receives it: the sinks sit behind :class:`FrameworkSinks`, which counts the framework's clipped
steps (:class:`FrameworkClipping`) into ``clipped_steps`` on the way, and
:attr:`CallbackCore.summary` is that same record.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from gradwatch.act.clip import Clipper
from gradwatch.integrations.window import WindowStats, post_clip_norm
from gradwatch.records import Record, RunSummary, StepReport
from gradwatch.report.console import ConsoleSink
from gradwatch.report.sink import Sink, SinkGroup
from gradwatch.report.tracker import layer_patterns
from gradwatch.step_result import StepResult
from gradwatch.validation import NonFinitePolicy, SpikePolicy, check_int, check_sinks
from gradwatch.watch import GradWatch

__all__ = ["CallbackAdapter", "CallbackCore", "FrameworkClipping", "FrameworkSinks"]


class FrameworkClipping:
    """The steps a framework clipped after gradwatch's check (the watcher does not see them).

    Args:
        active: The framework clips (otherwise the watcher's own count stands).
    """

    def __init__(self, active: bool) -> None:
        self.active = active
        self.steps = 0

    def count(self, reports: Iterable[StepReport]) -> None:
        """Count a closed window's reports (with the framework's clipping filled in)."""
        if self.active:
            self.steps += sum(r.clipped for r in reports)

    def complete(self, summary: RunSummary) -> RunSummary:
        """The run summary with the framework's clipped steps as ``clipped_steps``."""
        return dataclasses.replace(summary, clipped_steps=self.steps) if self.active else summary


class FrameworkSinks(Sink):
    """A callback's sinks behind one sink: the run summary they get counts the framework's clips.

    Failing sinks are disabled one by one, as the watcher's own fan-out does.
    """

    def __init__(self, sinks: Sequence[Sink], clipping: FrameworkClipping) -> None:
        self._sinks = SinkGroup(sinks)
        self._clipping = clipping

    def write(self, record: Record) -> None:
        if isinstance(record, RunSummary):
            record = self._clipping.complete(record)
        self._sinks.write(record)

    def next_due(self, step: int) -> int:
        return self._sinks.next_due(step)

    def close(self) -> None:
        self._sinks.close()


class CallbackCore:
    """One framework callback's watcher, windows and state, whatever the framework.

    Args:
        clip: Let gradwatch clip instead of the framework.
        on_nonfinite: On NaN/Inf gradients: ``"warn"``, ``"skip"`` or ``"raise"``.
        on_spike: On a gradient-norm spike: ``"warn"``, ``"clip"``, ``"skip"`` or ``"raise"``.
        sinks: gradwatch sinks (main process only); None: alerts and the final table on the
            console.
        top_k: Layers logged by name each window (None: every layer; 0: none).
        layers: Glob patterns of the layers that may be logged by name.
        watch_options: Further :class:`~gradwatch.GradWatch` options.

    Attributes:
        watch: The watcher of the current run (None before it starts).
        history: Reports of the logged steps (bounded), with the framework's clipping filled in.
        summary: The run summary once the run closed, counting the steps the framework clipped.
    """

    def __init__(
        self,
        clip: Clipper | None,
        on_nonfinite: NonFinitePolicy,
        on_spike: SpikePolicy,
        sinks: list[Sink] | None,
        top_k: int | None,
        layers: str | Sequence[str] | None,
        watch_options: dict[str, Any],
    ) -> None:
        if sinks is not None:
            check_sinks("sinks", sinks)
        self.clip = clip
        self.on_nonfinite = on_nonfinite
        self.on_spike = on_spike
        self.sinks = sinks
        self.top_k = None if top_k is None else check_int("top_k", top_k, minimum=0)
        self.layers = layer_patterns("layers", layers)
        self.watch_options = watch_options
        self.watch: GradWatch | None = None
        self.history: deque[StepReport] = deque(maxlen=watch_options.get("history", 256))
        self.summary: RunSummary | None = None
        self.clipping = FrameworkClipping(False)
        self._window: WindowStats | None = None
        self._state: dict[str, Any] | None = None  # loaded before the watcher existed
        self._final_state: dict[str, Any] | None = None  # the last run's, once it closed

    @property
    def skips(self) -> bool:
        """A policy can skip steps (only then is a report read before the window closes)."""
        return "skip" in (self.on_nonfinite, self.on_spike)

    def _running(self) -> GradWatch | None:
        """The watcher, while its run is open."""
        return self.watch if self.watch is not None and not self.watch.closed else None

    # ------------------------------------------------------------------------- the run

    def start(
        self, model: torch.nn.Module, *, is_main_process: bool, framework_clips: bool
    ) -> GradWatch:
        """Build the watcher (closing a previous run), restoring a state loaded before it.

        Args:
            model: The module being trained.
            is_main_process: Only the main process gets the default console.
            framework_clips: The framework clips the gradients itself after the check.
        """
        self.close()
        self.clipping = FrameworkClipping(framework_clips)
        sinks: list[Sink] = list(self.sinks) if self.sinks is not None else []
        if self.sinks is None and is_main_process:
            sinks = [ConsoleSink(every=0)]  # alerts as they happen, the table at the end
        if framework_clips:
            sinks = [FrameworkSinks(sinks, self.clipping)]
        self.watch = GradWatch(
            model,
            clip=self.clip,
            on_nonfinite=self.on_nonfinite,
            on_spike=self.on_spike,
            sinks=sinks,
            **self.watch_options,
        )
        self._window = WindowStats(
            self.watch.names,
            top_k=self.top_k,
            layers=self.layers,
            layer_depth=self.watch_options.get("layer_depth"),
            clips=self.clip is not None or framework_clips,
        )
        self.summary = None
        if self._state is not None:
            self.watch.load_state_dict(self._state)
            self._state = None
        return self.watch

    def post_clip(
        self, params: Sequence[torch.Tensor], report: StepResult | StepReport
    ) -> torch.Tensor | None:
        """The global norm after the framework clipped, if it clips and the step was not skipped."""
        if not self.clipping.active or self.watch is None:
            return None
        if self.skips and report.skipped:  # read only if a policy can skip
            return None
        return post_clip_norm(params, self.watch.settings.norm_type)

    def add(
        self,
        report: StepResult | StepReport,
        post_clip: torch.Tensor | None = None,
        *,
        skipped: bool = False,
    ) -> None:
        """One optimizer step, with the norm after the framework's clipping and its skip."""
        if self._window is not None:
            self._window.add(report, post_clip, skipped=skipped)

    def pending(self) -> int:
        """Steps in the open window."""
        return len(self._window) if self._window is not None else 0

    def close_window(self) -> dict[str, float]:
        """The open window's metrics; its reports go to :attr:`history` and the clip count."""
        if self._window is None:
            return {}
        metrics, reports = self._window.close()
        self.history.extend(reports)
        self.clipping.count(reports)
        return metrics

    def close(self) -> None:
        """End the run: the last window, then the watcher; keeps its state and summary."""
        watch = self._running()
        if watch is not None:
            if self.pending():
                self.close_window()
            self._final_state = watch.state_dict()
            self.summary = self.clipping.complete(watch.close())

    # ----------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The watcher's state (detectors, clipper), for the framework's checkpoints."""
        watch = self._running()
        if watch is not None:
            return {"watch": watch.state_dict()}
        state = self._state if self._state is not None else self._final_state
        return {"watch": state} if state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied when the run starts if the watcher is not built."""
        state = state_dict.get("watch")
        if state is None:
            return
        watch = self._running()
        if watch is not None:
            watch.load_state_dict(state)
        else:
            self._state = state


class CallbackAdapter:
    """The part of a framework callback the adapters share: its public constructor (the
    parameters are :class:`CallbackCore`'s) and the core's results as its own attributes.

    An adapter sets its per-step fields in :meth:`_reset` and translates its framework's hooks.
    """

    def __init__(
        self,
        *,
        clip: Clipper | None = None,
        on_nonfinite: NonFinitePolicy = "warn",
        on_spike: SpikePolicy = "warn",
        sinks: list[Sink] | None = None,
        top_k: int | None = 3,
        layers: str | Sequence[str] | None = None,
        **watch_options: Any,
    ) -> None:
        super().__init__()
        settings = (clip, on_nonfinite, on_spike, sinks, top_k, layers, watch_options)
        self.core = CallbackCore(*settings)
        self._reset()

    def _reset(self) -> None:
        """Set the adapter's own per-step fields (called when it is made)."""

    @property
    def watch(self) -> GradWatch | None:
        """The :class:`~gradwatch.GradWatch` of the current run (None before it starts)."""
        return self.core.watch

    @property
    def history(self) -> deque[StepReport]:
        """Reports of the logged steps (bounded), with the framework's clipping filled in."""
        return self.core.history

    @property
    def summary(self) -> RunSummary | None:
        """The run summary once the run ended, counting the steps the framework clipped."""
        return self.core.summary
