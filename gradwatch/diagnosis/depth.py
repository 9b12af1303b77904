"""The depth axis: how the gradient grows or shrinks through the layers, and what the model is.

Gradients are compared per chain of same-kind parameters (every ``Linear`` bias, say) in backward
order (nearest the loss first), on the RMS gradient (norm / √numel, so layers of different sizes
compare); with forensics, also on the backpropagated signal of each module (max |∂loss/∂output|).
In a chain of equal layers the *weight* gradients stay flat — the signal grows ×w per layer while
the input activation shrinks by as much — so the biases and the signal are where growth shows.

The architecture facts the rules need (recurrent cells, saturating activations, normalisation
right after a layer) come from the module names and class names, never from the tensors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from gradwatch.detect.health_report import HealthReport

__all__ = [
    "Chain",
    "biases_before_norm",
    "chains",
    "geometric",
    "gradient_to_weight",
    "layers_before_norm",
    "param_keys",
    "recurrent_types",
    "rms_log",
    "saturating",
    "signal_chains",
    "weight_gain",
]

_NORMS_CANCELLING_BIAS = ("BatchNorm", "InstanceNorm", "SyncBatchNorm")
"""Normalisations that subtract a per-channel mean, which cancels a per-channel bias before them."""
_SATURATING = ("Sigmoid", "Tanh", "Softsign", "Hardtanh", "Hardsigmoid", "LogSigmoid", "Tanhshrink")


class Chain(NamedTuple):
    """Same-kind items in backward order (nearest the loss first) and how their value changes."""

    label: str
    members: list[int]
    layers: list[str]
    values: np.ndarray  # log10, in member order
    factor: float  # median per-layer ratio, towards the input
    agree: float  # fraction of per-layer ratios on the same side of 1 as the factor
    span: float  # log10 change from the loss end to the input end, at the median rate

    @property
    def through(self) -> str:
        return f"`{self.layers[0]}`…`{self.layers[-1]}` ({len(self.members)} layers)"


def chains(
    keys: Sequence[tuple[str, str]],
    order: Sequence[int],
    values: np.ndarray,
    layers: Sequence[str],
    min_layers: int,
    skip: frozenset[int] = frozenset(),
) -> list[Chain]:
    """Chains of items with the same key, in ``order``, over finite ``values`` (log10)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i in order:
        if i not in skip and np.isfinite(values[i]):
            groups.setdefault(keys[i], []).append(i)
    found = []
    for (kind, role), members in groups.items():
        if len(members) < min_layers:
            continue
        chain_values = values[members]
        steps = np.diff(chain_values)
        median = float(np.median(steps))
        agree = float(np.mean(np.sign(steps) == np.sign(median))) if median else 0.0
        found.append(
            Chain(
                f"{kind} {role}".strip(),
                members,
                [layers[i] for i in members],
                chain_values,
                10.0**median,
                agree,
                median * len(steps),
            )
        )
    return found


def geometric(chain: Chain, growth: float, span: float, up: bool) -> bool:
    """The chain changes by ``growth`` per layer or more, ``span`` in all, consistently."""
    if chain.agree < 0.75:
        return False
    if up:
        return chain.factor >= growth and chain.span >= math.log10(span)
    return chain.factor <= 1.0 / growth and chain.span <= -math.log10(span)


def param_keys(health: HealthReport) -> list[tuple[str, str]]:
    """(owner class, parameter role) of each parameter: ``("Linear", "bias")``."""
    return [(t or "param", n.rsplit(".", 1)[-1]) for t, n in zip(health.types, health.names)]


def rms_log(health: HealthReport, norms_log: np.ndarray) -> np.ndarray:
    """log10 of norm / √numel: gradients of layers of different sizes on one scale."""
    numel = np.array([max(math.prod(s), 1) for s in health.shapes], dtype=np.float64)
    return norms_log - 0.5 * np.log10(numel)


def signal_chains(
    health: HealthReport, values: np.ndarray, min_layers: int, parametrised: bool = True
) -> list[Chain]:
    """Chains of the backpropagated signal of modules of one class (forensics only).

    Args:
        health: The run.
        values: log10 of each hooked module's signal.
        min_layers: Fewest modules a chain needs.
        parametrised: Only modules that own a watched parameter (activations repeat the signal
            of the layer they follow).
    """
    if not health.signal_modules:
        return []
    k = len(health.signal_modules)
    order = list(health.signal_order) or list(reversed(range(k)))
    owners = set(health.modules)
    skip = frozenset(
        j for j, name in enumerate(health.signal_modules) if parametrised and name not in owners
    )
    keys = [(t, "output gradient") for t in health.signal_types]
    return chains(keys, order, values, health.signal_modules, min_layers, skip)


def gradient_to_weight(health: HealthReport) -> tuple[float, str] | None:
    """The largest ‖gradient‖ / ‖weights‖ of a layer at the first step, and that layer.

    Layer by layer (a module's parameters together), so a zero-initialised bias does not count
    as infinitely large and a huge weight elsewhere hides nothing. None when no weights were
    sampled at that step.
    """
    g, w = health.first_norms, health.first_weights
    use = np.isfinite(g) & np.isfinite(w)
    if not use.any():
        return None
    grads: dict[str, float] = {}
    weights: dict[str, float] = {}
    for i in np.flatnonzero(use):
        module = health.modules[i]
        grads[module] = grads.get(module, 0.0) + float(g[i]) ** 2
        weights[module] = weights.get(module, 0.0) + float(w[i]) ** 2
    ratios = {m: math.sqrt(grads[m] / weights[m]) for m in grads if weights[m] > 0}
    if not ratios:
        return None
    layer = max(ratios, key=ratios.__getitem__)
    return ratios[layer], layer


def weight_gain(health: HealthReport, layers: Sequence[str]) -> float | None:
    """How much of the gradient the layers' weights pass back, per layer (median), at the start.

    Backward through a layer multiplies the signal by ``Wᵀ``: for weights of random sign its
    norm changes by ``‖W‖ / √fan_out`` (a convolution's output channels). The rest of a per-layer
    decay is the activation's derivative: ≈0.71 for ReLU, ≤1 for tanh, ≤0.25 for a sigmoid. None
    when no layer of ``layers`` has a matrix-shaped weight sampled at the first step.
    """
    index = {name: i for i, name in enumerate(health.names)}
    gains = []
    for layer in dict.fromkeys(layers):
        i = index.get(f"{layer}.weight" if layer else "weight")
        if i is None or len(health.shapes[i]) < 2 or i >= health.first_weights.size:
            continue
        w = float(health.first_weights[i])
        if math.isfinite(w) and w > 0:
            gains.append(w / math.sqrt(health.shapes[i][0]))
    return float(np.median(gains)) if gains else None


def recurrent_types(types: Sequence[str]) -> tuple[list[str], list[str]]:
    """Module class names that are plain recurrent cells (``RNN``) and gated ones (LSTM, GRU)."""
    plain, gated = [], []
    for kind in dict.fromkeys(types):
        upper = kind.upper()
        if "LSTM" in upper or "GRU" in upper:
            gated.append(kind)
        elif "RNN" in upper:
            plain.append(kind)
    return plain, gated


def saturating(health: HealthReport) -> list[str]:
    """Saturating activation classes the model holds (Sigmoid, Tanh, ...)."""
    types = {t for _, t in health.model_modules}
    return [t for t in _SATURATING if t in types]


def layers_before_norm(health: HealthReport) -> dict[str, str]:
    """Layers whose output feeds a normalisation that subtracts the per-channel mean.

    Read from the data flow, not the module order: in backward arrival order, the module that
    precedes a layer is the one its output feeds. Such a layer's bias is cancelled, and its
    gradient is blind to its weights' scale: it can be tiny by construction, without vanishing.
    Returns ``{layer: norm module}``.
    """
    modules: list[str] = []
    for i in health.backward_order:
        if not modules or modules[-1] != health.modules[i]:
            modules.append(health.modules[i])
    type_of = dict(zip(health.modules, health.types))
    layers = ("Linear", "Conv1d", "Conv2d", "Conv3d")
    found = {}
    for before, after in itertools.pairwise(modules):
        cancels = any(type_of.get(before, "").startswith(n) for n in _NORMS_CANCELLING_BIAS)
        if cancels and type_of.get(after, "") in layers:
            found[after] = before
    return found


def biases_before_norm(health: HealthReport) -> dict[int, str]:
    """Biases of :func:`layers_before_norm`: ``{bias position: norm module}``."""
    found = {}
    for layer, norm in layers_before_norm(health).items():
        bias = f"{layer}.bias" if layer else "bias"
        if bias in health.names:
            found[health.names.index(bias)] = norm
    return found
