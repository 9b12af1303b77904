"""Findings about a run's incidents: where NaN/Inf started, gradient-norm spikes, loss spikes.

Each reads a :class:`~gradwatch.detect.health_report.HealthReport` and returns a
:class:`~gradwatch.records.Finding` with evidence and remedies. Counts are the health detector's,
the same the run summary shows; every spike is sized by the ratio it was recorded with (to the
recent healthy level), the same number its event and the NaN origin show. Spikes are blamed on the
learning rate only when the gradients were growing or the learning rate rose just before; a spike
out of steady gradients points at the data (:mod:`gradwatch.detect.episodes`). A run already
clipped is not told to add clipping (:mod:`gradwatch.detect.clip_advice`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gradwatch.detect.clip_advice import Clipping, suggest_threshold
from gradwatch.detect.episodes import GAP, LR_RISE, RISE, Episode, episodes
from gradwatch.detect.health_report import INPUT, HealthReport, NonFiniteOrigin, SpikeRecord
from gradwatch.detect.incidents import WINDOW
from gradwatch.records import Finding

__all__ = [
    "describe_origin",
    "loss_spike_finding",
    "names_list",
    "nonfinite_finding",
    "recurrent_types",
    "spike_finding",
]


def describe_origin(origin: NonFiniteOrigin, *, step: bool = True) -> str:
    """One sentence on where a step's NaN/Inf came from (used by events and findings).

    Args:
        origin: What the health detector recorded for the step.
        step: Say at which step (events already start with it).
    """
    where = f"{origin.module_type} `{origin.module}`, shape {_shape(origin.shape)}"
    at = f" first at step {origin.step}" if step else ""
    what = (
        f"NaN in gradient of `{origin.param}`"
        if origin.value == "NaN"
        else f"gradient of `{origin.param}` overflowed (norm Inf)"
    )
    text = (
        f"{what}{at} ({where}), first in backward order of {origin.count} non-finite "
        f"parameter{'s' if origin.count != 1 else ''}"
    )
    loss = _num(origin.loss)
    if origin.stage == "forward":
        if origin.loss is not None and not math.isfinite(origin.loss):
            text += f"; the loss was already {loss}: the forward pass produced it"
        else:
            text += "; an activation was already non-finite in the forward pass"
        if origin.forensics and origin.first_activation is None:
            text += "; every module's output was finite: the loss computation itself produced it"
    elif origin.stage == "backward":
        finite = f"the loss was finite ({loss})" if origin.loss is not None else "forward finite"
        text += f"; {finite}: it became non-finite in backward"
    else:
        text += "; pass loss= (or forensics=True) to tell a forward from a backward problem"
    if origin.first_activation == INPUT:
        text += "; the model's input already held NaN/Inf"
    elif origin.first_activation is not None:
        text += (
            f"; first non-finite activation in forward order: output of "
            f"`{origin.first_activation}` ({origin.first_activation_type})"
        )
    if origin.first_signal is not None:
        text += (
            f"; first non-finite backpropagated signal: gradient of `{origin.first_signal}` "
            f"({origin.first_signal_type}) output"
        )
    for spike, what in ((origin.after_loss_spike, "loss"), (origin.after_spike, "gradient-norm")):
        if spike is not None:
            when = "with" if spike[0] == origin.step else "after"
            text += f"; {when} a {what} spike ×{_num(spike[1])} at step {spike[0]}"
    return text


def nonfinite_finding(health: HealthReport, clipping: Clipping) -> Finding:
    origin = health.nonfinite[0]
    evidence = describe_origin(origin)
    if health.nonfinite_count > 1:
        evidence += f"; {health.nonfinite_count} non-finite steps in all"
    suggested: dict[str, float] = {}
    remedies = []
    forward = origin.stage == "forward"
    spiked = origin.after_loss_spike is not None or origin.after_spike is not None
    before = _preceding_episode(health, origin)
    if before is not None and before.cause == "learning_rate":
        remedies.append(
            f"it followed a spike: the weights were thrown off by large steps; check the "
            f"learning rate / warm-up ({before.reason})"
        )
    elif before is not None:
        later = origin.step - before.records[-1].step
        when, threw = (
            ("followed", "threw")
            if later <= GAP
            else (f"came {later} steps after", "may have thrown")
        )
        remedies.append(
            f"it {when} a spike at {before.steps} ({before.reason}): one bad batch {threw} the "
            f"weights off, not the learning rate; inspect the batch of step {before.first.step} "
            "(an outlier, a corrupt record, a unit error)"
        )
    elif spiked:
        remedies.append("it followed a spike: inspect the batches of the steps before it")
    if forward:
        remedies.append(
            "look for the NaN/Inf source in the forward pass: the input batch, log of 0, "
            "division by 0, exp overflow, sqrt of a negative; clamp or add an epsilon"
        )
        if origin.forensics and origin.first_activation is None:
            remedies.append(
                "the model's outputs were finite: make the loss robust to large outputs (e.g. "
                "a log-space or Huber loss, or compute it in float64) and check the targets"
            )
        elif origin.first_activation is None:
            remedies.append(
                "run with GradWatch(model, forensics=True) to name the first module whose "
                "output goes non-finite"
            )
    threshold = suggest_threshold(health)
    if not clipping.on and (spiked or not forward) and threshold is not None:
        cuts = threshold.cuts(health.spikes)
        evidence += f"; ClipNorm({threshold.value:.3g}) {cuts}: {threshold.why}"
        remedies.append(
            "clip by norm so one large step cannot overflow: "
            f"gradwatch.ClipNorm({threshold.value:.3g})"
        )
        suggested["max_norm"] = threshold.value
    lr_reason = _lr_reason(origin) if before is None else None
    if lr_reason is not None:
        remedies.append(f"lower the learning rate or add warm-up ({lr_reason})")
    if not forward:
        remedies.append("in float16, use torch.amp.GradScaler or train in bfloat16")
    if clipping.on:
        evidence += f"; {clipping.summary(health)}"
        remedies.append(
            'clipping cannot undo NaN/Inf: on_nonfinite="skip" keeps a bad step from reaching '
            "the weights"
        )
    else:
        remedies.append('on_nonfinite="skip" keeps a bad step from reaching the weights')
    params = (origin.param,) if origin.param else ()
    return Finding("nonfinite", params, evidence, tuple(remedies), suggested)


def _preceding_episode(health: HealthReport, origin: NonFiniteOrigin) -> Episode | None:
    """The last spike episode (gradient-norm first, else loss) in the run-up to a NaN.

    Grouped as the spike findings group them, so both findings tell the same story.
    """
    for spike, records, what in (
        (origin.after_spike, health.spikes, "gradient norm"),
        (origin.after_loss_spike, health.loss_spikes, "loss"),
    ):
        if spike is not None:
            chain = [s for s in records if origin.step - WINDOW <= s.step <= origin.step]
            if chain:
                return episodes(chain, what=what)[-1]
    return None


def _lr_reason(origin: NonFiniteOrigin) -> str | None:
    """Evidence against the learning rate before a NaN that no spike preceded."""
    if origin.rise is not None and origin.rise >= RISE:
        return f"the healthy gradient norm rose steadily ×{origin.rise:.2g} over the steps before"
    if origin.lr_change is not None and origin.lr_change >= LR_RISE:
        return f"the learning rate rose ×{origin.lr_change:.2g} in the {WINDOW} steps before"
    return None


def spike_finding(health: HealthReport, factor: float, clipping: Clipping) -> Finding | None:
    kept = health.spikes
    if not any(not s.ratio < factor for s in kept):  # an unknown level (NaN) counts
        return None
    count = health.spike_count
    top = max(kept, key=_ratio_key)
    culprits = sorted(health.spike_params, key=lambda n: -health.spike_params[n])[:3]
    period = _period([s.step for s in kept])
    evidence = (
        f"{_plural(count, 'gradient-norm spike')} flagged (first at step {kept[0].step}"
        f"{f', every ~{period:.0f} steps' if period else ''}), the largest {_size(top)}"
    )
    if culprits:
        evidence += f"; driven by {names_list(culprits)}"
    eps = episodes(kept)
    evidence += _causes(eps)
    remedies = _cause_remedies(eps, "lengthen warm-up", period)
    suggested: dict[str, float] = {}
    threshold = suggest_threshold(health)
    if clipping.on:
        evidence += (
            f"; {clipping.summary(health)}, {health.spikes_clipped} of the {count} spikes "
            "among them"
        )
        through = count - health.spikes_clipped
        limit = clipping.max_norm
        if through and threshold and limit is not None and threshold.value < limit:
            evidence += f"; ClipNorm({threshold.value:.3g}) {threshold.cuts(kept)}: {threshold.why}"
            remedies.append(
                f"{clipping.name} let {_plural(through, 'spike')} through: lower max_norm to "
                f"about {threshold.value:.3g}"
            )
            suggested["max_norm"] = threshold.value
    else:
        if threshold is not None:
            evidence += f"; ClipNorm({threshold.value:.3g}) {threshold.cuts(kept)}: {threshold.why}"
            remedies.append(
                f"clip by norm above the healthy steps: gradwatch.ClipNorm({threshold.value:.3g})"
            )
            suggested["max_norm"] = threshold.value
        remedies.append("or let the threshold follow the run: gradwatch.ClipZScore() (ZClip)")
    recurrent = _recurrent_remedy(health, culprits, clipping)
    if recurrent:
        remedies.append(recurrent)
    return Finding("spike", tuple(culprits), evidence, tuple(remedies), suggested)


def loss_spike_finding(health: HealthReport, factor: float, clipping: Clipping) -> Finding | None:
    kept = health.loss_spikes
    if not any(not s.ratio < factor for s in kept):  # an unknown level (NaN) counts
        return None
    top = max(kept, key=_ratio_key)
    size = f" ×{top.ratio:.3g} its recent level" if math.isfinite(top.ratio) else ""
    evidence = (
        f"loss spiked at {_plural(health.loss_spike_count, 'step')} (first at step "
        f"{kept[0].step}), up to{size} (step {top.step}: loss {_num(top.value)})"
    )
    gradient = episodes(health.spikes)
    eps = [_with_gradients(e, gradient) for e in episodes(kept, what="loss")]
    evidence += _causes(eps)
    remedies = _cause_remedies(eps, "add/lengthen warm-up", None)
    if not clipping.on:
        remedies.append("clip gradients by norm so one bad batch cannot move the weights far")
    return Finding("loss_spike", (), evidence, tuple(remedies), {})


def _with_gradients(loss: Episode, gradient: Sequence[Episode]) -> Episode:
    """A loss-spike episode takes the cause of a gradient-norm episode at or just before it.

    A loss spike alone says little; the gradients around it tell a bad batch (one spike out of
    steady gradients) from an instability (gradients growing into it).
    """
    first, last = loss.first.step - GAP, loss.records[-1].step
    for e in gradient:
        if any(first <= r.step <= last for r in e.records):
            return Episode(loss.records, e.cause, e.reason)
    return loss


def _causes(eps: Sequence[Episode]) -> str:
    """Evidence on what the spike episodes point at (see :mod:`gradwatch.detect.episodes`)."""
    text = ""
    unstable = [e for e in eps if e.cause == "learning_rate"]
    if unstable:
        text += f"; {unstable[0].reason}: the optimisation was going unstable"
    by_reason: dict[str, list[Episode]] = {}
    for e in eps:
        if e.cause == "data":
            by_reason.setdefault(e.reason, []).append(e)
    parts = []
    for reason, group in by_reason.items():
        parts.append(f"{_steps(group)}: {'each ' if len(group) > 1 else ''}{reason}")
    if parts:
        text += f"; {'; '.join(parts)}: that points at the data"
        text += "" if unstable else ", not the learning rate"
    return text


def _cause_remedies(eps: Sequence[Episode], warmup: str, period: float | None) -> list[str]:
    """Remedies for what the episodes point at (causes before symptoms; instability first)."""
    remedies = []
    data = [e.first.step for e in eps if e.cause == "data"]
    unstable = [e for e in eps if e.cause == "learning_rate"]
    if unstable:
        remedies.append(f"lower the learning rate or {warmup} ({unstable[0].reason})")
    if data:
        listed = ", ".join(str(s) for s in data[:5]) + (" ..." if len(data) > 5 else "")
        where = (
            f"the batch of step {listed}" if len(data) == 1 else f"the batches of steps {listed}"
        )
        if period:
            what = "an epoch boundary, a bad shard, unusually long sequences"
            head = f"spikes every ~{period:.0f} steps point at the data: inspect"
        else:
            what = "an outlier, a corrupt or mislabelled record, a unit error"
            head = "inspect"
        remedies.append(
            f'{head} {where} ({what}); on_spike="skip" keeps such a batch out of the weights'
        )
    return remedies


def _steps(eps: Sequence[Episode], limit: int = 4) -> str:
    """``"step 30"``, ``"steps 30 and 46"``, ``"steps 31-39, step 50"``."""
    if any(len(e.records) > 1 for e in eps):
        listed = [e.steps for e in eps[:limit]]
    else:
        listed = [str(e.first.step) for e in eps[:limit]]
        listed[0] = f"step{'s' if len(eps) > 1 else ''} {listed[0]}"
    if len(eps) > limit:
        return f"{', '.join(listed)} and {len(eps) - limit} more"
    return ", ".join(listed[:-1]) + " and " + listed[-1] if len(listed) > 1 else listed[0]


def _recurrent_remedy(health: HealthReport, culprits: Sequence[str], clipping: Clipping) -> str:
    """What to do when a recurrent weight drives the spikes, by the kind of its cell."""
    recurrent = [n for n in culprits if "weight_hh" in n]
    if not recurrent:
        return ""
    kind = health.types[health.names.index(recurrent[0])]
    standard = "" if clipping.on else "; clipping by norm is the standard fix for recurrent nets"
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


def recurrent_types(types: Sequence[str]) -> tuple[list[str], list[str]]:
    """Owner module types that are plain recurrent cells (``RNN``) and gated ones (LSTM, GRU)."""
    plain, gated = [], []
    for kind in dict.fromkeys(types):
        upper = kind.upper()
        if "LSTM" in upper or "GRU" in upper:
            gated.append(kind)
        elif "RNN" in upper:
            plain.append(kind)
    return plain, gated


# ------------------------------------------------------------------------------ helpers


def _period(steps: Sequence[int]) -> float | None:
    """The typical interval between events, when there are 3+, regular and apart (not a burst)."""
    if len(steps) < 3:
        return None
    gaps = np.diff(np.asarray(steps, dtype=np.float64))
    mean = float(gaps.mean())
    return mean if mean >= 3 and float(gaps.std()) <= 0.25 * mean else None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def _ratio_key(spike: SpikeRecord) -> float:
    return spike.ratio if math.isfinite(spike.ratio) else math.inf


def _size(spike: SpikeRecord) -> str:
    """``"×46 the recent healthy norm (1.5e+05 at step 30)"``."""
    at = f"{_num(spike.value)} at step {spike.step}"
    if not math.isfinite(spike.ratio):
        return at
    return f"×{spike.ratio:.3g} the recent healthy norm ({at})"


def names_list(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _num(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if math.isfinite(value) else str(value).lower()
