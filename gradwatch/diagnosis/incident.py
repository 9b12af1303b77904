"""The cause of a run's first incident, read on three axes that vote: time, depth and place.

* **place** first, where it is decisive: NaN/Inf already in the model's input (the data), a value
  beyond float16's range (precision), a module whose output went non-finite out of steady training
  (forward numerics), a loss that is non-finite while everything before it is finite;
* **depth** at the very first step, before any update: the gradient growing geometrically
  through the layers, or out of all proportion to the weights — the initialisation (or, in a
  recurrent cell, the recurrence through time);
* **time**: a rise of the global norm carried by one step (a bad batch: the data) or built over
  several steps (the learning rate).

:func:`explain` returns one :class:`Explanation` that every finding about the incident shares, so
the NaN finding, the spike finding and the alert a person saw at the time name the same cause.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from gradwatch.detect.health_report import HealthReport, NonFiniteOrigin
from gradwatch.diagnosis.depth import (
    Chain,
    chains,
    geometric,
    gradient_to_weight,
    param_keys,
    recurrent_types,
    rms_log,
    signal_chains,
)
from gradwatch.diagnosis.trend import Blowup, blowup
from gradwatch.diagnosis.wording import names_list, num, times, where

__all__ = [
    "FLOAT16_MAX",
    "HUGE_RATIO",
    "Explanation",
    "StartDepth",
    "explain",
    "explain_blowup",
    "recurrent_place",
    "start_depth",
]

FLOAT16_MAX = 65504.0
HUGE_RATIO = 1e3
"""A first-step gradient this many times the weights' norm: no learning rate can use it."""
_GROWTH, _MIN_LAYERS, _SPAN = 1.25, 4, 30.0
"""A chain explodes when it grows ×1.25 per layer or more over 4+ layers, ×30 in all (a
preserving initialisation keeps the signal at ×1 per layer)."""


class Explanation(NamedTuple):
    """What an incident points at.

    Attributes:
        cause: One of :data:`gradwatch.CAUSES`.
        places: Where it started, most causal first (may be empty when unknown).
        reason: The evidence, as a clause ready to join a sentence.
        data: The numbers behind it.
    """

    cause: str
    places: tuple[str, ...]
    reason: str
    data: dict[str, float | str | None]


class StartDepth(NamedTuple):
    """The first step's gradient, before any update: growth through depth, size to the weights."""

    chain: Chain | None  # an exploding chain (parameters or signal), the steepest
    signal: bool  # the chain is the backpropagated signal (forensics)
    ratio: float | None  # the largest layer's ‖g‖ / ‖w‖ at the first step
    params: tuple[str, ...]  # the chain's layers from the input end, or the largest ratio's layer
    ratio_layer: str = ""  # the layer with the largest ratio

    @property
    def exploding(self) -> bool:
        return self.chain is not None or (self.ratio is not None and self.ratio >= HUGE_RATIO)

    def clause(self, step: int | None) -> str:
        parts = []
        if self.chain is not None:
            what = "backpropagated signal" if self.signal else f"{self.chain.label} gradient"
            parts.append(
                f"at step {step}, before any update, the {what} grows "
                f"{times(self.chain.factor)} per layer through {self.chain.through}, "
                f"{times(10**self.chain.span)} in all"
            )
        if self.ratio is not None and self.ratio >= HUGE_RATIO:
            parts.append(
                f"the first gradient of `{self.ratio_layer}` "
                f"is {num(self.ratio)} times its weights' norm (healthy: 1e-3 to 1)"
            )
        return "; ".join(parts)


def start_depth(health: HealthReport) -> StartDepth:
    """The first step's depth profile (see :class:`StartDepth`)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_g = np.log10(np.where(health.first_norms > 0, health.first_norms, np.nan))
        log_s = np.log10(np.where(health.first_signal > 0, health.first_signal, np.nan))
    keys = param_keys(health)
    found = chains(keys, health.backward_order, rms_log(health, log_g), health.modules, _MIN_LAYERS)
    hits = [(c, False) for c in found if geometric(c, _GROWTH, _SPAN, up=True)]
    if log_s.size:
        signals = signal_chains(health, log_s, _MIN_LAYERS)
        hits += [(c, True) for c in signals if geometric(c, _GROWTH, _SPAN, up=True)]
    ratio, layer = gradient_to_weight(health) or (None, "")
    layer = _input_end(health, layer)
    if hits:
        chain, signal = max(hits, key=lambda h: h[0].span)
        return StartDepth(chain, signal, ratio, tuple(reversed(chain.layers)), layer)
    return StartDepth(None, False, ratio, (layer,) if layer else (), layer)


def _input_end(health: HealthReport, layer: str) -> str:
    """Among the layers whose first gradient is within 2x of the largest ratio, the one nearest
    the input: in a chain of equal layers every ratio ties, and the blow-up starts at the end
    the gradient reaches last."""
    g, w = health.first_norms, health.first_weights
    ratios: dict[str, float] = {}
    for i in health.backward_order:
        if np.isfinite(g[i]) and np.isfinite(w[i]) and w[i] > 0:
            m = health.modules[i]
            ratios[m] = max(ratios.get(m, 0.0), float(g[i] / w[i]))
    if layer not in ratios:
        return layer
    near = [m for m, r in ratios.items() if r >= 0.5 * ratios[layer]]
    return near[-1] if near else layer


def recurrent_place(health: HealthReport) -> str | None:
    """Where a recurrence lives: torch's cells' hidden-to-hidden weight, else a hand-written
    cell module (a class named like ``RNN``, ``...Cell``, ``Recurrent``), else None."""
    plain, gated = recurrent_types(list(health.types))
    names = [n for n, t in zip(health.names, health.types) if t in plain + gated]
    if names:
        hh = [n for n in names if "weight_hh" in n]
        return (hh or names)[0]
    for name, kind in health.model_modules:
        upper = kind.upper()
        if name and any(k in upper for k in ("RNN", "CELL", "RECURRENT", "ELMAN")):
            return name
    return None


def _half(health: HealthReport, origin: NonFiniteOrigin | None) -> bool:
    """The step ran in float16: its non-finite parameter is float16, or a GradScaler was used."""
    if math.isfinite(health.min_scale):
        return True
    if origin is None or origin.param is None or origin.param not in health.names:
        return False
    return health.dtypes[health.names.index(origin.param)] == "float16" if health.dtypes else False


def _largest_finite_half(health: HealthReport) -> float:
    half = np.array([d == "float16" for d in health.dtypes], bool)
    values = health.first_norms[half] if half.size == health.first_norms.size else np.zeros(0)
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size else math.nan


def explain_blowup(rise: Blowup) -> Explanation:
    """A sustained rise of the global norm: one batch (a jump) or the optimisation (growth)."""
    data: dict[str, float | str | None] = {
        "start": rise.start,
        "onset": rise.onset,
        "level": rise.level,
        "peak": rise.peak,
        "growth_per_step": rise.per_step,
        "largest_jump": rise.jump,
        "lr_ratio": rise.lr_ratio,
        "loss_ratio": rise.loss_ratio,
    }
    if rise.kind == "jump":
        reason = (
            f"the gradient norm jumped {times(rise.jump)} in one step at step {rise.jump_step} "
            f"out of steady steps (level {num(rise.level)}): one batch did it"
        )
        return Explanation("data", (), reason, data)
    lr = ""
    if rise.lr_ratio is not None and rise.lr_ratio >= 1.5:
        lr = f", while the learning rate rose {times(rise.lr_ratio)}"
    reason = (
        f"the gradient norm grew {times(rise.per_step)} per step from {num(rise.level)} at step "
        f"{rise.start} to {num(rise.value)} at step {rise.onset}{lr}: no single batch, the "
        "optimisation is unstable"
    )
    return Explanation("learning_rate", (), reason, data)


def explain(health: HealthReport, origin: NonFiniteOrigin | None) -> Explanation:
    """The cause of the incident at ``origin`` (a NaN/Inf), or of the run's first rise."""
    if origin is not None and origin.first_activation == "<input>":
        clause = where(origin)[1]
        return Explanation("data", ("input",), clause, {"step": origin.step})
    overflow = origin is not None and (
        origin.value == "Inf" or origin.first_activation_value == "Inf"
    )  # a gradient, or a module's output, left the range (an Inf, not a NaN)
    if overflow and _half(health, origin):
        return _precision(health, origin)
    depth = start_depth(health)
    recurrent = recurrent_place(health)
    if depth.exploding:
        data = {"growth_per_layer": depth.chain.factor if depth.chain else None}
        data["gradient_to_weight"] = depth.ratio
        if recurrent is not None:
            reason = (
                f"{depth.clause(health.first_step)}; the model is recurrent: the gradient "
                f"explodes through time in `{recurrent}`"
            )
            return Explanation("recurrence", (recurrent,), reason, data)
        places = depth.params
        if origin is not None and where(origin)[0] == "loss":  # the loss is where it showed
            places = ("loss", *places)
        return Explanation("initialization", places, depth.clause(health.first_step), data)
    rise = _rise_before(health, origin)
    if rise is not None:
        found = explain_blowup(rise)
        in_cell = (
            recurrent is not None
            and origin is not None
            and origin.param is not None
            and origin.module.startswith(str(recurrent).rsplit(".weight", 1)[0])
        )
        if in_cell and found.cause == "learning_rate":
            reason = f"{found.reason}; it starts in the recurrent weight `{recurrent}`"
            return Explanation("recurrence", (str(recurrent),), reason, found.data)
        places = _culprits(health, rise)
        return Explanation(found.cause, places, found.reason, found.data)
    if origin is None:
        return Explanation("unknown", (), "", {})
    return _sudden(health, origin)


def _rise_before(health: HealthReport, origin: NonFiniteOrigin | None) -> Blowup | None:
    """A finite rise before the incident (a direct jump to NaN/Inf is the place axis's case)."""
    kind = "nonfinite" if origin is not None and origin.count else "loss_nonfinite"
    series = [health.run_ups.get(kind)] if origin is not None else []
    series += [health.early, health.overview]
    for s in series:
        if s is None or len(s) < 2:
            continue
        rise = blowup(s)
        if rise is None:
            continue
        if rise.onset >= (origin.step if origin is not None else math.inf):
            continue
        if rise.nonfinite_step is not None and rise.onset >= rise.nonfinite_step:
            continue
        return rise
    return None


def _culprits(health: HealthReport, rise: Blowup) -> tuple[str, ...]:
    near = [s for s in health.spikes if rise.start <= s.step <= rise.onset + 2 and s.params]
    return near[0].params if near else ()


def _precision(health: HealthReport, origin: NonFiniteOrigin) -> Explanation:
    place, clause = where(origin)
    largest = _largest_finite_half(health)
    data: dict[str, float | str | None] = {"dtype_max": FLOAT16_MAX, "step": origin.step}
    reason = (
        f"{clause}; it overflowed float16, whose largest value is 65504 "
        "(an Inf, not a NaN: a value left the range)"
    )
    if math.isfinite(largest) and largest > 0:
        data["largest_finite"] = largest
        reason += f"; other float16 gradients already reached {num(largest)}"
    if math.isfinite(health.min_scale):
        data["min_scale"] = health.min_scale
        reason += f"; the GradScaler's loss scale fell to {num(health.min_scale)}"
    return Explanation("precision", (place,) if place else (), reason, data)


def _sudden(health: HealthReport, origin: NonFiniteOrigin) -> Explanation:
    """NaN/Inf out of steady, finite training: the place tells."""
    place, clause = where(origin)
    data: dict[str, float | str | None] = {"step": origin.step, "stage": origin.stage}
    steady = "out of steady training" if origin.step != health.first_step else "from the first step"
    if place == "loss" or origin.first_activation is not None:
        return Explanation("forward_numerics", (place,), f"{clause}, {steady}", data)
    once = health.nonfinite_count + health.loss_nonfinite_count <= 3 and (
        health.steps > origin.step + 1 - (health.first_step or 0)
    )
    if origin.step != health.first_step and origin.stage == "forward":
        after = "and the next steps were finite" if once else "and nothing grew before it"
        reason = (
            f"the loss went {num(origin.loss)} at step {origin.step} {steady}, {after}: a bad "
            "batch (NaN/Inf in its inputs or targets); forensics=True would tell it from an "
            "unsafe operation"
        )
        return Explanation("data", (), reason, data)
    if origin.stage == "backward" or origin.step == health.first_step:
        return Explanation(
            "forward_numerics", (place,) if place else (), f"{clause}, {steady}", data
        )
    reason = f"{clause}, {steady}; forensics=True would name the module that made it"
    return Explanation("unknown", (place,) if place else (), reason, data)


def describe(explanation: Explanation) -> str:
    """``"probable cause: the learning rate (...)"``."""
    return f"probable cause: {explanation.cause.replace('_', ' ')} ({explanation.reason})"


def listed(places: tuple[str, ...]) -> str:
    return names_list(list(places))
