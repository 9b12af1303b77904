"""Gradient health over a run, for the diagnosis: per-layer statistics and incidents.

:class:`HealthDetector` is fed every emitted step and composes two parts, each readable alone:
:class:`~gradwatch.detect.layer_stats.LayerStats` (per-parameter statistics absorbed in batches
with numpy: growth through depth, gradient-to-weight and update-to-weight ratios, dead parameters,
the distribution of the healthy global norm) and :class:`~gradwatch.detect.incidents.IncidentLog`
(spikes, loss spikes, where NaN/Inf started, and what led up to each). :meth:`HealthDetector.report`
joins them into one :class:`HealthReport`, which :mod:`gradwatch.diagnose` reads to decide what is
wrong.

The order "through depth" is the backward arrival order recorded by the hooks (nearest the loss
first).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.detect.health_report import INPUT, HealthReport, NonFiniteOrigin, SpikeRecord
from gradwatch.detect.incidents import IncidentLog
from gradwatch.detect.layer_stats import LayerStats, Row, mean
from gradwatch.layers import layer_of
from gradwatch.records import StepReport
from gradwatch.validation import check_int

if TYPE_CHECKING:
    from gradwatch.collect.forensics import StepProbe
    from gradwatch.collect.params import WatchedParams

__all__ = ["INPUT", "HealthDetector", "HealthReport", "NonFiniteOrigin", "SpikeRecord"]


class HealthDetector:
    """Accumulates per-layer gradient health over a run, for :func:`gradwatch.diagnose`.

    Args:
        dead_after: A parameter whose gradient is zero or missing for this many finite steps in a
            row is dead.

    Raises:
        ValueError: ``dead_after`` is not an int >= 1.
    """

    def __init__(self, dead_after: int = 20) -> None:
        self.dead_after = check_int("dead_after", dead_after)
        self._bound = False

    def bind(
        self,
        watched: WatchedParams,
        probe: StepProbe,
        arrival_positions: Callable[[tuple[Any, ...]], list[int]],
    ) -> None:
        """Attach to a watcher's parameters (called by :class:`~gradwatch.GradWatch`)."""
        self.names = watched.names
        self.modules = tuple(layer_of(n) for n in self.names)
        self.types = watched.owner_types
        self.shapes = tuple(tuple(p.shape) for p in watched.params)
        self.dtypes = tuple(str(p.dtype).replace("torch.", "") for p in watched.params)
        self.model_modules = watched.modules
        self._probe = probe
        acts = probe.activations
        self.signal_modules = acts.names if acts is not None else ()
        self.signal_types = acts.types if acts is not None else ()
        self.stats = LayerStats(watched, probe, arrival_positions)
        self.incidents = IncidentLog(self.names, self.modules, self.types, self.shapes, probe)
        self._bound = True

        self._forget_first()

    def _forget_first(self) -> None:
        n = len(self.names)
        self.first_step: int | None = None
        self.first_norms = np.full(n, np.nan)
        self.first_weights = np.full(n, np.nan)
        self.first_signal = np.full(len(self.signal_modules), np.nan)

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.stats.reset()
        self.incidents.reset()
        self._forget_first()

    def update(
        self,
        report: StepReport,
        norms: np.ndarray,
        positions: list[int] | None,
        arrivals: tuple[Any, ...],
        probe: Any,
    ) -> NonFiniteOrigin | None:
        """Feed one emitted step. Returns where its NaN/Inf came from, if it had any.

        Args:
            report: The step's filled report.
            norms: Gradient norm of every watched parameter (0 where missing).
            positions: Positions that had a gradient (None: all).
            arrivals: The step's backward arrival snapshot (from the hooks).
            probe: The step's :class:`~gradwatch.collect.forensics.Probe`, or None.
        """
        global_norm = report.global_norm
        finite = not report.nonfinite and math.isfinite(global_norm)
        if self.first_step is None and positions != []:
            self._remember_first(report.step, norms, positions, probe)
        # The origin first: it reads the step's activations before a batch releases them.
        origin = self.incidents.update(report, probe, has_grads=positions != [])
        row = Row(report.step, norms, positions, global_norm, finite, report.spike, probe, arrivals)
        self.stats.add(row)
        return origin

    def _remember_first(
        self, step: int, norms: np.ndarray, positions: list[int] | None, probe: Any
    ) -> None:
        """The first step with gradients, kept whole: the depth profile before any update."""
        self.first_step = step
        first = np.asarray(norms, dtype=np.float64).copy()
        if positions is not None:
            present = np.zeros(len(first), bool)
            present[positions] = True
            first[~present] = np.nan
        self.first_norms = first
        if probe is None:
            return
        weights = self._probe.weights(probe.weights)
        if weights is not None:
            self.first_weights = np.asarray(weights, dtype=np.float64).copy()
        acts = self._probe.activations
        if acts is not None and probe.activations >= 0:
            row = acts.read(probe.activations)
            if row is not None:
                self.first_signal = np.asarray(row.backward, dtype=np.float64).copy()

    # ---------------------------------------------------------------------------- reading

    def report(self) -> HealthReport:
        """Everything seen so far, as plain data (absorbs queued steps first)."""
        stats, incidents = self.stats, self.incidents
        stats.absorb()
        calm_log_norms, calm_counts = stats.histogram()
        order = list(dict.fromkeys(stats.order))
        rest = [i for i in reversed(range(len(self.names))) if i not in set(order)]
        return HealthReport(
            names=self.names,
            modules=self.modules,
            types=self.types,
            shapes=self.shapes,
            backward_order=tuple(order + rest),
            steps=stats.steps,
            finite_steps=stats.finite_steps,
            grad_log=mean(stats.g_sum, stats.g_cnt),
            ratio_log=mean(stats.r_sum, stats.r_cnt),
            update_log=mean(stats.u_sum, stats.u_cnt),
            update_log_max=np.where(np.isfinite(stats.u_max), stats.u_max, np.nan),
            update_max_step=stats.u_max_step.copy(),
            update_rule=self._probe.rule,
            dead_streak=stats.streak.copy(),
            dead_missing=stats.streak_missing.copy(),
            dead_since=stats.since.copy(),
            ever_alive=stats.ever_alive.copy(),
            dead_after=self.dead_after,
            norm_quantiles={q: stats.quantile(q) for q in (0.5, 0.9, 0.99)},
            norm_max=stats.norm_max if math.isfinite(stats.norm_max) else math.nan,
            spikes=tuple(incidents.spikes),
            spike_count=incidents.spike_count,
            loss_spikes=tuple(incidents.loss_spikes),
            loss_spike_count=incidents.loss_spike_count,
            nonfinite=tuple(incidents.origins),
            nonfinite_count=incidents.nonfinite_count,
            spike_params=dict(incidents.spike_params),
            signal_modules=self.signal_modules,
            signal_types=self.signal_types,
            signal_order=tuple(stats.signal_order),
            signal_log=mean(stats.s_sum, stats.s_cnt),
            activation_log=mean(stats.a_sum, stats.a_cnt),
            calm_steps=stats.calm_steps,
            calm_log_norms=calm_log_norms,
            calm_counts=calm_counts,
            clipped_steps=incidents.clipped_steps,
            spikes_clipped=incidents.spikes_clipped,
            dtypes=self.dtypes,
            model_modules=self.model_modules,
            first_step=self.first_step,
            last_step=int(incidents.trajectory.recent[-1][0])
            if incidents.trajectory.recent
            else None,
            first_norms=self.first_norms.copy(),
            first_weights=self.first_weights.copy(),
            first_signal=self.first_signal.copy(),
            early=incidents.trajectory.early_series(),
            run_ups={
                kind: series
                for kind in ("spike", "nonfinite", "loss_nonfinite")
                if (series := incidents.trajectory.run_up(kind)) is not None
            },
            overview=incidents.trajectory.overview(),
            loss_nonfinite=tuple(incidents.loss_origins),
            loss_nonfinite_count=incidents.loss_nonfinite_count,
            scaler_skips=incidents.scaler_skips,
            scaler_late_skips=incidents.scaler_late_skips,
            scaler_loss_skips=incidents.scaler_loss_skips,
            min_scale=incidents.min_scale,
        )

    # ---------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where the run stopped (absorbs first).

        One flat dict of plain values: the statistics' and the incidents' keys side by side.
        """
        state = {
            "names": list(self.names),
            "dead_after": self.dead_after,
            "first_step": self.first_step,
            "first_norms": self.first_norms.tolist(),
            "first_weights": self.first_weights.tolist(),
            "first_signal": self.first_signal.tolist(),
        }
        state.update(self.stats.state_dict())
        state.update(self.incidents.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (into a detector bound to the same names).

        Raises:
            ValueError: The state was taken over different parameters.
        """
        if list(state["names"]) != list(self.names):
            raise ValueError(
                f"HealthDetector state covers {len(state['names'])} parameters "
                f"({', '.join(state['names'][:3])}...), this watcher has {len(self.names)}"
            )
        self.dead_after = int(state["dead_after"])
        self._forget_first()
        if state.get("first_step") is not None:
            self.first_step = int(state["first_step"])
            self.first_norms = np.asarray(state["first_norms"], dtype=np.float64)
            self.first_weights = np.asarray(state["first_weights"], dtype=np.float64)
            self.first_signal = np.asarray(state["first_signal"], dtype=np.float64)
        self.stats.load_state_dict(state)
        self.incidents.load_state_dict(state)
