"""Rules about incidents over time: the first NaN/Inf, a divergence, spikes, the loss scale.

Each is ``rule(run) -> list[Finding]``. The cause of an incident comes from
:attr:`Run.incident <gradwatch.diagnosis.context.Run.incident>`, shared by every finding here, so
the NaN finding and the spike finding before it tell one story. Spikes alone (no NaN, no
divergence) are sized against the recent healthy level and blamed on the learning rate only on
evidence (:mod:`gradwatch.diagnosis.episodes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gradwatch.diagnosis.clipping import suggest_threshold
from gradwatch.diagnosis.context import Run
from gradwatch.diagnosis.depth import recurrent_types
from gradwatch.diagnosis.episodes import GAP, Episode, episodes
from gradwatch.diagnosis.incident import Explanation, explain_blowup
from gradwatch.diagnosis.remedies import REMEDIES
from gradwatch.diagnosis.trend import loss_progress
from gradwatch.diagnosis.wording import names_list, num, plural, times, where
from gradwatch.records import Finding

__all__ = [
    "divergence_finding",
    "incident_finding",
    "loss_spike_finding",
    "scaler_finding",
    "spike_finding",
]

_LOSS_DIVERGED = 5.0
"""A loss this many times its starting level at the end of the run has diverged."""
_NORM_DIVERGED = 100.0
"""A norm that grew this many times over steps has diverged, whatever the loss did."""
_SPIKE_FACTOR = 3.0
"""Spikes make a finding when one is this many times the recent healthy norm."""
_LOSS_FACTOR = 2.0


def _advice(
    run: Run, cause: str, *, spikes: bool = False, explained: bool = False
) -> tuple[list[str], dict[str, float]]:
    """Remedies and computed settings for ``cause`` (clip advice only where it helps).

    ``explained``: the finding's evidence already says why the suggested ``max_norm`` is what it
    is, so the clip remedy does not say it again.
    """
    remedies = list(REMEDIES.get(cause, ()))
    suggested: dict[str, float] = {}
    if cause == "learning_rate":
        lr = run.suggested_lr()
        if lr is not None:
            remedies[0] = f"lower the learning rate from {num(run.lr)} to about {lr:g}"
            suggested["lr"] = lr
    threshold = suggest_threshold(run.health)
    if run.unhealthy_from_start:
        threshold = None
        advice = run.bound_advice()
        if advice is not None:
            remedies.append(advice[0])
            suggested["max_norm"] = advice[1]
    clips = cause in ("learning_rate", "data", "initialization", "recurrence") or spikes
    limit = run.clipping.max_norm
    lower = limit is not None and threshold is not None and threshold.value < limit
    if clips and threshold is not None and (not run.clipping.on or lower):
        why = "" if explained else f" ({threshold.why})"
        remedies.append(
            f"clip by norm above the healthy steps: gradwatch.ClipNorm({threshold.value:.3g}){why}"
        )
        suggested["max_norm"] = threshold.value
    if run.clipping.on:
        remedies = [r for r in remedies if not r.startswith("clip by norm so")]
    return remedies, suggested


def incident_finding(run: Run) -> list[Finding]:
    """The first NaN/Inf of the run (in a gradient, or a loss whose gradients were finite)."""
    origin, found = run.origin, run.incident
    if origin is None or found is None:
        return []
    h = run.health
    gradient = origin.count > 0
    what = "NaN" if origin.value == "NaN" else "Inf"
    place, clause = where(origin)
    head = (
        f"{what} in the gradients at step {origin.step}"
        if gradient
        else f"the loss was {num(origin.loss)} at step {origin.step}, the gradients finite"
    )
    evidence = f"{head}: {clause}"
    if found.reason and found.reason != clause and not found.reason.startswith(clause):
        evidence += f"; {found.reason}"
    total = h.nonfinite_count + h.loss_nonfinite_count
    if total > 1:
        evidence += f"; {plural(total, 'non-finite step')} in all"
    remedies, suggested = _advice(run, found.cause)
    skip = 'on_nonfinite="skip" keeps a bad step from reaching the weights'
    if run.clipping.on:
        evidence += f"; {run.clipping.summary(h)}"
        remedies.append(f"clipping cannot undo NaN/Inf: {skip}")
    elif not any("on_nonfinite" in r for r in remedies):
        remedies.append(skip)
    places = found.places or ((place,) if place else ())
    first = origin.step  # where the cause began: the bad batch, or the start of the growth
    began = found.data.get("onset" if found.cause == "data" else "start")
    if found.cause in ("data", "learning_rate") and isinstance(began, int):
        first = min(first, began)
    data = dict(found.data)
    data.update(step=origin.step, what=what, stage=origin.stage, nonfinite_steps=total)
    return [
        Finding(
            "nonfinite" if gradient else "loss_nonfinite",
            tuple(places),
            evidence,
            tuple(remedies),
            suggested,
            cause=found.cause,  # type: ignore[arg-type]
            severity="error",
            first_step=first,
            data=data,
        )
    ]


def divergence_finding(run: Run) -> list[Finding]:
    """The optimisation diverged: the norm grew over steps, or the loss ended far above its start.

    Only without a NaN (the incident finding tells that story) and when the rise was not carried
    by one batch.
    """
    if run.origin is not None:
        return []
    h = run.health
    rise, progress = run.rise, loss_progress(h.overview if len(h.overview) >= 6 else h.early)
    found: Explanation | None = None
    first = None
    if rise is not None and rise.kind == "growth" and not _recovered(h, rise, progress):
        rising = rise.loss_ratio is not None and rise.loss_ratio >= 2.0
        if rise.rise >= _NORM_DIVERGED or rising:
            found, first = explain_blowup(rise), rise.start
    if found is None and progress is not None and progress >= _LOSS_DIVERGED:
        reason = (
            f"the loss ended {times(progress)} its starting level (median of the first and last "
            "steps): the optimisation diverged"
        )
        found = Explanation("learning_rate", (), reason, {"loss_ratio": progress})
        first = int(h.early.steps[0]) if len(h.early) else None
    if found is None or run.depth.exploding:
        return []
    if progress is not None:
        found.data["loss_end_over_start"] = progress
        if progress >= 1.0 and "loss ended" not in found.reason:
            found = found._replace(
                reason=f"{found.reason}; the loss ended {times(progress)} its start"
            )
    remedies, suggested = _advice(run, "learning_rate")
    return [
        Finding(
            "divergence",
            (),
            found.reason,
            tuple(remedies),
            suggested,
            cause="learning_rate",
            severity="error",
            first_step=first,
            data=dict(found.data),
        )
    ]


def _recovered(h: object, rise: object, progress: float | None) -> bool:
    """The run came back from the rise: its last norms are near the level again and its loss
    ended below where it started (a transient, which the spike detector reports if it stood
    out), not a divergence."""
    overview = h.overview  # type: ignore[attr-defined]
    norms = overview.norms[np.isfinite(overview.norms)]
    if not norms.size or progress is None or progress >= 1.0:
        return False
    return bool(norms[-1] < rise.level * 10.0)  # type: ignore[attr-defined]


def spike_finding(run: Run) -> list[Finding]:
    """Flagged gradient-norm spikes that stand far above the recent healthy norm."""
    h = run.health
    kept = h.spikes
    if not any(not s.ratio < _SPIKE_FACTOR for s in kept):  # an unknown level (NaN) counts
        return []
    top = max(kept, key=lambda s: s.ratio if math.isfinite(s.ratio) else math.inf)
    culprits = sorted(h.spike_params, key=lambda n: -h.spike_params[n])[:3]
    period = _period([s.step for s in kept])
    eps = episodes(kept, latest=h.last_step)
    cause, reason = _episodes_cause(run, eps)
    evidence = (
        f"{plural(h.spike_count, 'gradient-norm spike')} flagged (first at step {kept[0].step}"
        f"{f', every ~{period:.0f} steps' if period else ''}), the largest {_size(top)}"
    )
    if culprits:
        evidence += f"; driven by {names_list(culprits)}"
    evidence += f"; {reason}"
    if run.clipping.on:
        evidence += (
            f"; {run.clipping.summary(h)}, {h.spikes_clipped} of the {h.spike_count} spikes "
            "among them"
        )
    remedies, suggested = _advice(run, cause, spikes=True, explained=True)
    threshold = suggest_threshold(h)
    if threshold is not None and "max_norm" in suggested:
        evidence += f"; ClipNorm({threshold.value:.3g}) {threshold.cuts(kept)}: {threshold.why}"
    if cause == "data":
        listed = ", ".join(str(e.first.step) for e in eps[:5]) + (" ..." if len(eps) > 5 else "")
        batches = f"the batch{'es' if len(eps) > 1 else ''} of step{'s' if len(eps) > 1 else ''}"
        if period:
            remedies.insert(
                0,
                f"spikes every ~{period:.0f} steps point at the data: inspect {batches} {listed} "
                "(an epoch boundary, a bad shard, unusually long sequences)",
            )
        else:
            remedies.insert(0, f"inspect {batches} {listed}")
    through = h.spike_count - h.spikes_clipped
    limit = run.clipping.max_norm
    if through and limit is not None and "max_norm" in suggested and suggested["max_norm"] < limit:
        remedies = [r for r in remedies if not r.startswith("clip by norm above")]
        remedies.append(
            f"{run.clipping.name} let {plural(through, 'spike')} through: lower max_norm to about "
            f"{suggested['max_norm']:.3g}"
        )
    recurrent = _recurrent_remedy(run, culprits)
    if recurrent:
        remedies.append(recurrent)
    data: dict[str, float | str | None] = {
        "spikes": h.spike_count,
        "largest_ratio": top.ratio,
        "largest_step": top.step,
        "episodes": len(eps),
    }
    return [_spike_warning("spike", culprits, evidence, remedies, suggested, cause, kept, data)]


def _recurrent_remedy(run: Run, culprits: Sequence[str]) -> str:
    """What to do when a recurrent weight drives the spikes, by the kind of its cell."""
    h = run.health
    recurrent = [n for n in culprits if "weight_hh" in n]
    if not recurrent:
        return ""
    kind = h.types[h.names.index(recurrent[0])]
    standard = (
        "" if run.clipping.on else "; clipping by norm is the standard fix for recurrent nets"
    )
    _, gated = recurrent_types([kind])
    if gated:
        return (
            f"the {kind}'s recurrent weight `{recurrent[0]}` drives them (the cell is already "
            f"gated): shorten the backpropagation-through-time window, or initialise weight_hh "
            f"orthogonally{standard}"
        )
    return (
        "the recurrent weight drives them: initialise weight_hh orthogonally (or smaller), or "
        f"use an LSTM/GRU{standard}"
    )


def _episodes_cause(run: Run, eps: Sequence[Episode]) -> tuple[str, str]:
    """What the spikes point at: the incident's cause when they led to it, else their shape."""
    found = run.incident
    at = found.data.get("onset", found.data.get("step")) if found is not None else None
    first = eps[0].first.step if eps else None
    related = not isinstance(at, int) or first is None or abs(at - first) <= GAP
    if (
        found is not None
        and related
        and (found.cause in ("learning_rate", "data") or run.unhealthy_from_start)
    ):
        return found.cause, found.reason
    unstable = [e for e in eps if e.cause == "learning_rate"]
    if unstable:
        return "learning_rate", f"{unstable[0].reason}: the optimisation was going unstable"
    shapes = sorted({e.reason for e in eps})
    return "data", f"{'; '.join(shapes)}: that points at the data, not the learning rate"


def loss_spike_finding(run: Run) -> list[Finding]:
    h = run.health
    kept = h.loss_spikes
    if not any(not s.ratio < _LOSS_FACTOR for s in kept):
        return []
    top = max(kept, key=lambda s: s.ratio if math.isfinite(s.ratio) else math.inf)
    size = f" {times(top.ratio)} its recent level" if math.isfinite(top.ratio) else ""
    evidence = (
        f"the loss spiked at {plural(h.loss_spike_count, 'step')} (first at step "
        f"{kept[0].step}), up to{size} (step {top.step}: loss {num(top.value)})"
    )
    eps = episodes(h.spikes, latest=h.last_step)
    cause, reason = _episodes_cause(run, eps or episodes(kept, what="loss", latest=h.last_step))
    evidence += f"; {reason}"
    remedies, suggested = _advice(run, cause, spikes=True)
    data = {"loss_spikes": h.loss_spike_count, "largest_ratio": top.ratio}
    return [_spike_warning("loss_spike", (), evidence, remedies, suggested, cause, kept, data)]


def _spike_warning(
    kind: str,
    params: Sequence[str],
    evidence: str,
    remedies: Sequence[str],
    suggested: dict[str, float],
    cause: str,
    spikes: Sequence[object],
    data: dict[str, float | str | None],
) -> Finding:
    """The warning a run of (loss) spikes makes, dated by its first spike."""
    return Finding(
        kind,  # type: ignore[arg-type]
        tuple(params),
        evidence,
        tuple(remedies),
        suggested,
        cause=cause,  # type: ignore[arg-type]
        severity="warning",
        first_step=spikes[0].step,  # type: ignore[attr-defined]
        data=data,
    )


def scaler_finding(run: Run) -> list[Finding]:
    """GradScaler skips: its normal calibration (info), or a loss scale in trouble (warning)."""
    h = run.health
    # An occasional NaN/Inf loss is an incident of its own (the incident finding tells it): the
    # scaler's skips are the others, unless the loss is NaN/Inf at most steps.
    skips = h.scaler_skips - (0 if run.scaler_loss_persists else h.scaler_loss_skips)
    if skips <= 0:
        return []
    share = skips / max(h.steps, 1)
    late = h.scaler_late_skips / max(h.steps, 1)
    # A scale below 1, or a loss NaN/Inf before scaling at most steps: no scale fixes the values.
    trouble = h.min_scale < 1.0 or run.scaler_loss_persists or (h.steps >= 50 and late > 0.05)
    evidence = (
        f"GradScaler skipped {plural(skips, 'step')} of {h.steps} ({share:.0%}) because "
        f"its gradients held Inf/NaN; the loss scale went down to {num(h.min_scale)}"
    )
    places: tuple[str, ...] = ()
    if not trouble:
        evidence += ": its normal calibration of the loss scale"
    elif h.nonfinite and run.origin is None:  # where it starts: a module, or the first gradient
        place, clause = where(h.nonfinite[0])
        places = (place,) if place else ()
        evidence += f"; at step {h.nonfinite[0].step}, {clause}"
    return [
        Finding(
            "nonfinite",
            places,
            evidence,
            REMEDIES["precision"] if trouble else (),
            {},
            cause="precision",
            severity=("error" if share >= 0.5 else "warning") if trouble else "info",
            first_step=h.nonfinite[0].step if h.nonfinite else None,
            data={
                "scaler_skips": skips,
                "late_skips": h.scaler_late_skips,
                "min_scale": h.min_scale,
                "share": share,
            },
        )
    ]


def _period(steps: Sequence[int]) -> float | None:
    """The typical interval between events, when there are 3+, regular and apart (not a burst)."""
    if len(steps) < 3:
        return None
    gaps = np.diff(np.asarray(steps, dtype=np.float64))
    mean = float(gaps.mean())
    return mean if mean >= 3 and float(gaps.std()) <= 0.25 * mean else None


def _size(spike: object) -> str:
    """``"×46 the recent healthy norm (1.5e+05 at step 30)"``."""
    value, ratio, step = spike.value, spike.ratio, spike.step  # type: ignore[attr-defined]
    at = f"{num(value)} at step {step}"
    return at if not math.isfinite(ratio) else f"{times(ratio)} the recent healthy norm ({at})"
