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
* ``"spike"`` / ``"loss_spike"``: flagged spikes that stand far above the run's level.
* ``"dead"``: gradients missing (unused parameters) or exactly zero (dead units) for many steps.

Suggested clip thresholds come from the run's own distribution of finite, non-spike global norms:
the median when the gradient explodes (clip most steps a little), the 90th percentile for spikes
(clip only the outliers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from gradwatch.detect.health import INPUT, HealthReport, NonFiniteOrigin
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
        spike_factor: A spike counts when it is this many times the run's median norm.
        loss_factor: A loss spike counts when it is this many times the recent loss level.

    Returns:
        Findings, most causal first: exploding, vanishing, nonfinite, spike, loss_spike, dead.
    """
    quantiles = health.norm_quantiles
    findings: list[Finding] = []
    for make in (_exploding, _vanishing):
        finding = make(health, growth, min_layers, explode_span, vanish_span, vanish_floor)
        if finding is not None:
            findings.append(finding)
    if health.nonfinite:
        findings.append(_nonfinite(health, quantiles.get(0.9, math.nan)))
    spike = _spikes(health, spike_factor)
    if spike is not None:
        findings.append(spike)
    loss_spike = _loss_spikes(health, loss_factor)
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
    remedies = (
        "saturating activations (sigmoid/tanh) in a deep stack squash the gradient: use "
        "ReLU/GELU in hidden layers",
        "initialise with Xavier (tanh/sigmoid) or Kaiming (ReLU) init",
        "add normalisation (LayerNorm/BatchNorm) or residual/skip connections",
        "for recurrence, use an LSTM/GRU instead of a plain RNN",
    )
    rank = {position: r for r, position in enumerate(health.backward_order)}
    params = tuple(health.names[i] for i in sorted(flagged, key=rank.__getitem__))
    return Finding("vanishing", params, "; ".join(parts), remedies, {})


def _largest_update(health: HealthReport) -> tuple[str, float, int] | None:
    top = health.update_log_max
    if health.update_rule is None or not np.isfinite(top).any():
        return None
    i = int(np.nanargmax(top))
    return health.names[i], float(10 ** top[i]), int(health.update_max_step[i])


# ------------------------------------------------------------------------------ events


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


def _nonfinite(health: HealthReport, p90: float) -> Finding:
    origin = health.nonfinite[0]
    evidence = describe_origin(origin)
    if health.nonfinite_count > 1:
        evidence += f"; {health.nonfinite_count} non-finite steps in all"
    suggested: dict[str, float] = {}
    remedies = []
    forward = origin.stage == "forward"
    spiked = origin.after_loss_spike is not None or origin.after_spike is not None
    if spiked:
        remedies.append(
            "it followed a spike: the weights were thrown off by large steps; check the "
            "learning rate / warm-up"
        )
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
    if (spiked or not forward) and math.isfinite(p90):
        remedies.append(
            "clip by norm so one large step cannot overflow: "
            f"gradwatch.ClipNorm({p90:.3g}) (90th percentile of this run's norms)"
        )
        suggested["max_norm"] = float(f"{p90:.3g}")
    remedies.append("lower the learning rate or add warm-up")
    if not forward:
        remedies.append("in float16, use torch.amp.GradScaler or train in bfloat16")
    remedies.append('on_nonfinite="skip" keeps a bad step from reaching the weights')
    params = (origin.param,) if origin.param else ()
    return Finding("nonfinite", params, evidence, tuple(remedies), suggested)


def _spikes(health: HealthReport, factor: float) -> Finding | None:
    median = health.norm_quantiles.get(0.5, math.nan)
    big = [s for s in health.spikes if math.isfinite(median) and s.value >= factor * median]
    if not big:
        return None
    steps = [s.step for s in big]
    top = max(big, key=lambda s: s.value)
    culprits = sorted(health.spike_params, key=lambda n: -health.spike_params[n])[:3]
    period = _period(steps)
    evidence = (
        f"gradient-norm spikes at {len(big)} step{'s' if len(big) > 1 else ''} "
        f"(first at step {steps[0]}{f', every ~{period:.0f} steps' if period else ''}), up to "
        f"×{top.value / median:.3g} the run's median norm {median:.3g} (step {top.step})"
    )
    if culprits:
        evidence += f"; driven by {_names(culprits)}"
    p90 = health.norm_quantiles.get(0.9, math.nan)
    remedies = []
    suggested: dict[str, float] = {}
    if math.isfinite(p90):
        remedies.append(
            f"clip by norm at about the 90th percentile of this run's norms: "
            f"gradwatch.ClipNorm({p90:.3g})"
        )
        suggested["max_norm"] = float(f"{p90:.3g}")
    remedies.append("or let the threshold follow the run: gradwatch.ClipZScore() (ZClip)")
    if any("weight_hh" in name for name in culprits):
        remedies.append(
            "the recurrent weight drives them: initialise weight_hh orthogonally (or smaller), "
            "or use an LSTM/GRU; clipping by norm is the standard fix for RNNs"
        )
    if period:
        remedies.append(
            f"spikes every ~{period:.0f} steps point at the data: inspect the batches at those "
            "steps (an epoch boundary, a bad shard, unusually long sequences)"
        )
    remedies.append("lower the learning rate or lengthen warm-up")
    return Finding("spike", tuple(culprits), evidence, tuple(remedies), suggested)


def _loss_spikes(health: HealthReport, factor: float) -> Finding | None:
    big = [s for s in health.loss_spikes if not s.ratio < factor]  # unknown level (NaN) counts
    if not big:
        return None
    top = max(big, key=lambda s: s.ratio if math.isfinite(s.ratio) else math.inf)
    size = f" ×{top.ratio:.3g} its recent level" if math.isfinite(top.ratio) else ""
    evidence = (
        f"loss spiked at {len(big)} step{'s' if len(big) > 1 else ''} (first at step "
        f"{big[0].step}), up to{size} (step {top.step}: loss {_num(top.value)})"
    )
    remedies = (
        "lower the learning rate or add/lengthen warm-up",
        "inspect the batches at those steps for outliers or corrupt samples",
        "clip gradients by norm so one bad batch cannot move the weights far",
    )
    return Finding("loss_spike", (), evidence, remedies, {})


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
                f"{_names(names)} received no gradient (grad is None) {span}: not used in "
                "the forward pass"
            )
            remedies = (
                "if it should learn, check forward(): its output never reaches the loss",
                "otherwise remove it or freeze it (requires_grad_(False)) so optimizers skip it",
                "under DistributedDataParallel an unused parameter needs "
                "find_unused_parameters=True",
            )
        else:
            evidence = f"{_names(names)} gradient exactly zero {span}: dead units"
            remedies = (
                "units behind a ReLU that never activates (dead ReLU): use LeakyReLU/GELU, "
                "lower the learning rate, or re-initialise the layer feeding them",
                "check for a detach(), a zero mask or a multiplication by zero on the path to "
                "the loss",
            )
        findings.append(Finding("dead", tuple(names), evidence, remedies, {}))
    return findings


# ------------------------------------------------------------------------------ helpers


def _period(steps: Sequence[int]) -> float | None:
    """The typical interval between events, when there are 3+, regular and apart (not a burst)."""
    if len(steps) < 3:
        return None
    gaps = np.diff(np.asarray(steps, dtype=np.float64))
    mean = float(gaps.mean())
    return mean if mean >= 3 and float(gaps.std()) <= 0.25 * mean else None


def _names(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _num(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if math.isfinite(value) else str(value).lower()
