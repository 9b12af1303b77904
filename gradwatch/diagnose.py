"""Findings: what went wrong in a run, the evidence, and what to change.

:func:`diagnose_health` reads a :class:`~gradwatch.detect.health.HealthReport` (plain numpy data,
no torch) and returns :class:`~gradwatch.records.Finding` records, most causal first:

* ``"exploding"``: the gradient grows geometrically through depth. Measured per chain of
  parameters of the same kind (e.g. every ``Linear`` bias) in backward order, on the RMS gradient
  (norm / √numel, so layers of different sizes compare), and with forensics on the backpropagated
  signal of each module. In a chain of equal layers the *weight* gradients stay flat (the signal
  grows ×w per layer while the input activation shrinks by as much): the bias gradients and the
  signal show the growth, so every chain is looked at.
* ``"vanishing"``: the gradient relative to the parameter's own norm shrinks geometrically through
  depth, or is far below the others (4+ orders of magnitude) or below an absolute floor.
* ``"nonfinite"``: where the first NaN/Inf came from (forward or backward, which parameter and
  module, what preceded it).
* ``"spike"`` / ``"loss_spike"``: flagged spikes that stand far above the recent healthy level,
  and whether they point at the data or at the learning rate.
* ``"dead"``: gradients missing (unused parameters) or exactly zero (dead units) for many steps.

The incident findings (nonfinite, spikes) are written by :mod:`gradwatch.detect.incident_findings`;
what to say about clipping, by :mod:`gradwatch.detect.clip_advice`: a suggested ``max_norm`` comes
from the run's own healthy (finite, non-spike) global norms, the median when the gradient explodes
(clip most steps a little), a robust z-score against spikes (clip only the outliers), and a run
that is already clipped is told what its clipper did, not to add one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from gradwatch.detect.clip_advice import Clipping, without_clip_advice
from gradwatch.detect.health import HealthReport
from gradwatch.detect.incident_findings import (
    describe_origin,
    loss_spike_finding,
    names_list,
    nonfinite_finding,
    recurrent_types,
    spike_finding,
)
from gradwatch.records import Finding

__all__ = ["describe_origin", "diagnose_health"]

_FLOAT32_RESOLUTION = 2.0**-24
"""A relative change smaller than this does not change a float32 weight."""


class _Chain(NamedTuple):
    """Same-kind items in backward order (nearest the loss first) and how their value changes."""

    label: str
    members: list[int]
    layers: list[str]
    values: np.ndarray  # log10, in member order
    factor: float  # median per-layer ratio, towards the input
    agree: float  # fraction of per-layer ratios on the same side of 1 as the factor
    span: float  # log10 change from the loss end to the input end

    @property
    def through(self) -> str:
        return f"`{self.layers[0]}`…`{self.layers[-1]}` ({len(self.members)} layers)"


def diagnose_health(
    health: HealthReport,
    *,
    growth: float = 1.5,
    min_layers: int = 4,
    explode_span: float = 100.0,
    vanish_span: float = 1000.0,
    vanish_floor: float = 1e-8,
    spike_factor: float = 3.0,
    loss_factor: float = 2.0,
    clip: Mapping[str, Any] | None = None,
) -> list[Finding]:
    """Turn what a run showed into findings with evidence and remedies.

    Args:
        health: What the watcher's :class:`~gradwatch.detect.health.HealthDetector` saw.
        growth: Per-layer ratio (or its inverse) that makes a chain geometric.
        min_layers: Fewest layers a chain needs.
        explode_span: Total growth through a chain that makes it exploding.
        vanish_span: Total decay through a chain that makes it vanishing.
        vanish_floor: Gradient-to-weight ratio below which a parameter's gradient has vanished
            whatever the others do.
        spike_factor: Spikes make a finding when one is this many times the recent healthy
            norm (the ratio every spike message shows).
        loss_factor: A loss spike counts when it is this many times the recent loss level.
        clip: The run's clipper settings (``clipper.config()``: ``{"name": "ClipNorm",
            "max_norm": 1.0, ...}``), or None. A run with a clipper, or with clipped steps, is
            not told to add clipping.

    Returns:
        Findings, most causal first: exploding, vanishing, nonfinite, spike, loss_spike, dead.
    """
    clipping = Clipping.of(health, clip)
    findings: list[Finding] = []
    for make in (_exploding, _vanishing):
        finding = make(health, growth, min_layers, explode_span, vanish_span, vanish_floor)
        if finding is not None:
            findings.append(finding)
    if findings and findings[0].kind == "exploding" and clipping.on:
        findings[0] = without_clip_advice(findings[0], clipping, health)
    if health.nonfinite:
        findings.append(nonfinite_finding(health, clipping))
    spike = spike_finding(health, spike_factor, clipping)
    if spike is not None:
        findings.append(spike)
    loss_spike = loss_spike_finding(health, loss_factor, clipping)
    if loss_spike is not None:
        findings.append(loss_spike)
    findings.extend(_dead(health))
    return findings


# ------------------------------------------------------------------------------ depth chains


def _chains(
    keys: Sequence[tuple[str, str]],
    order: Sequence[int],
    values: np.ndarray,
    layers: Sequence[str],
    min_layers: int,
) -> list[_Chain]:
    groups: dict[tuple[str, str], list[int]] = {}
    for i in order:
        if np.isfinite(values[i]):
            groups.setdefault(keys[i], []).append(i)
    chains = []
    for (kind, role), members in groups.items():
        if len(members) < min_layers:
            continue
        chain_values = values[members]
        steps = np.diff(chain_values)
        median = float(np.median(steps))
        agree = float(np.mean(np.sign(steps) == np.sign(median))) if median else 0.0
        label = f"{kind} {role}".strip()
        chains.append(
            _Chain(
                label,
                members,
                [layers[i] for i in members],
                chain_values,
                10.0**median,
                agree,
                float(chain_values[-1] - chain_values[0]),
            )
        )
    return chains


def _param_keys(health: HealthReport) -> list[tuple[str, str]]:
    return [(t or "param", n.rsplit(".", 1)[-1]) for t, n in zip(health.types, health.names)]


def _rms_log(health: HealthReport) -> np.ndarray:
    numel = np.array([max(math.prod(s), 1) for s in health.shapes], dtype=np.float64)
    return health.grad_log - 0.5 * np.log10(numel)


def _signal_chains(health: HealthReport, min_layers: int) -> list[_Chain]:
    if not health.signal_modules:
        return []
    k = len(health.signal_modules)
    order = list(health.signal_order) or list(reversed(range(k)))
    keys = [(t, "output gradient") for t in health.signal_types]
    return _chains(keys, order, health.signal_log, health.signal_modules, min_layers)


def _geometric(chain: _Chain, growth: float, span: float, up: bool) -> bool:
    if chain.agree < 0.75:
        return False
    if up:
        return chain.factor >= growth and chain.span >= math.log10(span)
    return chain.factor <= 1.0 / growth and chain.span <= -math.log10(span)


def _exploding(
    health: HealthReport,
    growth: float,
    min_layers: int,
    explode_span: float,
    _vanish_span: float,
    _floor: float,
) -> Finding | None:
    keys = _param_keys(health)
    chains = _chains(keys, health.backward_order, _rms_log(health), health.modules, min_layers)
    signals = _signal_chains(health, min_layers)
    hits = [c for c in chains if _geometric(c, growth, explode_span, up=True)]
    signal_hits = [c for c in signals if _geometric(c, growth, explode_span, up=True)]
    if not hits and not signal_hits:
        return None
    parts = []
    params: list[str] = []
    for chain in sorted(hits, key=lambda c: -c.span):
        parts.append(
            f"{chain.label} gradients grow ×{chain.factor:.2f} per layer in backward order "
            f"through {chain.through}, ×{10**chain.span:.2g} in all (geometric)"
        )
        params.extend(health.names[i] for i in chain.members)
    for chain in sorted(signal_hits, key=lambda c: -c.span):
        parts.append(
            f"the backpropagated signal (max |∂loss/∂output| of each {chain.label.split(' ')[0]}) "
            f"grows ×{chain.factor:.2f} per layer through {chain.through}"
        )
        if not params:
            params.extend(chain.layers)
    hit_kinds = {c.label.split(" ")[0] for c in hits + signal_hits}
    for chain in chains:
        flat = abs(math.log10(chain.factor)) < math.log10(1.2)
        if chain not in hits and flat and chain.label.split(" ")[0] in hit_kinds:
            parts[-1] += (
                f", while {chain.label} gradients stay flat (×{chain.factor:.2f} per layer): "
                "the signal grows as fast as the layer inputs shrink"
            )
    median = health.norm_quantiles.get(0.5, math.nan)
    remedies = [
        "weights too large for the depth: initialise with Kaiming (ReLU) or Xavier (tanh) init, "
        'e.g. nn.init.kaiming_normal_(layer.weight, nonlinearity="relu"), so each layer keeps '
        "the signal's scale",
        "add normalisation (LayerNorm/BatchNorm) or residual connections so the gain per layer "
        "stays near 1",
    ]
    suggested: dict[str, float] = {}
    if math.isfinite(median):
        remedies.append(
            "clip by norm at about the run's median gradient norm: "
            f"gradwatch.ClipNorm({median:.3g})"
        )
        suggested["max_norm"] = float(f"{median:.3g}")
    update = _largest_update(health)
    if update is not None and update[1] > 0.1:
        name, ratio, step = update
        parts.append(
            f"the largest update-to-weight ratio was {ratio:.2g} in `{name}` at step {step} "
            "(healthy ≈1e-3)"
        )
        remedies.append("lower the learning rate or add warm-up: updates rival the weights")
    return Finding("exploding", tuple(params), "; ".join(parts), tuple(remedies), suggested)


def _vanishing(
    health: HealthReport,
    growth: float,
    min_layers: int,
    _explode_span: float,
    vanish_span: float,
    floor: float,
) -> Finding | None:
    ratio = health.ratio_log
    keys = _param_keys(health)
    chains = _chains(keys, health.backward_order, ratio, health.modules, min_layers)
    hits = [c for c in chains if _geometric(c, growth, vanish_span, up=False)]
    signal_hits = [
        c for c in _signal_chains(health, min_layers) if _geometric(c, growth, vanish_span, False)
    ]
    finite = ratio[np.isfinite(ratio)]
    typical = float(np.median(finite)) if finite.size else math.nan
    low = np.isfinite(ratio) & ((ratio < math.log10(floor)) | (ratio < typical - 4.0))
    if not hits and not signal_hits and not low.any():
        return None
    parts = []
    flagged = set(np.flatnonzero(low).tolist())
    for chain in sorted(hits, key=lambda c: c.span):
        parts.append(
            f"{chain.label} gradients (relative to the parameter's norm) shrink "
            f"×{chain.factor:.2g} per layer in backward order through {chain.through}, "
            f"×{10**chain.span:.1g} in all (geometric)"
        )
        top = float(chain.values.max())
        flagged.update(i for i, v in zip(chain.members, chain.values) if v <= top - 2.0)
    for chain in signal_hits:
        parts.append(
            f"the backpropagated signal shrinks ×{chain.factor:.2g} per layer through "
            f"{chain.through}"
        )
    if not flagged:
        flagged = {i for c in hits for i in c.members}
    worst = min(flagged, key=lambda i: ratio[i]) if flagged else None
    if worst is not None:
        best = int(np.nanargmax(ratio))
        parts.append(
            f"`{health.names[worst]}` gets {10 ** ratio[worst]:.2g} of its own norm per step, "
            f"{ratio[best] - ratio[worst]:.0f} orders of magnitude below "
            f"`{health.names[best]}` ({10 ** ratio[best]:.2g})"
        )
        update = health.update_log[worst]
        if np.isfinite(update) and 10**update < _FLOAT32_RESOLUTION:
            parts.append(
                f"its update-to-weight ratio is {10**update:.1g}, below float32 resolution "
                "(6e-8): these weights cannot change"
            )
    remedies = [
        "saturating activations (sigmoid/tanh) in a deep stack squash the gradient: use "
        "ReLU/GELU in hidden layers",
        "initialise with Xavier (tanh/sigmoid) or Kaiming (ReLU) init",
        "add normalisation (LayerNorm/BatchNorm) or residual/skip connections",
    ]
    plain, gated = recurrent_types(health.types)
    if plain:
        remedies.append(f"for recurrence, use an LSTM/GRU instead of a plain {plain[0]}")
    if any("LSTM" in t.upper() for t in gated):
        remedies.append(
            "the model already uses an LSTM: initialise its forget-gate biases to 1 so the cell "
            "state carries the gradient across time steps (Jozefowicz et al., 2015)"
        )
    rank = {position: r for r, position in enumerate(health.backward_order)}
    params = tuple(health.names[i] for i in sorted(flagged, key=rank.__getitem__))
    return Finding("vanishing", params, "; ".join(parts), tuple(remedies), {})


def _largest_update(health: HealthReport) -> tuple[str, float, int] | None:
    top = health.update_log_max
    if health.update_rule is None or not np.isfinite(top).any():
        return None
    i = int(np.nanargmax(top))
    return health.names[i], float(10 ** top[i]), int(health.update_max_step[i])


# ------------------------------------------------------------------------------ dead


def _dead(health: HealthReport) -> list[Finding]:
    dead = health.dead_streak >= health.dead_after
    if not dead.any():
        return []
    missing = dead & (health.dead_missing == health.dead_streak)
    findings = []
    for group, is_missing in ((missing, True), (dead & ~missing, False)):
        index = np.flatnonzero(group)
        if index.size == 0:
            continue
        names = [health.names[i] for i in index]
        streak = int(health.dead_streak[index].min())
        never = not health.ever_alive[index].any()
        since = int(health.dead_since[index].min())
        span = f"for all {streak} steps seen" if never else f"for the last {streak}+ steps"
        if not never and since >= 0:
            span += f" (since step {since})"
        if is_missing:
            evidence = (
                f"{names_list(names)} received no gradient (grad is None) {span}: not used in "
                "the forward pass"
            )
            remedies = (
                "if it should learn, check forward(): its output never reaches the loss",
                "otherwise remove it or freeze it (requires_grad_(False)) so optimizers skip it",
                "under DistributedDataParallel an unused parameter needs "
                "find_unused_parameters=True",
            )
        else:
            evidence = f"{names_list(names)} gradient exactly zero {span}: dead units"
            remedies = (
                "units behind a ReLU that never activates (dead ReLU): use LeakyReLU/GELU, "
                "lower the learning rate, or re-initialise the layer feeding them",
                "check for a detach(), a zero mask or a multiplication by zero on the path to "
                "the loss",
            )
        findings.append(Finding("dead", tuple(names), evidence, remedies, {}))
    return findings
