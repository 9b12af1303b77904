"""Emission: device rows of the stats ring become step reports and events, sent to the sinks.

The step path only writes a row of statistics on the device (see :mod:`gradwatch.collect.ring`)
and hands the host what it will need to read it (a :class:`Pending`). Rows reach the host later:
at once on CPU, about a step later on accelerators. Only then does the host look at them, in two
stages, so that the step path never waits for the device:

* **Judging** runs the spike and loss detectors on a row's two scalars (global norm, loss) as
  soon as the row is on the host, so an alert (NaN/Inf, spike, loss spike, skipped step) is
  emitted at once, and a policy that must decide now (``on_spike="skip"``) sees detector state
  that includes every earlier step.
* **Draining** does the rest: per-parameter baselines (the parameters driving a spike), the
  report's fields, history, the run summary's aggregation, health, the sinks and the alert
  events. It runs over batches of rows (:data:`DRAIN_BATCH`) unless a row is urgent or a sink
  asks for its steps earlier.

Rows are judged and drained strictly in order, so every detector sees the run's steps in order.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from gradwatch.alerts import needs_events, step_events
from gradwatch.collect.pipeline import ABSENT, SHARED_LOSS, SHARED_LOSSES, SHARED_NORMS, StageLayout
from gradwatch.collect.ring import COEF, GLOBAL, LOSS, NORMS, SCALE, StatsRing
from gradwatch.detect.health import HealthDetector
from gradwatch.detect.nonfinite import nonfinite_in_backward_order
from gradwatch.detect.spikes import ParamBaseline, SpikeDetector
from gradwatch.diagnosis import probable_cause
from gradwatch.diagnosis.context import Run
from gradwatch.diagnosis.incident import start_depth
from gradwatch.diagnosis.rules_layers import dead_findings, vanishing_finding
from gradwatch.records import Event, ParamNorms, RunStart, StepReport
from gradwatch.report.sink import NEVER, SinkGroup
from gradwatch.report.stats import StepAggregator
from gradwatch.step_result import StepResult

__all__ = ["DRAIN_BATCH", "Emission", "Pending"]

DRAIN_BATCH = 32
"""Most rows held back from the sinks when nothing urgent happened and no sink asked for them.

Every row is judged as soon as it is on the host (at once on CPU, about a step later on
accelerators): the spike and loss detectors run on its two scalars, so an alert is emitted at
once. The rest of the emission (per-parameter baselines, health, the report's fields, the sinks)
runs for up to this many rows together, earlier when a sink's :meth:`~gradwatch.Sink.next_due`
asks: a :class:`~gradwatch.JsonlSink` takes every step at once so a killed process loses no
completed step, a console takes its window when its summary line is due."""


LIVE_GAP = 20
"""Steps without an alert after which the next alert opens a new incident (and states a cause)."""
DEAD_CHECK_EVERY = 256
"""Steps between two looks for parameters that stopped getting a gradient."""
LIVE_CAUSES = 16
"""Incidents per run whose first alert states its probable cause (each runs the diagnosis)."""


@dataclass
class Pending:
    """What the host must know to turn a device row into a report."""

    result: StepResult
    positions: list[int] | None
    arrivals: tuple[torch.Tensor, ...]
    has_loss: bool
    has_scale: bool
    skip_reason: str | None
    action: str | None
    micro: list[torch.Tensor]
    blame: torch.Tensor | None
    probe: Any = None  # collect.forensics.Probe: learning rates, weight and activation samples
    # Set when the row is judged (see Emission.judge):
    spike_threshold: float | None = None
    spike: bool = False
    loss_spike: bool = False


class Emission:
    """Turns the rows of a :class:`~gradwatch.collect.ring.StatsRing` into reports, in order.

    Call :meth:`bind` and :meth:`start` before the first :meth:`add`; call :meth:`bind` again
    with the new ring whenever the watched parameters are rebuilt, after draining every row of
    the old one.

    Under pipeline parallelism (``stages`` given) a report covers every stage's parameters: its
    ``param_norms``, ``nonfinite`` and ``spike_params`` are the whole model's, from the norms the
    stages exchanged, so the logging rank reports every layer. The health detector (and so the
    diagnosis) is fed this stage's parameters only, the ones whose weights and activations this
    rank can see.

    Args:
        names: Names of the watched parameters, in the ring's column order.
        owner_types: Parameter name -> class name of the module owning it, for alert wording
            (every stage's parameters under pipeline parallelism).
        sinks: Where reports and events go.
        spike_detector: Judges each row's global norm.
        loss_detector: Judges each row's loss, when the step had one.
        health_detector: Fed every report, for :meth:`~gradwatch.GradWatch.diagnose`.
        baseline: Each parameter's typical norm, to name the parameters driving a spike.
        aggregator: Accumulates reports into the run summary.
        history: Number of recent reports kept in :attr:`history`.
        on_nonfinite: The watcher's NaN/Inf policy, named in the alert events.
        norm_type: Order of the global norm, recorded in each report.
        clip: The clipper's settings (``config()``), or None, for the diagnosis behind the
            probable cause an incident's first alert states.
        stages: Every pipeline stage's parameters, or None. ``baseline`` and ``aggregator``
            then cover all of them (``stages.names``).
    """

    def __init__(
        self,
        names: Sequence[str],
        owner_types: Mapping[str, str],
        *,
        sinks: SinkGroup,
        spike_detector: SpikeDetector,
        loss_detector: SpikeDetector,
        health_detector: HealthDetector,
        baseline: ParamBaseline,
        aggregator: StepAggregator,
        history: int,
        on_nonfinite: str,
        norm_type: float,
        clip: Mapping[str, Any] | None = None,
        stages: StageLayout | None = None,
    ) -> None:
        self.names = names
        self.stages = stages
        self.owner_types = owner_types
        self.sinks = sinks
        self.spike_detector = spike_detector
        self.loss_detector = loss_detector
        self.health_detector = health_detector
        self.baseline = baseline
        self.aggregator = aggregator
        self.history: deque[StepReport] = deque(maxlen=history)
        self.on_nonfinite = on_nonfinite
        self.norm_type = norm_type
        self.clip = clip
        self._last_alert = -LIVE_GAP - 1  # step of the last alert (incidents start after calm)
        self._live_causes = 0
        self._nonfinite_told = False  # the run's first NaN/Inf states its cause, even mid-incident
        self._depth_checked = False  # the first step's depth profile was looked at
        self._vanishing_told = False
        self._dead_told: set[str] = set()  # layers and parameters already reported dead/unused
        self._pending: dict[int, Pending] = {}
        self._newest = -1  # step of the last row added
        self._due = NEVER  # the earliest step a sink wants at once (set by start)

    def start(self, record: RunStart) -> None:
        """Learn when the sinks first want a step, and send them the run's first record."""
        self._due = self.sinks.next_due(-1)
        self.sinks.write(record)

    def bind(self, ring: StatsRing, order: Callable[[tuple[torch.Tensor, ...]], list[int]]) -> None:
        """Read rows from ``ring`` from now on, its row 0 first.

        Args:
            ring: The stats ring the step path writes.
            order: Maps a :class:`Pending`'s ``arrivals`` to parameter positions in backward
                order (``ArrivalOrder.positions``), to name the first NaN/Inf gradient.
        """
        self._ring = ring
        self._order = order
        self._judged = 0  # rows run through the spike and loss detectors (see judge)

    def add(self, number: int, pending: Pending) -> None:
        """Take row ``number`` (committed to the ring) and what is needed to report it."""
        self._pending[number] = pending
        self._newest = pending.result.step

    def scan(self) -> None:
        """Judge the rows on the host; emit them if one is urgent, a sink wants them, or enough.

        Judging runs only the scalar detectors, so an alert (NaN/Inf, spike, loss spike, skipped
        step) reaches the sinks the moment its row is on the host, without waiting for a batch.
        """
        urgent = self.judge(wait=False)
        waiting = self._judged - self._ring.read
        if waiting and (urgent or waiting >= DRAIN_BATCH or self._newest >= self._due):
            self.drain(wait=False)

    def judge(self, *, wait: bool, upto: int | None = None) -> bool:
        """Run the spike and loss detectors over rows not judged yet, in order.

        Args:
            wait: Block on rows not yet on the host (else stop at the first such row).
            upto: Last row number to judge (default: every written row).

        Returns:
            True if a judged row needs a person's attention now.
        """
        ring = self._ring
        last = ring.written - 1 if upto is None else upto
        urgent = False
        while self._judged <= last:
            number = self._judged
            if not ring.ready(number):
                if not wait:
                    break
                ring.wait(number)
            pending = self._pending[number]
            value = ring.value(number, GLOBAL)
            pending.spike_threshold = self.spike_detector.threshold
            pending.spike = self.spike_detector.update(value)
            loss = self._loss(pending, ring.host_view(number))
            if loss is not None:
                pending.loss_spike = self.loss_detector.update(loss)
            urgent = (
                urgent
                or pending.spike
                or pending.loss_spike
                or pending.skip_reason is not None
                or not math.isfinite(value)
            )
            self._judged = number + 1
        return urgent

    def spike_threshold(self) -> float | None:
        """The spike detector's threshold for the next step, once it has judged every earlier one.

        Waits for the device: for a policy that must decide (or clip) at the current step.
        """
        self.judge(wait=True)
        return self.spike_detector.threshold

    def drain(self, *, wait: bool, upto: int | None = None) -> None:
        """Turn device rows into reports, in order, and send them to the sinks.

        Args:
            wait: Block on rows not yet on the host (else stop at the first such row).
            upto: Last row number to process (default: every written row).
        """
        self.judge(wait=wait, upto=upto)
        ring = self._ring
        last = self._judged - 1 if upto is None else min(upto, self._judged - 1)
        if ring.read > last:
            return
        while ring.read <= last:
            number = ring.read
            ring.read += 1
            pending = self._pending.pop(number)
            self._emit(pending, ring.host_row(number))
        self._due = self.sinks.next_due(pending.result.step)

    def _emit(self, pending: Pending, row: Any) -> None:
        norms = row[NORMS : NORMS + len(self.names)]
        shared = row[NORMS + len(self.names) :]
        global_norm = float(row[GLOBAL])
        positions = pending.positions
        if positions is None:
            names, values = self.names, norms
        else:
            names, values = tuple(self.names[i] for i in positions), norms[positions]
        bad: list[int] = []  # this stage's non-finite parameters, first in backward order
        if not math.isfinite(global_norm):
            bad = nonfinite_in_backward_order(norms, positions, self._order(pending.arrivals))
        present = norms
        if positions is not None:  # parameters without a gradient neither lead nor learn
            present = np.full_like(norms, np.nan)
            present[positions] = norms[positions]
        nonfinite = tuple(self.names[i] for i in bad)
        model = None
        if self.stages is not None:
            model = _ModelRow(self.stages, shared[SHARED_NORMS:], bad)
            names, values, present, nonfinite = model.names, model.values, model.present, model.bad
        spike = pending.spike
        culprits: tuple[int, ...] = ()
        growth = None  # of every parameter alike, when no parameter drives a spike alone
        if spike:
            culprits = tuple(int(i) for i in self.baseline.culprits(present))
            growth = None if culprits else self.baseline.growth(present)
        if not nonfinite and not spike:  # a spike would inflate every baseline for ~100 steps
            self.baseline.update(present)
        loss = self._loss(pending, row)
        loss_spike = pending.loss_spike
        coef = float(row[COEF])
        every_name = self.names if self.stages is None else self.stages.names
        ranks: tuple[int, ...] = ()
        if not math.isfinite(global_norm):
            ranks = _flagged(pending.blame) if model is None else model.ranks
        report = StepReport(
            step=pending.result.step,
            global_norm=global_norm,
            clipped_norm=global_norm * coef,
            clip_coef=coef,
            param_norms=ParamNorms(names, values),
            nonfinite=nonfinite,
            spike=spike,
            loss_spike=loss_spike,
            skipped=pending.skip_reason is not None,
            loss=loss,
            skip_reason=pending.skip_reason,
            spike_params=tuple(every_name[i] for i in culprits),
            spike_threshold=pending.spike_threshold,
            scale=float(row[SCALE]) if pending.has_scale else None,
            lr=_first_lr(pending.probe),
            norm_type=self.norm_type,
            micro_batch_norms=tuple(float(m) for m in pending.micro),
            nonfinite_ranks=ranks,
        )
        pending.result.resolve(report)
        self.history.append(report)
        self.aggregator.update(report)
        self.sinks.write(report)
        own = report
        if model is not None:  # the health detector knows this stage's parameters only
            own = model.own_report(report, self.names, norms, positions, bad, culprits)
        origin = self.health_detector.update(own, norms, positions, pending.arrivals, pending.probe)
        if model is not None and not model.starts_here:
            origin = None  # the NaN/Inf started on another stage: this stage cannot place it
        if not self._depth_checked and self.health_detector.first_step is not None:
            self._depth_checked = True  # a non-finite first step has its own alert instead
            event = self._first_step_event(report.step) if math.isfinite(global_norm) else None
            if event is not None:
                self._last_alert = report.step
                self.sinks.write(event)
        first = self.health_detector.first_step
        if first is not None and _dead_check_due(report.step - first, self.health_detector):
            for event in self._layer_events(report.step):
                self.sinks.write(event)
        if needs_events(report):
            cause = None
            first_nonfinite = not self._nonfinite_told and _nonfinite(report)
            self._nonfinite_told = self._nonfinite_told or first_nonfinite
            calm = report.step - self._last_alert > LIVE_GAP
            if (calm or first_nonfinite) and self._live_causes < LIVE_CAUSES:
                self._live_causes += 1
                cause = probable_cause(self.health_detector.report(), clip=self.clip)
            self._last_alert = report.step
            events = step_events(
                report,
                action=pending.action,
                on_nonfinite=self.on_nonfinite,
                owner_types=self.owner_types,
                origin=origin,
                growth=growth,
                ratio=self.health_detector.incidents.last_spike_ratio if report.spike else None,
                cause=cause,
            )
            for event in events:
                self.sinks.write(event)

    def _loss(self, pending: Pending, row: np.ndarray) -> float | None:
        """The step's loss from its host row, or None. Under pipeline parallelism, the stages'
        shared loss (the mean over the stages that had one, usually the last alone)."""
        if self.stages is None:
            return float(row[LOSS]) if pending.has_loss else None
        shared = row[NORMS + len(self.names) :]
        count = float(shared[SHARED_LOSSES])
        return float(shared[SHARED_LOSS]) / count if count > 0 else None

    def _layer_events(self, step: int) -> list[Event]:
        """Unused parameters, dead units and a vanishing gradient, each reported once, as soon
        as the streak (or the run's average through depth) shows it."""
        events = []
        run = Run(self.health_detector.report(), self.clip)
        if not self._vanishing_told:
            for finding in vanishing_finding(run):
                self._vanishing_told = True
                message = f"step {step}: the gradient vanishes through depth: {finding.evidence}"
                events.append(
                    Event(step, "vanishing", message, finding.params, finding.data, finding.cause)
                )
        for finding in dead_findings(run):
            new = [p for p in finding.params if p not in self._dead_told]
            if not new:
                continue
            self._dead_told.update(finding.params)
            kind = "unused" if finding.cause == "unused" else "dead"
            message = f"step {step}: {finding.evidence}"
            events.append(Event(step, kind, message, finding.params, finding.data, finding.cause))
        return events

    def _first_step_event(self, step: int) -> Event | None:
        """An alert when the first step's gradient already explodes through depth (once)."""
        health = self.health_detector.report()
        depth = start_depth(health)
        if not depth.exploding:
            return None
        self._live_causes += 1
        cause = probable_cause(health, clip=self.clip)
        said = (cause or "unknown").replace("_", " ")
        message = (
            f"step {step}: the gradient explodes from the first step: "
            f"{depth.clause(health.first_step)}; probable cause: {said}"
        )
        data = {"gradient_to_weight": depth.ratio}
        return Event(step, "exploding", message, depth.params, data, cause)


class _ModelRow:
    """One step's norms of every pipeline stage, from the row's exchanged columns.

    Args:
        layout: Every stage's parameters.
        everyone: Their norms, :data:`~gradwatch.collect.pipeline.ABSENT` where a parameter had
            no gradient.
        own_bad: This stage's non-finite parameters (its positions), first in backward order.
    """

    def __init__(self, layout: StageLayout, everyone: np.ndarray, own_bad: list[int]) -> None:
        self.layout = layout
        absent = everyone == ABSENT
        self.present = np.where(absent, np.nan, everyone)
        kept = np.flatnonzero(~absent)
        every_name = layout.names
        self.names = tuple(every_name[i] for i in kept) if absent.any() else every_name
        self.values = everyone[kept] if absent.any() else everyone
        self.bad: tuple[str, ...] = ()
        self.ranks: tuple[int, ...] = ()  # the ranks of the stages with a non-finite gradient
        self.starts_here = False  # the first non-finite parameter is this stage's
        if np.isfinite(everyone).all():
            return
        # Backward runs from the last stage to the first: the last non-finite stage is where a
        # NaN/Inf met first. Within this stage, its hooks' arrival order; within another, its
        # parameters in reverse order (the arrival order of a stack of layers: last layer's
        # bias first).
        own = layout.own
        columns: list[int] = []
        for stage in reversed(range(len(layout.blocks))):
            block = layout.blocks[stage]
            if stage == layout.stage:
                columns.extend(own.start + i for i in own_bad)
            else:
                bad = np.flatnonzero(~np.isfinite(everyone[block]))[::-1]
                columns.extend(block.start + int(i) for i in bad)
        self.bad = tuple(every_name[i] for i in columns)
        self.ranks = tuple(
            rank
            for rank, block in zip(layout.ranks, layout.blocks)
            if not np.isfinite(everyone[block]).all()
        )
        self.starts_here = bool(columns) and own.start <= columns[0] < own.stop

    def own_report(
        self,
        report: StepReport,
        names: Sequence[str],
        norms: np.ndarray,
        positions: list[int] | None,
        bad: list[int],
        culprits: tuple[int, ...],
    ) -> StepReport:
        """``report`` restricted to this stage's parameters, under their own names."""
        own = self.layout.own
        present = range(len(names)) if positions is None else positions
        return replace(
            report,
            param_norms=ParamNorms(tuple(names[i] for i in present), norms[list(present)]),
            nonfinite=tuple(names[i] for i in bad),
            spike_params=tuple(names[c - own.start] for c in culprits if own.start <= c < own.stop),
        )


def _nonfinite(report: StepReport) -> bool:
    """The step's gradients or loss were NaN/Inf."""
    loss_bad = report.loss is not None and not math.isfinite(report.loss)
    return bool(report.nonfinite) or loss_bad or not math.isfinite(report.global_norm)


def _dead_check_due(steps: int, health: HealthDetector) -> bool:
    """When to look for dead or unused parameters: once their streak can first show, then every
    :data:`DEAD_CHECK_EVERY` steps (each look absorbs the health detector's queue)."""
    after = health.dead_after
    return steps == after or (steps > after and (steps - after) % DEAD_CHECK_EVERY == 0)


def _flagged(flags: torch.Tensor | None) -> tuple[int, ...]:
    """Indices of the set flags (ranks), read at emission."""
    if flags is None:
        return ()
    return tuple(i for i, flag in enumerate(flags.tolist()) if flag)


def _first_lr(probe: Any) -> float | None:
    """The first param group's learning rate the probe took, or None (no optimizer, tensor LR)."""
    lrs = getattr(probe, "lrs", None)
    return float(lrs[0]) if lrs else None
