"""Records: the plain data gradwatch produces, consumed by sinks, tests and users.

Records are frozen dataclasses with documented fields and no torch inside, so sinks, the CLI and the
diagnosis can read them without touching a device. A :class:`StepReport` is created on the hot path
before its numbers have left the device: its fields are filled in one batched copy the first time
any of them is read (or when the watcher emits it), so returning it costs no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import numpy as np

__all__ = [
    "CAUSES",
    "Cause",
    "Event",
    "EventKind",
    "Finding",
    "FindingKind",
    "LayerSummary",
    "ParamInfo",
    "ParamNorms",
    "Record",
    "RunStart",
    "RunSummary",
    "Severity",
    "StepReport",
]

EventKind = Literal[
    "nonfinite",
    "loss_nonfinite",
    "exploding",
    "vanishing",
    "spike",
    "loss_spike",
    "skip",
    "dead",
    "unused",
]
FindingKind = Literal[
    "exploding",
    "vanishing",
    "dead",
    "unused",
    "nonfinite",
    "spike",
    "loss_spike",
    "divergence",
    "loss_nonfinite",
    "bias_before_norm",
]
Cause = Literal[
    "learning_rate",
    "data",
    "initialization",
    "saturation",
    "recurrence",
    "forward_numerics",
    "precision",
    "dead_units",
    "unused",
    "redundant_bias",
    "unknown",
]
Severity = Literal["error", "warning", "info"]

CAUSES: tuple[str, ...] = get_args(Cause)
"""Every cause a :class:`Finding` (or an alert's :attr:`Event.cause`) can name.

* ``"learning_rate"``: the optimisation diverges: norms or loss grow over steps, no single bad
  batch.
* ``"data"``: one or a few bad batches: an outlier or corrupt record, NaN/Inf in the input.
* ``"initialization"``: weights too large or too small for the depth, visible from the first step.
* ``"saturation"``: saturating activations in depth make the gradient vanish.
* ``"recurrence"``: the gradient explodes or vanishes through time in a recurrent layer.
* ``"forward_numerics"``: log of 0, division by 0, sqrt of a negative, exp overflow, in a module
  or in the loss.
* ``"precision"``: values beyond the float16/bfloat16 range, loss-scale trouble.
* ``"dead_units"``: units that never activate, so nothing before them learns.
* ``"unused"``: parameters that never get a gradient.
* ``"redundant_bias"``: a bias right before a normalisation layer, which cancels it (benign).
* ``"unknown"``: the evidence does not single out a cause (said so rather than guessed).
"""


class ParamNorms(Mapping[str, float]):
    """Read-only mapping ``parameter name -> L2 norm of its gradient`` for one step.

    Only parameters that had a gradient at that step are present. ``names`` and ``values`` expose
    the same data as a tuple and a numpy array for vectorised consumers.
    """

    __slots__ = ("_index", "names", "values")

    def __init__(self, names: tuple[str, ...], values: np.ndarray) -> None:
        if len(names) != len(values):
            raise ValueError(f"{len(names)} names for {len(values)} values")
        self.names = names
        self.values = values
        self._index: dict[str, int] | None = None

    def __getitem__(self, name: str) -> float:
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.names)}
        return float(self.values[self._index[name]])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        shown = ", ".join(f"{n!r}: {v:.4g}" for n, v in zip(self.names[:4], self.values[:4]))
        more = ", ..." if len(self.names) > 4 else ""
        return f"ParamNorms({{{shown}{more}}})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ParamNorms):
            return self.names == other.names and bool(
                np.array_equal(self.values, other.values, equal_nan=True)
            )
        return Mapping.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (ParamNorms, (self.names, self.values))


_UNSET = object()


@dataclass(frozen=True, eq=True)
class StepReport:
    """What gradwatch saw and did at one optimizer step.

    Attributes:
        step: Index of the optimizer step (0-based, counts every check including skipped ones).
        global_norm: Norm of all gradients seen as one vector, of order ``norm_type``; equals
            ``torch.nn.utils.get_total_norm`` over the same gradients. Before any clipping.
        clipped_norm: The same norm after clipping (equal to ``global_norm`` without a clipper).
        clip_coef: Factor the gradients were scaled by (1.0 when nothing was clipped).
        param_norms: Parameter name -> L2 norm of its gradient, for parameters with a gradient.
        nonfinite: Names of parameters whose gradient holds NaN/Inf, first in backward order first.
        spike: The gradient-norm spike detector fired at this step.
        loss_spike: The loss spike detector fired (only when a loss was given).
        skipped: The optimizer step was skipped (by gradwatch's policy or by GradScaler).
        loss: The loss passed to the watcher for this step (mean over micro-batches), or None.
        skip_reason: Why the step was skipped, or None.
        spike_params: On a spike, the parameters whose norm grew most relative to their own history.
        spike_threshold: The detector's threshold at this step (None before its first value).
        scale: The GradScaler loss scale at this step, when a scaler is known.
        lr: Learning rate of the attached optimizer's first param group at this step (None
            without an attached optimizer, or when the learning rate is a tensor).
        norm_type: Order of the norm used for ``global_norm``.
        micro_batch_norms: Global L2 norm of each micro-batch's gradient contribution, when
            per-micro-batch tracking is enabled (``GradWatch(track_micro_batches=True)``).
        nonfinite_ranks: In a DDP run with ``rank_blame=True``, the ranks whose local gradients
            held NaN/Inf before the all-reduce.
    """

    step: int
    global_norm: float = field(default=_UNSET)  # type: ignore[assignment]
    clipped_norm: float = field(default=_UNSET)  # type: ignore[assignment]
    clip_coef: float = field(default=_UNSET)  # type: ignore[assignment]
    param_norms: ParamNorms = field(default=_UNSET, repr=False)  # type: ignore[assignment]
    nonfinite: tuple[str, ...] = field(default=_UNSET)  # type: ignore[assignment]
    spike: bool = field(default=_UNSET)  # type: ignore[assignment]
    loss_spike: bool = field(default=_UNSET)  # type: ignore[assignment]
    skipped: bool = field(default=_UNSET)  # type: ignore[assignment]
    loss: float | None = field(default=_UNSET)  # type: ignore[assignment]
    skip_reason: str | None = None
    spike_params: tuple[str, ...] = ()
    spike_threshold: float | None = None
    scale: float | None = None
    lr: float | None = None
    norm_type: float = 2.0
    micro_batch_norms: tuple[float, ...] = ()
    nonfinite_ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # A report built by hand with fields left out: those fields read as "never computed".
        state = self.__dict__
        for name in [n for n, v in state.items() if v is _UNSET]:
            del state[name]

    def __getattr__(self, name: str) -> Any:
        # Only reached for a field left out (the class holds no field defaults).
        raise AttributeError(f"StepReport.{name} was never computed")

    @property
    def clipped(self) -> bool:
        """True if the gradients were scaled down at this step."""
        return self.clip_coef < 1.0

    @property
    def is_finite(self) -> bool:
        """True if every gradient was finite."""
        return not self.nonfinite and math.isfinite(self.global_norm)

    def __getstate__(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)


_LAZY_FIELDS = frozenset(f.name for f in fields(StepReport) if f.name != "step")
for _name in _LAZY_FIELDS:  # field defaults live in __init__ only, so unset fields miss
    if _name in StepReport.__dict__:
        delattr(StepReport, _name)


@dataclass(frozen=True)
class Event:
    """Something a person should hear about now: a NaN, a spike, a skipped step.

    Attributes:
        step: The optimizer step it happened at.
        kind: ``"nonfinite"`` (a NaN/Inf gradient), ``"loss_nonfinite"`` (a NaN/Inf loss with
            finite gradients), ``"exploding"`` (the first step's gradient explodes through
            depth), ``"spike"``, ``"loss_spike"``, ``"skip"``, ``"dead"`` (units that never
            activate) or ``"unused"`` (parameters without a gradient).
        message: One line, ready to show a person.
        params: Parameters concerned (culprits first).
        data: Numbers behind the message (e.g. ``global_norm``, ``threshold``), plain floats/str.
        cause: The probable cause (one of :data:`CAUSES`) when the event opens an incident and
            the evidence so far points at one, else None.
    """

    step: int
    kind: EventKind
    message: str
    params: tuple[str, ...] = ()
    data: Mapping[str, float | str | None] = field(default_factory=dict)
    cause: str | None = None


@dataclass(frozen=True)
class ParamInfo:
    """A watched parameter: its name, shape and dtype (as strings, no torch types)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class RunStart:
    """First record of a run: what is watched and how it is configured.

    Attributes:
        gradwatch_version: Version of gradwatch that produced the run.
        torch_version: Version of torch it ran with.
        params: The watched parameters, in the order used by every step's norm vector.
        config: The watcher's configuration as plain JSON-able values.
        time: Wall-clock start, seconds since the epoch.
    """

    gradwatch_version: str
    torch_version: str
    params: tuple[ParamInfo, ...]
    config: Mapping[str, Any]
    time: float


@dataclass(frozen=True)
class LayerSummary:
    """Gradient-norm statistics of one layer (a group of parameters) over a run or window.

    The layer's norm at a step is the L2 norm of its parameters' gradients taken together.
    Statistics cover finite steps only.
    """

    name: str
    min: float
    mean: float
    max: float
    last: float
    steps: int
    nonfinite_steps: int
    spike_culprit: int


@dataclass(frozen=True)
class Finding:
    """A diagnosis: what is wrong, why, where it started, and what to change.

    Attributes:
        kind: The symptom: ``"exploding"``, ``"vanishing"``, ``"divergence"``, ``"nonfinite"``,
            ``"loss_nonfinite"``, ``"spike"``, ``"loss_spike"``, ``"dead"``, ``"unused"`` or
            ``"bias_before_norm"``.
        params: Where it started, most causal first: parameter or module names (parameter-free
            modules included), ``"loss"`` when every module's output was finite but the loss
            was not, ``"input"`` when the model's input already held NaN/Inf.
        evidence: What was observed, with numbers.
        remedies: Concrete changes to try, most effective first.
        suggested: Settings computed from the run, e.g. ``{"max_norm": 1.7, "lr": 3e-4}``.
        cause: The root cause, one of :data:`CAUSES`.
        severity: ``"error"`` (training is broken), ``"warning"`` (it will likely break or is
            wasting work) or ``"info"`` (benign, worth knowing).
        first_step: The step where it was first seen, or None.
        data: The numbers behind the finding (growth per step or per layer, ratios,
            thresholds), plain floats and strings, so callers assert on numbers, not on prose.
    """

    kind: FindingKind
    params: tuple[str, ...]
    evidence: str
    remedies: tuple[str, ...] = ()
    suggested: Mapping[str, float] = field(default_factory=dict)
    cause: Cause = "unknown"
    severity: Severity = "warning"
    first_step: int | None = None
    data: Mapping[str, float | str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSummary:
    """Last record of a run (or of a window): counts and per-layer statistics.

    Attributes:
        steps: Number of steps checked.
        first_step: First step covered (None if no step was checked).
        last_step: Last step covered.
        global_min: Smallest finite global norm.
        global_mean: Mean finite global norm.
        global_max: Largest finite global norm.
        global_last: Global norm of the last step.
        clipped_steps: Steps whose gradients were scaled down.
        spikes: Gradient-norm spikes flagged.
        loss_spikes: Loss spikes flagged.
        nonfinite_steps: Steps with a NaN/Inf gradient.
        skipped_steps: Steps whose optimizer step was skipped.
        layers: Per-layer statistics, in model order.
        nonfinite_origins: ``(step, first parameter in backward order)`` for the first NaN/Inf
            steps of the run (bounded).
        findings: Diagnosis of the run, when computed.
    """

    steps: int
    first_step: int | None
    last_step: int | None
    global_min: float
    global_mean: float
    global_max: float
    global_last: float
    clipped_steps: int
    spikes: int
    loss_spikes: int
    nonfinite_steps: int
    skipped_steps: int
    layers: tuple[LayerSummary, ...] = ()
    nonfinite_origins: tuple[tuple[int, str], ...] = ()
    findings: tuple[Finding, ...] = ()

    @property
    def clip_rate(self) -> float:
        """Fraction of steps whose gradients were clipped."""
        return self.clipped_steps / self.steps if self.steps else 0.0


Record = RunStart | StepReport | Event | RunSummary
"""Everything a sink can be given."""
