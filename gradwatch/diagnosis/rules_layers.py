"""Rules about layers: explosion from the first step, vanishing, dead units, unused parameters,
biases that a normalisation cancels.

Each is ``rule(run) -> list[Finding]`` over the depth profile (see
:mod:`gradwatch.diagnosis.depth`). Victims are told apart from causes: when a layer's units never
activate, every layer before it gets a zero gradient too; the finding names the dead layer.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from gradwatch.diagnosis.context import Run
from gradwatch.diagnosis.depth import (
    biases_before_norm,
    chains,
    geometric,
    layers_before_norm,
    param_keys,
    recurrent_types,
    saturating,
    signal_chains,
    weight_gain,
)
from gradwatch.diagnosis.incident import recurrent_place
from gradwatch.diagnosis.remedies import REMEDIES
from gradwatch.diagnosis.wording import names_list, num, times
from gradwatch.records import Finding

__all__ = ["bias_before_norm_finding", "dead_findings", "explosion_finding", "vanishing_finding"]

_FLOAT32_RESOLUTION = 2.0**-24
"""A relative change smaller than this does not change a float32 weight."""
_RELU_PASS = 0.71
"""What ReLU passes of the gradient back per layer (√½); an unsaturated tanh passes ≈1, a sigmoid
at most 0.25. Activations passing less than this, and less than the weights do, saturate."""


def explosion_finding(run: Run) -> list[Finding]:
    """The gradient explodes through depth (or through time) from the very first step."""
    depth = run.depth
    if not depth.exploding:
        return []
    h = run.health
    cell = recurrent_place(h)
    cause = "recurrence" if cell is not None else "initialization"
    if run.incident is not None and run.incident.cause == cause and run.origin is not None:
        return []  # the NaN finding tells this story, with this evidence
    places = depth.params
    if cause == "recurrence":
        places = (str(cell),)
    remedies = list(REMEDIES[cause])
    suggested: dict[str, float] = {}
    advice = run.bound_advice()
    if advice is not None:
        remedies.append(advice[0])
        suggested["max_norm"] = advice[1]
    data: dict[str, float | str | None] = {"gradient_to_weight": depth.ratio}
    if depth.chain is not None:
        data.update(growth_per_layer=depth.chain.factor, growth=10**depth.chain.span)
        data["layers"] = len(depth.chain.members)
    severe = (depth.ratio is not None and depth.ratio >= 1e3) or run.origin is not None
    return [
        Finding(
            "exploding",
            tuple(places),
            depth.clause(h.first_step),
            tuple(remedies),
            suggested,
            cause=cause,  # type: ignore[arg-type]
            severity="error" if severe else "warning",
            first_step=h.first_step,
            data=data,
        )
    ]


def vanishing_finding(
    run: Run, *, growth: float = 1.5, min_layers: int = 4, span: float = 1000.0, floor: float = 1e-8
) -> list[Finding]:
    """The gradient, relative to each weight, shrinks geometrically through depth or vanishes."""
    h = run.health
    if run.origin is not None or run.depth.exploding:
        return []
    before_norm = set(layers_before_norm(h))
    # A normalisation whose output feeds such a layer only scales its input: cancelled too.
    type_of = dict(zip(h.modules, h.types))
    order = list(dict.fromkeys(h.modules[i] for i in h.backward_order))
    for near, far in itertools.pairwise(order):
        if near in before_norm and "Norm" in type_of[far]:
            before_norm.add(far)
    excluded = {i for i, m in enumerate(h.modules) if m in before_norm}
    excluded |= set(np.flatnonzero(h.dead_streak >= h.dead_after).tolist())
    ratio = h.ratio_log.copy()
    ratio[list(excluded)] = np.nan
    keys = param_keys(h)
    found = chains(keys, h.backward_order, ratio, h.modules, min_layers)
    hits = [c for c in found if geometric(c, growth, span, up=False)]
    signals = signal_chains(h, h.signal_log, min_layers)
    signal_hits = [c for c in signals if geometric(c, growth, span, up=False)]
    finite = ratio[np.isfinite(ratio)]
    typical = float(np.median(finite)) if finite.size else math.nan
    low = np.isfinite(ratio) & ((ratio < math.log10(floor)) | (ratio < typical - 4.0))
    if not hits and not signal_hits and not low.any():
        return []
    parts = []
    flagged = set(np.flatnonzero(low).tolist())
    for chain in sorted(hits, key=lambda c: c.span):
        parts.append(
            f"{chain.label} gradients (relative to the parameter's norm) shrink "
            f"{times(chain.factor)} per layer in backward order through {chain.through}, "
            f"{times(10**chain.span)} in all"
        )
        top = float(chain.values.max())
        flagged.update(i for i, v in zip(chain.members, chain.values) if v <= top - 2.0)
    for chain in signal_hits:
        parts.append(
            f"the backpropagated signal shrinks {times(chain.factor)} per layer through "
            f"{chain.through}"
        )
    if not flagged:
        flagged = {i for c in hits for i in c.members}
    data: dict[str, float | str | None] = {}
    if hits:
        data.update(decay_per_layer=min(hits, key=lambda c: c.span).factor)
    if flagged:
        worst = min(flagged, key=lambda i: ratio[i])
        best = int(np.nanargmax(ratio))
        parts.append(
            f"`{h.names[worst]}` gets {num(10 ** ratio[worst])} of its own norm per step, "
            f"{ratio[best] - ratio[worst]:.0f} orders of magnitude below `{h.names[best]}` "
            f"({num(10 ** ratio[best])})"
        )
        data.update(worst_ratio=float(10 ** ratio[worst]), best_ratio=float(10 ** ratio[best]))
        update = h.update_log[worst]
        if np.isfinite(update) and 10**update < _FLOAT32_RESOLUTION:
            parts.append(
                f"its update-to-weight ratio is {10**update:.1g}, below float32 resolution "
                "(6e-8): these weights cannot change"
            )
    plain, gated = recurrent_types(list(h.types))
    squashing = saturating(h)
    split = _decay_split(h, hits)
    if split is not None:
        data.update(weight_gain=split[0], activation_gain=split[1])
    if plain or gated:
        cause = "recurrence"
    elif split is not None:
        gain, through = split
        saturated = through < min(gain, _RELU_PASS)
        cause = "saturation" if saturated else "initialization"
        parts.append(
            f"per layer, the weights pass {times(gain)} of the gradient back (their scale) and "
            f"the activations {times(through)}: "
            + (
                "the activations lose more than the weights and than ReLU would (×0.71): they "
                "saturate"
                if saturated
                else "the weights are too small for the depth"
            )
        )
        if saturated and squashing:
            parts[-1] += f"; the model uses {', '.join(squashing)}"
    elif squashing:
        cause = "saturation"
        parts.append(f"the model uses {', '.join(squashing)}, which saturate")
    else:
        cause = "initialization"
    remedies = list(REMEDIES[cause])
    if plain:
        remedies.append(f"for recurrence, use an LSTM/GRU instead of a plain {plain[0]}")
    if any("LSTM" in t.upper() for t in gated):
        remedies.append(
            "the model already uses an LSTM: initialise its forget-gate biases to 1 so the cell "
            "state carries the gradient across time steps (Jozefowicz et al., 2015)"
        )
    rank = {position: r for r, position in enumerate(h.backward_order)}
    order = sorted(flagged, key=lambda i: -rank.get(i, 0))  # the input end first
    return [
        Finding(
            "vanishing",
            tuple(h.names[i] for i in order),
            "; ".join(parts),
            tuple(remedies),
            {},
            cause=cause,  # type: ignore[arg-type]
            severity="warning",
            first_step=h.first_step,
            data=data,
        )
    ]


def _decay_split(h, hits: list) -> tuple[float, float] | None:
    """A vanishing chain's per-layer decay as (weights' share, activations' share).

    The bias chain is read when there is one: a bias's gradient is the signal itself, while a
    weight's is the signal times the layer's input, which shrinks or grows on its own.
    """
    if not hits:
        return None
    biases = [c for c in hits if c.label.endswith("bias")]
    chain = min(biases or hits, key=lambda c: c.span)
    gain = weight_gain(h, chain.layers)
    if gain is None:
        return None
    return gain, chain.factor / gain


def dead_findings(run: Run) -> list[Finding]:
    """Parameters without a gradient (unused) and layers whose units never activate."""
    h = run.health
    dead = h.dead_streak >= h.dead_after
    if not dead.any() or (run.origin is not None and h.finite_steps < h.dead_after):
        return []
    missing = dead & (h.dead_missing == h.dead_streak)
    findings = []
    for group, is_missing in ((missing, True), (dead & ~missing, False)):
        index = np.flatnonzero(group)
        if index.size == 0:
            continue
        names = [h.names[i] for i in index]
        streak = int(h.dead_streak[index].min())
        never = not h.ever_alive[index].any()
        since = int(h.dead_since[index].min())
        span = f"for all {streak} steps seen" if never else f"for the last {streak}+ steps"
        if not never and since >= 0:
            span += f" (since step {since})"
        data: dict[str, float | str | None] = {"steps": streak, "params": len(names)}
        if is_missing:
            kind, cause, places = "unused", "unused", tuple(names)
            evidence = (
                f"{names_list(names)} received no gradient (grad is None) {span}: not used in "
                "the forward pass"
            )
        else:
            layer, victims = _dead_layer(run, index)
            kind, cause, places = "dead", "dead_units", (layer,)
            evidence = f"the units of `{layer}` never activate {span}: its gradient is exactly zero"
            if victims:
                evidence += (
                    f", and so is every gradient before it ({names_list(victims)}): they are its "
                    "victims, not the cause"
                )
            data.update(layer=layer, victims=len(victims))
        findings.append(
            Finding(
                kind,  # type: ignore[arg-type]
                places,
                evidence,
                REMEDIES[cause],
                {},
                cause=cause,  # type: ignore[arg-type]
                severity="warning",
                first_step=since if since >= 0 else h.first_step,
                data=data,
            )
        )
    return findings


def _dead_layer(run: Run, index: np.ndarray) -> tuple[str, list[str]]:
    """The layer whose units are dead, and the parameters that are zero because of it.

    Zero gradient comes from a zero output gradient (the layer's units are dead: its bias gets
    zero too) or from a zero input (the layer after dead units: its weight is zero, its bias is
    not). The dead layer is the one nearest the loss whose bias (or, without a bias, whose
    weight behind a zero-input layer) is zero.
    """
    h = run.health
    dead = set(index.tolist())
    order = [i for i in h.backward_order if i in dead]
    modules = list(dict.fromkeys(h.modules[i] for i in order))
    alive_bias = {
        h.modules[i] for i, name in enumerate(h.names) if name.endswith("bias") and i not in dead
    }
    chosen = modules[0]
    for module in modules:
        bias = f"{module}.bias" if module else "bias"
        if bias in h.names and h.names.index(bias) in dead:
            chosen = module
            break
        if module in alive_bias:  # zero weight from a zero input: dead units come earlier
            continue
        chosen = module
        break
    victims = [h.names[i] for i in order if h.modules[i] != chosen]
    return chosen, victims


def bias_before_norm_finding(run: Run) -> list[Finding]:
    """Biases right before a BatchNorm/InstanceNorm: cancelled by it, so they never learn (info)."""
    h = run.health
    found = biases_before_norm(h)
    if not found:
        return []
    names = [h.names[i] for i in sorted(found)]
    norms = sorted(set(found.values()))
    evidence = (
        f"{names_list(names)} feed{'s' if len(names) == 1 else ''} {names_list(norms)}, which "
        "subtracts the per-channel mean again: these biases get almost no gradient by "
        "construction (benign)"
    )
    return [
        Finding(
            "bias_before_norm",
            tuple(names),
            evidence,
            REMEDIES["redundant_bias"],
            {},
            cause="redundant_bias",
            severity="info",
            first_step=h.first_step,
            data={"biases": len(names)},
        )
    ]
