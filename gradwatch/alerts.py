"""What a person is told about a step: the events of a report, and the error a policy raises.

The watcher decides *what* happened (a :class:`~gradwatch.records.StepReport`); this module only
words it, so every sink, log line and exception says the same thing the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from gradwatch.detect.health import NonFiniteOrigin
from gradwatch.diagnosis.wording import times, where
from gradwatch.errors import GradientSpikeError, GradWatchError, NonFiniteGradientError
from gradwatch.records import Event, StepReport

__all__ = ["fmt", "needs_events", "policy_error", "step_events"]

_TAKEN = {"skipped": "step skipped", "raise": "raised"}


def needs_events(report: StepReport) -> bool:
    """True if the report has something to tell a person (only then are events worded)."""
    return bool(
        report.nonfinite
        or (report.loss is not None and not math.isfinite(report.loss))
        or report.spike
        or report.loss_spike
        or report.skipped
        or not math.isfinite(report.global_norm)
    )


def step_events(
    report: StepReport,
    *,
    action: str | None,
    on_nonfinite: str,
    owner_types: Mapping[str, str],
    origin: NonFiniteOrigin | None = None,
    growth: float | None = None,
    ratio: float | None = None,
    cause: str | None = None,
) -> list[Event]:
    """The events of one step, most important first.

    Args:
        report: The step's report.
        action: What the watcher did about it now: ``"skipped"``, ``"raise"`` or None.
        on_nonfinite: The watcher's NaN/Inf policy (says what happens to a NaN step).
        owner_types: Parameter name -> class name of the module owning it.
        origin: Where NaN/Inf started, when forensics or the health detector found it.
        growth: On a spike that no parameter drives alone: how much every parameter's norm grew
            relative to its own history (median ratio).
        ratio: On a spike: the global norm over the median of the recent healthy norms, the
            same number (and definition) the run's spike finding states.
        cause: The probable cause, for the first event of an incident (None otherwise).
    """
    events = []
    taken = _TAKEN.get(action or "", "")
    scaler = (report.skip_reason or "").startswith("GradScaler")
    hopeless = _scaler_cannot_help(report) if scaler else ""
    if hopeless:
        taken = f"GradScaler skipped the step, but a lower loss scale cannot help: {hopeless}"
    if report.nonfinite and scaler and not hopeless:  # its loss-scale backoff: not an alarm
        message = (
            f"step {report.step}: GradScaler skipped the step: the scaled gradients overflowed at "
            f"loss scale {fmt(report.scale)}; it lowers the scale and goes on"
        )
        events.append(Event(report.step, "skip", message, (), {"reason": report.skip_reason or ""}))
    elif report.nonfinite:
        events.append(_nonfinite_event(report, taken, on_nonfinite, owner_types, origin))
    elif report.loss is not None and not math.isfinite(report.loss):
        events.append(_loss_event(report, origin))
    elif not math.isfinite(report.global_norm):
        largest = max(report.param_norms.items(), key=lambda kv: kv[1], default=("?", 0.0))
        message = (
            f"step {report.step}: the global gradient norm overflowed to "
            f"{fmt(report.global_norm)} although every parameter's gradient norm is finite "
            f"(largest: {largest[0]} {fmt(largest[1])}); clipping by this norm zeroes the "
            f"step; {taken or 'reported'}"
        )
        data = {"global_norm": report.global_norm, "largest": largest[0]}
        events.append(Event(report.step, "nonfinite", message, (largest[0],), data))
    if report.spike:
        events.append(_spike_event(report, taken, growth, ratio))
    if report.loss_spike:
        message = f"step {report.step}: loss spike {fmt(report.loss)}"
        events.append(Event(report.step, "loss_spike", message, (), {"loss": report.loss}))
    if report.skipped and not report.nonfinite and not report.spike and not scaler:
        message = f"step {report.step}: optimizer step skipped ({report.skip_reason})"
        events.append(Event(report.step, "skip", message, (), {"reason": report.skip_reason or ""}))
    if cause is not None and events:
        first = events[0]
        message = f"{first.message}; probable cause: {cause.replace('_', ' ')}"
        events[0] = Event(first.step, first.kind, message, first.params, first.data, cause)
    return events


def _scaler_cannot_help(report: StepReport) -> str:
    """Why a GradScaler skip is not its normal loss-scale backoff, or ``""`` when it is.

    The scaler overflows on purpose while it calibrates; but a loss already NaN/Inf before
    scaling, or an overflow at a scale below 1 (gradients smaller than their true size), is in
    the values themselves.
    """
    if report.loss is not None and not math.isfinite(report.loss):
        return f"the loss itself is {fmt(report.loss)}"
    if report.scale is not None and report.scale < 1.0:
        return f"the scale is already {fmt(report.scale)}, below 1"
    return ""


def _source(origin: NonFiniteOrigin, place: str) -> str:
    """Where a NaN/Inf came from, in a few words: a module, the loss, the input, or a pass."""
    if place in ("input", "loss"):
        return f"the {place}"
    if place and place in (origin.first_activation, origin.first_signal):
        return f"`{place}`"
    if origin.stage == "forward":
        return "the forward pass"
    return "the backward pass" if origin.stage == "backward" else "an unknown source"


def _loss_event(report: StepReport, origin: NonFiniteOrigin | None) -> Event:
    """A non-finite loss whose gradients were finite (or absent)."""
    place, clause = ("loss", f"the loss is {fmt(report.loss)}") if origin is None else where(origin)
    message = f"step {report.step}: non-finite loss {fmt(report.loss)}: {clause}"
    data = {"loss": report.loss, "source": place}
    return Event(report.step, "loss_nonfinite", message, (place,) if place else (), data)


def _nonfinite_event(
    report: StepReport,
    taken: str,
    on_nonfinite: str,
    owner_types: Mapping[str, str],
    origin: NonFiniteOrigin | None,
) -> Event:
    first = report.nonfinite[0]
    kind = "NaN" if math.isnan(report.param_norms.get(first, math.nan)) else "Inf"
    done = taken or ("reported only" if on_nonfinite == "warn" else "skipped")
    # "what" names the kind; a float NaN in the log is also the string "NaN", so never "value".
    data: dict[str, float | str | None] = {
        "first": first,
        "what": kind,
        "global_norm": report.global_norm,
    }
    if origin is not None:
        place, clause = where(origin)
        more = f" of {len(report.nonfinite)} parameters" if len(report.nonfinite) > 1 else ""
        source = _source(origin, place)
        message = (
            f"step {report.step}: {kind} in the gradients{more}, from {source}: {clause}"
            f"{_ranks(report)}; {done}"
        )
        data.update(
            source=place,
            module=origin.module,
            module_type=origin.module_type,
            shape=str(origin.shape),
            stage=origin.stage,
            first_activation=origin.first_activation,
            first_signal=origin.first_signal,
        )
    else:
        owner = owner_types.get(first, "")
        more = f" (+{len(report.nonfinite) - 1} more)" if len(report.nonfinite) > 1 else ""
        loss = f"; loss {fmt(report.loss)}" if report.loss is not None else ""
        message = (
            f"step {report.step}: {kind} in gradient of {first}{f' ({owner})' if owner else ''}"
            f"{more}, first in backward order{_ranks(report)}{loss}; {done}"
        )
    params = report.nonfinite
    if origin is not None:
        place = where(origin)[0]
        params = (place, *(p for p in report.nonfinite if p != place)) if place else params
    return Event(report.step, "nonfinite", message, params, data)


def _ranks(report: StepReport) -> str:
    """The ranks a NaN/Inf came from (rank blame, pipeline stages), as a clause, or nothing."""
    ranks = report.nonfinite_ranks
    if not ranks:
        return ""
    return f"; from rank{'s' if len(ranks) > 1 else ''} {', '.join(str(r) for r in ranks)}"


def _spike_event(
    report: StepReport, taken: str, growth: float | None, ratio: float | None
) -> Event:
    threshold = report.spike_threshold or math.nan
    if report.spike_params:
        drivers = f"driven by {', '.join(report.spike_params)}"
    elif growth is not None and math.isfinite(growth):
        drivers = "every parameter grew alike"
    else:
        drivers = "no parameter's history to compare with yet"
    size = ""
    if ratio is not None and math.isfinite(ratio):
        size = f", {times(ratio)} the recent healthy norm"
    what = taken or (f"clipped to {fmt(report.clipped_norm)}" if report.clipped else "reported")
    message = (
        f"step {report.step}: gradient norm spike {fmt(report.global_norm)}{size} "
        f"(threshold {fmt(threshold)}); {drivers}; {what}"
    )
    data = {"global_norm": report.global_norm, "threshold": threshold}
    return Event(report.step, "spike", message, report.spike_params, data)


def policy_error(report: StepReport) -> GradWatchError:
    """The error an ``on_nonfinite="raise"`` / ``on_spike="raise"`` policy raises for a step."""
    if report.nonfinite:
        names = ", ".join(report.nonfinite[:5]) + (" ..." if len(report.nonfinite) > 5 else "")
        return NonFiniteGradientError(
            f"non-finite gradient at step {report.step} in {names} "
            f"(first in backward order: {report.nonfinite[0]})",
            step=report.step,
            params=report.nonfinite,
        )
    if not math.isfinite(report.global_norm):
        return NonFiniteGradientError(
            f"the global gradient norm overflowed to {fmt(report.global_norm)} at step "
            f"{report.step} although every parameter's gradient is finite",
            step=report.step,
            params=(),
        )
    threshold = report.spike_threshold or math.nan
    return GradientSpikeError(
        f"gradient norm spike at step {report.step}: {fmt(report.global_norm)} > threshold "
        f"{fmt(threshold)}; driven by {', '.join(report.spike_params) or '?'}",
        step=report.step,
        global_norm=report.global_norm,
        threshold=threshold,
    )


def fmt(value: float | None) -> str:
    """A number as people read it in a one-line message (4 significant digits)."""
    if value is None:
        return "n/a"
    return f"{value:.4g}"
