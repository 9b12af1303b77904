"""The plain data a :class:`~gradwatch.detect.health.HealthDetector` hands to the diagnosis.

Frozen records with no torch inside: :class:`HealthReport` (per-parameter statistics as numpy
arrays), :class:`NonFiniteOrigin` (where a step's NaN/Inf came from) and :class:`SpikeRecord`,
plus their conversion to and from the plain values of a ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from gradwatch.detect.trajectory import Series

__all__ = [
    "INPUT",
    "HealthReport",
    "NonFiniteOrigin",
    "SpikeRecord",
    "origin_from_state",
    "origin_to_state",
    "spike_from_state",
]

INPUT = "<input>"
"""Name standing for the model's input where a module name is expected (forensics)."""


@dataclass(frozen=True)
class NonFiniteOrigin:
    """Where a step's NaN/Inf came from, as far as the watcher can tell.

    Attributes:
        step: The step.
        param: First parameter in backward order whose gradient is NaN/Inf (None if unknown).
        value: ``"NaN"`` or ``"Inf"`` (of that parameter's gradient norm).
        module: The module owning ``param``.
        module_type: Its class name (``"Linear"``).
        shape: Shape of ``param``.
        count: Parameters with a non-finite gradient at this step.
        loss: The step's loss, when given.
        stage: ``"forward"`` (the loss or an activation was already non-finite), ``"backward"``
            (the forward pass was finite) or ``"unknown"`` (no loss given and forensics off).
        first_activation: Forensics: first module whose output was non-finite, in forward order
            (``"<input>"``: the model's input already was).
        first_activation_type: Its class name.
        first_activation_value: ``"NaN"``, or ``"Inf"`` when that output overflowed (±inf and
            no NaN in it).
        first_signal: Forensics: first module whose output gradient was non-finite, in backward
            order.
        first_signal_type: Its class name.
        after_spike: ``(step, ratio to the run's level)`` of a gradient-norm spike shortly before.
        after_loss_spike: ``(step, ratio to the run's level)`` of a loss spike shortly before.
        forensics: Activations were watched at this step (so ``first_activation`` None means
            every hooked module's output was finite).
        rise: Steady growth of the healthy global norm over the healthy steps just before (see
            :class:`SpikeRecord`), or None.
        lr_change: Learning rate of the previous step over the one 20 steps earlier, or None
            (no optimizer attached).
    """

    step: int
    param: str | None
    value: str
    module: str
    module_type: str
    shape: tuple[int, ...]
    count: int
    loss: float | None
    stage: Literal["forward", "backward", "unknown"]
    first_activation: str | None = None
    first_activation_type: str | None = None
    first_activation_value: str | None = None
    first_signal: str | None = None
    first_signal_type: str | None = None
    after_spike: tuple[int, float] | None = None
    after_loss_spike: tuple[int, float] | None = None
    forensics: bool = False
    rise: float | None = None
    lr_change: float | None = None


class SpikeRecord(NamedTuple):
    """A flagged spike (of the gradient norm or of the loss) and what led up to it.

    Attributes:
        step: The step.
        value: The global norm (or the loss).
        ratio: ``value`` over the median of the recent healthy values (NaN when none yet).
        params: The parameters that drove it (gradient-norm spikes).
        rise: Steady growth of the healthy global norm over the last 20 healthy steps before
            it: the factor a least-squares line through log(norm) spans, when the line explains
            at least half the variance; 1 when there is no such trend (flat or noisy), None
            with fewer than 10 healthy steps.
        lr_change: Learning rate of the previous step over the one 20 steps before it; None
            when no optimizer is attached.
        carried: The share of the rise from the healthy level that the spike's own step
            carried (log scale): ≈1 when it came out of steady steps in one step, small when
            the steps before it were already rising. None when unknown.
    """

    step: int
    value: float
    ratio: float
    params: tuple[str, ...]
    rise: float | None = None
    lr_change: float | None = None
    carried: float | None = None


@dataclass(frozen=True)
class HealthReport:
    """What :class:`HealthDetector` saw, as plain data (numpy arrays indexed by parameter).

    Logarithms are base 10; NaN where a statistic has no finite sample.

    Attributes:
        names: Parameter names, in the watcher's order.
        modules: Owning module of each parameter.
        types: Owning module's class name of each parameter.
        shapes: Shape of each parameter.
        backward_order: Parameter positions in backward arrival order (nearest the loss first).
        steps: Steps seen.
        finite_steps: Steps whose gradients were all finite.
        grad_log: Mean log10 gradient norm over finite steps where it was > 0.
        ratio_log: Mean log10 of gradient norm / parameter norm.
        update_log: Mean log10 of the update-to-weight ratio (see ``update_rule``).
        update_log_max: Largest log10 update-to-weight ratio.
        update_max_step: Step of that largest ratio (-1 if none).
        update_rule: ``"sgd"``: update = lr·‖g‖; ``"adaptive"``: ≈ lr·√numel (Adam-like);
            None: no learning rate known. The weight norm is the owning module's.
        dead_streak: Current run of finite steps with a zero or missing gradient.
        dead_missing: Of those, steps where the gradient was missing (None).
        dead_since: First step of the current run (-1 if the gradient is alive).
        ever_alive: The parameter had a non-zero gradient at some step.
        dead_after: Steps in a row that make a parameter dead.
        norm_quantiles: ``{0.5: median, 0.9: ..., 0.99: ...}`` of finite, non-spike global norms.
        norm_max: Largest finite global norm.
        spikes: Gradient-norm spikes (the first ones).
        spike_count: All gradient-norm spikes (the number the run summary shows).
        loss_spikes: Loss spikes (the first ones).
        loss_spike_count: All loss spikes.
        nonfinite: Origins of the first non-finite steps.
        nonfinite_count: All non-finite steps.
        spike_params: How often each parameter drove a spike.
        signal_modules: Forensics: hooked module names (empty when forensics is off).
        signal_types: Their class names.
        signal_order: Hooked modules in backward order (nearest the loss first).
        signal_log: Mean log10 max-abs gradient of each module's output.
        activation_log: Mean log10 max-abs output of each module (then the input, last).
        calm_steps: Healthy steps (finite, not a spike): those ``norm_quantiles`` are taken over.
        calm_log_norms: Their global norms as a histogram: log10 centre of each non-empty bin
            (bins 0.01 wide).
        calm_counts: Healthy steps in each of those bins.
        clipped_steps: Steps whose gradients were scaled down (by the clipper or
            ``on_spike="clip"``).
        spikes_clipped: Of the gradient-norm spikes, those that were scaled down.
        dtypes: Dtype of each parameter (``"float16"``).
        model_modules: ``(name, class name)`` of every module of the model, in
            ``named_modules()`` order (empty when the watcher was given bare parameters).
        first_step: The first step that had gradients (None before any).
        last_step: The latest step seen (None before any).
        first_norms: Every parameter's gradient norm at that step (NaN where missing).
        first_weights: Every parameter's norm at that step (NaN when not sampled).
        first_signal: Forensics: each hooked module's max-abs output gradient at that step.
        early: The first steps of the run (see :class:`~gradwatch.detect.trajectory.Trajectory`).
        run_ups: The steps up to the first ``"spike"``, ``"nonfinite"`` gradient and
            ``"loss_nonfinite"``, by kind.
        overview: The whole run in blocks of consecutive steps.
        loss_nonfinite: Origins of the first steps whose loss was non-finite while every
            gradient was finite (or absent).
        loss_nonfinite_count: All such steps.
        scaler_skips: Steps a ``GradScaler`` skipped.
        scaler_late_skips: Of those, the ones after its first step taken (not its calibration).
        scaler_loss_skips: Of those, the ones whose loss was already NaN/Inf before scaling.
        min_scale: Smallest loss scale seen (inf without a scaler).
    """

    names: tuple[str, ...]
    modules: tuple[str, ...]
    types: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    backward_order: tuple[int, ...]
    steps: int
    finite_steps: int
    grad_log: np.ndarray
    ratio_log: np.ndarray
    update_log: np.ndarray
    update_log_max: np.ndarray
    update_max_step: np.ndarray
    update_rule: str | None
    dead_streak: np.ndarray
    dead_missing: np.ndarray
    dead_since: np.ndarray
    ever_alive: np.ndarray
    dead_after: int
    norm_quantiles: dict[float, float]
    norm_max: float
    spikes: tuple[SpikeRecord, ...]
    spike_count: int
    loss_spikes: tuple[SpikeRecord, ...]
    loss_spike_count: int
    nonfinite: tuple[NonFiniteOrigin, ...]
    nonfinite_count: int
    spike_params: dict[str, int] = field(default_factory=dict)
    signal_modules: tuple[str, ...] = ()
    signal_types: tuple[str, ...] = ()
    signal_order: tuple[int, ...] = ()
    signal_log: np.ndarray = field(default_factory=lambda: np.zeros(0))
    activation_log: np.ndarray = field(default_factory=lambda: np.zeros(0))
    calm_steps: int = 0
    calm_log_norms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    calm_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    clipped_steps: int = 0
    spikes_clipped: int = 0
    dtypes: tuple[str, ...] = ()
    model_modules: tuple[tuple[str, str], ...] = ()
    first_step: int | None = None
    last_step: int | None = None
    first_norms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    first_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    first_signal: np.ndarray = field(default_factory=lambda: np.zeros(0))
    early: Series = field(default_factory=lambda: Series.of(()))
    run_ups: dict[str, Series] = field(default_factory=dict)
    overview: Series = field(default_factory=lambda: Series.of(()))
    loss_nonfinite: tuple[NonFiniteOrigin, ...] = ()
    loss_nonfinite_count: int = 0
    scaler_skips: int = 0
    scaler_late_skips: int = 0
    scaler_loss_skips: int = 0
    min_scale: float = math.inf


def _pair(value: Any) -> tuple[int, float] | None:
    return None if value is None else (int(value[0]), float(value[1]))


def _maybe(value: Any) -> float | None:
    return None if value is None else float(value)


def spike_from_state(values: Sequence[Any]) -> SpikeRecord:
    """A :class:`SpikeRecord` from its ``state_dict`` form (a list; older states lack context)."""
    rise, lr_change, carried = [*values[4:7], None, None, None][:3]
    return SpikeRecord(
        int(values[0]),
        float(values[1]),
        float(values[2]),
        tuple(values[3]),
        _maybe(rise),
        _maybe(lr_change),
        _maybe(carried),
    )


def origin_to_state(origin: NonFiniteOrigin) -> dict[str, Any]:
    """A :class:`NonFiniteOrigin` as plain values (tuples become lists)."""
    return {
        name: (list(value) if isinstance(value, tuple) else value)
        for name, value in origin.__dict__.items()
    }


def origin_from_state(state: dict[str, Any]) -> NonFiniteOrigin:
    """The inverse of :func:`origin_to_state`."""
    values = dict(state)
    values["shape"] = tuple(values["shape"])
    for name in ("after_spike", "after_loss_spike"):
        values[name] = _pair(values[name])
    for name in ("rise", "lr_change"):
        values[name] = _maybe(values.get(name))
    return NonFiniteOrigin(**values)
