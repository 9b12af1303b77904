"""The run's incidents: gradient-norm spikes, loss spikes, where NaN/Inf started, and their context.

:class:`IncidentLog` is fed every emitted step, in order, with host values only (no batching, so
nothing depends on when a batch was absorbed). For each incident it keeps what the diagnosis needs
to tell a bad batch from a learning rate that is too high: the ratio to the recent healthy level,
how much the healthy gradient norm rose over the steps before (``rise``), and how much the
learning rate changed over them (``lr_change``). It also counts the steps the clipper (or
``on_spike="clip"``) scaled down, so the diagnosis knows the run was already clipped.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.detect.health_report import (
    INPUT,
    NonFiniteOrigin,
    SpikeRecord,
    origin_from_state,
    origin_to_state,
    spike_from_state,
)
from gradwatch.detect.trajectory import Trajectory
from gradwatch.records import StepReport

if TYPE_CHECKING:
    from gradwatch.collect.forensics import StepProbe

__all__ = ["GAP", "KEEP", "WINDOW", "IncidentLog"]

GAP = 2
"""Spikes at most this many steps apart belong to one episode."""
RECENT = 64
"""Recent healthy values kept to express a spike as a ratio to the run's level."""
KEEP = 200
"""Spikes and NaN origins remembered (the first ones)."""
WINDOW = 20
"""A spike this many steps or fewer before a NaN is its precursor; also the span of ``rise`` and
``lr_change``."""
_MIN_TREND = 10
"""Fewest healthy steps to fit the trend behind ``rise``."""
_STEADY = 0.5
"""Share of the variance of log(norm) a line must explain to count as a steady trend."""


class IncidentLog:
    """Spikes, loss spikes and NaN/Inf origins of a run, each with its context.

    Args:
        names: Watched parameter names.
        modules: Owning module of each.
        types: Owning module's class name of each.
        shapes: Shape of each.
        probe: The watcher's step probe (forensics: which module went non-finite first).
    """

    def __init__(
        self,
        names: Sequence[str],
        modules: Sequence[str],
        types: Sequence[str],
        shapes: Sequence[tuple[int, ...]],
        probe: StepProbe,
    ) -> None:
        self.names, self.modules, self.types, self.shapes = names, modules, types, shapes
        self._probe = probe
        self.trajectory = Trajectory()
        acts = probe.activations
        self.signal_modules = acts.names if acts is not None else ()
        self.signal_types = acts.types if acts is not None else ()
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.spikes: list[SpikeRecord] = []
        self.loss_spikes: list[SpikeRecord] = []
        self.spike_count = self.loss_spike_count = 0
        self.last_spike_ratio = math.nan  # the latest spike's norm over the recent healthy median
        self.origins: list[NonFiniteOrigin] = []
        self.nonfinite_count = 0
        self.loss_origins: list[NonFiniteOrigin] = []
        self.loss_nonfinite_count = 0
        self.scaler_skips = 0
        self.scaler_late_skips = 0  # after the scaler's first step taken: not its calibration
        self.scaler_loss_skips = 0  # whose loss was already NaN/Inf: no scale causes that
        self._scaler_settled = False
        self.min_scale = math.inf
        self.trajectory.reset()
        self.spike_params: Counter[str] = Counter()
        self.clipped_steps = self.spikes_clipped = 0
        self._recent_norms: deque[float] = deque(maxlen=RECENT)
        self._recent_losses: deque[float] = deque(maxlen=RECENT)
        self._lrs: deque[tuple[int, float]] = deque(maxlen=WINDOW + 1)
        # (first step, its ratio, latest step) of the current episode of spikes
        self._last_spike: tuple[int, float, int] | None = None
        self._previous: float | None = None  # the previous step's norm, when it was healthy
        self._last_loss_spike: tuple[int, float, int] | None = None

    def update(self, report: StepReport, probe: Any, has_grads: bool) -> NonFiniteOrigin | None:
        """Feed one emitted step. Returns where its NaN/Inf came from, if it had any.

        Args:
            report: The step's filled report.
            probe: The step's :class:`~gradwatch.collect.forensics.Probe`, or None.
            has_grads: Some watched parameter had a gradient at this step.
        """
        step, global_norm, loss = report.step, report.global_norm, report.loss
        finite = not report.nonfinite and math.isfinite(global_norm)
        lrs = getattr(probe, "lrs", None)
        self.trajectory.update(step, global_norm, loss, float(max(lrs)) if lrs else None)
        if report.scale is not None:
            self.min_scale = min(self.min_scale, report.scale)
            skipped = (report.skip_reason or "").startswith("GradScaler")
            self.scaler_skips += skipped
            self.scaler_late_skips += skipped and self._scaler_settled
            self.scaler_loss_skips += skipped and loss is not None and not math.isfinite(loss)
            self._scaler_settled = self._scaler_settled or not skipped
        loss_bad = loss is not None and not math.isfinite(loss)
        if report.spike:
            self.trajectory.freeze("spike")
        if report.nonfinite or not math.isfinite(global_norm):
            self.trajectory.freeze("nonfinite")
        if loss_bad:
            self.trajectory.freeze("loss_nonfinite")
        rise = lr_change = None
        if report.spike or report.loss_spike or report.nonfinite or loss_bad:  # incidents only
            rise, lr_change = self._rise(), self._lr_change(step)
        if report.clipped:
            self.clipped_steps += 1
        if report.spike:
            level = _median(self._recent_norms)
            ratio = global_norm / level
            self.last_spike_ratio = ratio
            self._last_spike = _episode(self._last_spike, step, ratio)
            self.spike_count += 1
            self.spikes_clipped += report.clipped
            self.spike_params.update(report.spike_params)
            if len(self.spikes) < KEEP:
                carried = _carried(global_norm, level, self._previous)
                record = SpikeRecord(
                    step, global_norm, ratio, report.spike_params, rise, lr_change, carried
                )
                self.spikes.append(record)
        elif finite and has_grads:
            self._recent_norms.append(global_norm)
        self._previous = global_norm if finite and has_grads and not report.spike else None
        if report.loss_spike and loss is not None:
            ratio = loss / _median(self._recent_losses)
            self._last_loss_spike = _episode(self._last_loss_spike, step, ratio)
            self.loss_spike_count += 1
            if len(self.loss_spikes) < KEEP:
                self.loss_spikes.append(SpikeRecord(step, loss, ratio, (), rise, lr_change))
        elif loss is not None and math.isfinite(loss):
            self._recent_losses.append(loss)
        if lrs:
            self._lrs.append((step, float(max(lrs))))
        if not report.nonfinite:
            return self._loss_origin(report, probe, rise, lr_change) if loss_bad else None
        return self._origin(report, probe, rise, lr_change)

    def _loss_origin(
        self, report: StepReport, probe: Any, rise: float | None, lr_change: float | None
    ) -> NonFiniteOrigin:
        """A non-finite loss whose gradients were finite (or absent): an incident of its own."""
        self.loss_nonfinite_count += 1
        loss = math.nan if report.loss is None else report.loss
        origin = NonFiniteOrigin(
            step=report.step,
            param=None,
            value="NaN" if math.isnan(loss) else "Inf",
            module="",
            module_type="",
            shape=(),
            count=0,
            loss=loss,
            stage="forward",
            **self._context(report.step, probe, rise, lr_change),
        )
        if len(self.loss_origins) < KEEP:
            self.loss_origins.append(origin)
        return origin

    def _context(
        self, step: int, probe: Any, rise: float | None, lr_change: float | None
    ) -> dict[str, Any]:
        """What every origin records besides its own values: forensics' first modules, recent
        spikes, the trend before it."""
        first_act, first_sig, watched = self._first_modules(probe)
        value = None
        if first_act is not None and self._probe.activations is not None:
            found = self._probe.activations.first_forward_value(probe)
            value = None if found is None else ("NaN" if math.isnan(found) else "Inf")
        return {
            "first_activation": self._module_name(first_act),
            "first_activation_type": self._module_type(first_act),
            "first_activation_value": value,
            "first_signal": self._module_name(first_sig),
            "first_signal_type": self._module_type(first_sig),
            "after_spike": _recent(self._last_spike, step),
            "after_loss_spike": _recent(self._last_loss_spike, step),
            "forensics": watched,
            "rise": rise,
            "lr_change": lr_change,
        }

    def _first_modules(self, probe: Any) -> tuple[int | None, int | None, bool]:
        acts = self._probe.activations
        if acts is not None and probe is not None and probe.forward_calls:
            first_act, first_sig = acts.first_nonfinite(probe)
            return first_act, first_sig, True
        return None, None, False

    def _rise(self) -> float | None:
        """Steady growth of the healthy norm over the last ``WINDOW`` healthy steps.

        A least-squares line through log10(norm): the growth factor it spans, when it explains
        at least half the variance (R² >= 0.5, a trend rather than noise), else 1.
        """
        recent = np.log10(np.asarray(list(self._recent_norms)[-WINDOW:]))
        if len(recent) < _MIN_TREND or not np.isfinite(recent).all():
            return None
        x = np.arange(len(recent), dtype=np.float64)
        slope, intercept = np.polyfit(x, recent, 1)
        residual = float(np.sum((recent - (slope * x + intercept)) ** 2))
        total = float(np.sum((recent - recent.mean()) ** 2))
        if total == 0 or 1.0 - residual / total < _STEADY:
            return 1.0
        return float(10 ** (slope * (len(recent) - 1)))

    def _lr_change(self, step: int) -> float | None:
        """Learning rate of the latest step seen over the earliest within ``WINDOW`` steps."""
        lrs = [lr for s, lr in self._lrs if step - s <= WINDOW]
        if not lrs or lrs[0] <= 0:
            return None
        return lrs[-1] / lrs[0]

    def _origin(
        self, report: StepReport, probe: Any, rise: float | None, lr_change: float | None
    ) -> NonFiniteOrigin:
        first = report.nonfinite[0]
        i = self.names.index(first)
        value = report.param_norms.get(first, math.nan)
        loss = report.loss
        context = self._context(report.step, probe, rise, lr_change)
        if loss is not None and not math.isfinite(loss):
            stage = "forward"
        elif loss is not None:
            stage = "backward"
        elif context["forensics"]:
            stage = "forward" if context["first_activation"] is not None else "backward"
        else:
            stage = "unknown"
        origin = NonFiniteOrigin(
            step=report.step,
            param=first,
            value="NaN" if math.isnan(value) else "Inf",
            module=self.modules[i],
            module_type=self.types[i],
            shape=self.shapes[i],
            count=len(report.nonfinite),
            loss=loss,
            stage=stage,
            **context,
        )
        self.nonfinite_count += 1
        if len(self.origins) < KEEP:
            self.origins.append(origin)
        return origin

    def _module_name(self, j: int | None) -> str | None:
        if j is None:
            return None
        return INPUT if j >= len(self.signal_modules) else self.signal_modules[j]

    def _module_type(self, j: int | None) -> str | None:
        if j is None or j >= len(self.signal_types):
            return None
        return self.signal_types[j]

    # ---------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Plain values to continue exactly where the run stopped."""
        return {
            "spikes": [list(s) for s in self.spikes],
            "loss_spikes": [list(s) for s in self.loss_spikes],
            "spike_count": self.spike_count,
            "loss_spike_count": self.loss_spike_count,
            "origins": [origin_to_state(o) for o in self.origins],
            "nonfinite_count": self.nonfinite_count,
            "spike_params": dict(self.spike_params),
            "clipped_steps": self.clipped_steps,
            "spikes_clipped": self.spikes_clipped,
            "recent_norms": list(self._recent_norms),
            "recent_losses": list(self._recent_losses),
            "recent_lrs": [list(pair) for pair in self._lrs],
            "last_spike": self._last_spike,
            "last_loss_spike": self._last_loss_spike,
            "loss_origins": [origin_to_state(o) for o in self.loss_origins],
            "loss_nonfinite_count": self.loss_nonfinite_count,
            "scaler_skips": self.scaler_skips,
            "scaler_late_skips": self.scaler_late_skips,
            "scaler_loss_skips": self.scaler_loss_skips,
            "scaler_settled": self._scaler_settled,
            "min_scale": self.min_scale,
            **self.trajectory.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (keys added later default to empty)."""
        self.reset()
        self.spikes = [spike_from_state(s) for s in state["spikes"]]
        self.loss_spikes = [spike_from_state(s) for s in state["loss_spikes"]]
        self.spike_count = int(state["spike_count"])
        self.loss_spike_count = int(state["loss_spike_count"])
        self.origins = [origin_from_state(o) for o in state["origins"]]
        self.nonfinite_count = int(state["nonfinite_count"])
        self.spike_params = Counter(state["spike_params"])
        self.clipped_steps = int(state.get("clipped_steps", 0))
        self.spikes_clipped = int(state.get("spikes_clipped", 0))
        self._recent_norms.extend(float(v) for v in state["recent_norms"])
        self._recent_losses.extend(float(v) for v in state["recent_losses"])
        self._lrs.extend((int(s), float(lr)) for s, lr in state.get("recent_lrs", ()))
        self._last_spike = _triple(state["last_spike"])
        self._last_loss_spike = _triple(state["last_loss_spike"])
        self.loss_origins = [origin_from_state(o) for o in state.get("loss_origins", ())]
        self.loss_nonfinite_count = int(state.get("loss_nonfinite_count", 0))
        self.scaler_skips = int(state.get("scaler_skips", 0))
        self.scaler_late_skips = int(state.get("scaler_late_skips", 0))
        self.scaler_loss_skips = int(state.get("scaler_loss_skips", 0))
        self._scaler_settled = bool(state.get("scaler_settled", False))
        self.min_scale = float(state.get("min_scale", math.inf))
        self.trajectory.load_state_dict(state)


def _carried(value: float, level: float, previous: float | None) -> float | None:
    """The share of the rise from ``level`` to ``value`` made by the last step (log scale)."""
    if previous is None or not (previous > 0 and level > 0 and value > level):
        return None
    return float(np.clip(math.log(value / previous) / math.log(value / level), 0.0, 1.0))


def _median(values: Sequence[float]) -> float:
    """Median of recent calm values (NaN when none: the ratio is then unknown)."""
    if not values:
        return math.nan
    level = float(np.median(np.asarray(values)))
    return level if level > 0 else math.nan


def _episode(
    current: tuple[int, float, int] | None, step: int, ratio: float
) -> tuple[int, float, int]:
    """A spike continues the current episode if it comes within ``GAP`` steps of its last (the
    grouping of :mod:`gradwatch.diagnosis.episodes`), else it starts a new one."""
    if current is not None and step - current[2] <= GAP:
        return current[0], current[1], step
    return step, ratio, step


def _recent(episode: tuple[int, float, int] | None, step: int) -> tuple[int, float] | None:
    """The start of a spike episode that was still going within ``WINDOW`` steps of ``step``."""
    if episode is None or step - episode[2] > WINDOW:
        return None
    return episode[0], episode[1]


def _triple(value: Any) -> tuple[int, float, int] | None:
    return None if value is None else (int(value[0]), float(value[1]), int(value[2]))
