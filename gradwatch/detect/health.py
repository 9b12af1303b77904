"""Per-layer gradient health over a run: growth through depth, vanishing, dead parameters, updates.

:class:`HealthDetector` is fed every emitted step and keeps, per watched parameter, what the
diagnosis needs: the typical (geometric-mean) gradient norm, the typical ratio of the gradient norm
to the parameter's own norm, the typical and largest update-to-weight ratio when the optimizer's
learning rate is known, and the current run of steps with a zero or missing gradient. With
forensics on it also keeps each hooked module's typical largest activation and backpropagated
signal. It records where NaN/Inf started (:class:`NonFiniteOrigin`), the spikes, and the
distribution of the global norm (a log-spaced histogram, flat in memory).

Steps are queued and absorbed in batches with numpy: the per-step host cost is an append, and no
Python loop runs over parameters. Only finite steps enter the statistics.

The order "through depth" is the backward arrival order recorded by the hooks (nearest the loss
first); :mod:`gradwatch.diagnose` reads :meth:`HealthDetector.report` and decides what is wrong.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from gradwatch.config import check_int
from gradwatch.detect.health_report import (
    INPUT,
    HealthReport,
    NonFiniteOrigin,
    SpikeRecord,
    origin_from_state,
    origin_to_state,
    spike_from_state,
)
from gradwatch.records import StepReport
from gradwatch.report.base import layer_of

if TYPE_CHECKING:
    from gradwatch.collect.forensics import StepProbe
    from gradwatch.collect.params import WatchedParams

__all__ = ["INPUT", "HealthDetector", "HealthReport", "NonFiniteOrigin", "SpikeRecord"]

_LOG_MIN, _LOG_MAX, _BIN = -30.0, 30.0, 0.01
"""Histogram of log10(global norm): range and bin width (2.3% resolution)."""
_N_BINS = round((_LOG_MAX - _LOG_MIN) / _BIN)
_RECENT = 64
"""Recent calm values kept to express a spike as a ratio to the run's level."""
_KEEP = 200
"""Spikes and NaN origins remembered (the first ones)."""
_WINDOW = 20
"""A spike this many steps or fewer before a NaN is reported as its precursor."""


class _Row(NamedTuple):
    step: int
    norms: np.ndarray
    positions: list[int] | None
    global_norm: float
    finite: bool
    spike: bool
    probe: Any
    arrivals: tuple[Any, ...]


class HealthDetector:
    """Accumulates per-layer gradient health over a run, for :func:`gradwatch.diagnose`.

    Args:
        dead_after: A parameter whose gradient is zero or missing for this many finite steps in a
            row is dead.

    Raises:
        ValueError: ``dead_after`` is not an int >= 1.
    """

    BATCH = 32
    """Steps absorbed together."""

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
        self._numel = np.array([max(p.numel(), 1) for p in watched.params], dtype=np.float64)
        self._probe = probe
        self._arrival_positions = arrival_positions
        layers: dict[str, int] = {}
        layer_index = np.array([layers.setdefault(m, len(layers)) for m in self.modules])
        self._layer_index = layer_index
        self._perm = np.argsort(layer_index, kind="stable")
        self._starts = np.searchsorted(layer_index[self._perm], np.arange(len(layers)))
        acts = probe.activations
        self.signal_modules = acts.names if acts is not None else ()
        self.signal_types = acts.types if acts is not None else ()
        self._bound = True
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        n, k = len(self.names), len(self.signal_modules)
        self._rows: list[_Row] = []
        self.steps = self.finite_steps = 0
        self.order: list[int] = []
        self.g_sum, self.g_cnt = np.zeros(n), np.zeros(n, np.int64)
        self.r_sum, self.r_cnt = np.zeros(n), np.zeros(n, np.int64)
        self.u_sum, self.u_cnt = np.zeros(n), np.zeros(n, np.int64)
        self.u_max, self.u_max_step = np.full(n, -np.inf), np.full(n, -1, np.int64)
        self.streak = np.zeros(n, np.int64)
        self.streak_missing = np.zeros(n, np.int64)
        self.since = np.full(n, -1, np.int64)
        self.ever_alive = np.zeros(n, bool)
        self.hist = np.zeros(_N_BINS, np.int64)
        self.norm_max = -math.inf
        self.s_sum, self.s_cnt = np.zeros(k), np.zeros(k, np.int64)
        self.a_sum, self.a_cnt = np.zeros(k + 1), np.zeros(k + 1, np.int64)
        self.signal_order: list[int] = []
        self.spikes: list[SpikeRecord] = []
        self.loss_spikes: list[SpikeRecord] = []
        self.spike_count = self.loss_spike_count = 0
        self.origins: list[NonFiniteOrigin] = []
        self.nonfinite_count = 0
        self.spike_params: Counter[str] = Counter()
        self._recent_norms: deque[float] = deque(maxlen=_RECENT)
        self._recent_losses: deque[float] = deque(maxlen=_RECENT)
        # (first step, its ratio, latest step) of the current episode of spikes
        self._last_spike: tuple[int, float, int] | None = None
        self._last_loss_spike: tuple[int, float, int] | None = None

    # ---------------------------------------------------------------------------- feeding

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
        self._rows.append(
            _Row(report.step, norms, positions, global_norm, finite, report.spike, probe, arrivals)
        )
        if report.spike:
            ratio = global_norm / _median(self._recent_norms)
            self._last_spike = _episode(self._last_spike, report.step, ratio)
            self.spike_count += 1
            self.spike_params.update(report.spike_params)
            if len(self.spikes) < _KEEP:
                record = SpikeRecord(report.step, global_norm, ratio, report.spike_params)
                self.spikes.append(record)
        elif finite and positions != []:
            self._recent_norms.append(global_norm)
        loss = report.loss
        if report.loss_spike and loss is not None:
            ratio = loss / _median(self._recent_losses)
            self._last_loss_spike = _episode(self._last_loss_spike, report.step, ratio)
            self.loss_spike_count += 1
            if len(self.loss_spikes) < _KEEP:
                self.loss_spikes.append(SpikeRecord(report.step, loss, ratio, ()))
        elif loss is not None and math.isfinite(loss):
            self._recent_losses.append(loss)
        origin = self._origin(report, probe) if report.nonfinite else None
        if len(self._rows) >= self.BATCH:
            self._absorb()
        return origin

    def _origin(self, report: StepReport, probe: Any) -> NonFiniteOrigin:
        first = report.nonfinite[0]
        i = self.names.index(first)
        value = report.param_norms.get(first, math.nan)
        loss = report.loss
        first_act = first_sig = None
        watched = False
        acts = self._probe.activations
        if acts is not None and probe is not None and probe.forward_calls:
            first_act, first_sig = acts.first_nonfinite(probe)
            watched = True
        if loss is not None and not math.isfinite(loss):
            stage = "forward"
        elif loss is not None:
            stage = "backward"
        elif watched:
            stage = "forward" if first_act is not None else "backward"
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
            first_activation=self._module_name(first_act),
            first_activation_type=self._module_type(first_act),
            first_signal=self._module_name(first_sig),
            first_signal_type=self._module_type(first_sig),
            after_spike=_recent(self._last_spike, report.step),
            after_loss_spike=_recent(self._last_loss_spike, report.step),
            forensics=watched,
        )
        self.nonfinite_count += 1
        if len(self.origins) < _KEEP:
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

    # ---------------------------------------------------------------------------- batches

    def _absorb(self) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            return
        n = len(self.names)
        b = len(rows)
        steps = np.array([r.step for r in rows], dtype=np.int64)
        norms = np.stack([r.norms for r in rows]).astype(np.float64)
        present = np.ones((b, n), dtype=bool)
        valid = np.ones(b, dtype=bool)
        for i, r in enumerate(rows):
            if r.positions is not None:
                present[i] = False
                present[i, r.positions] = True
                valid[i] = bool(r.positions)
        finite = valid & np.array([r.finite for r in rows])
        self.steps += b
        self.finite_steps += int(finite.sum())
        self._absorb_order(rows)
        self._absorb_dead(steps[finite], norms[finite], present[finite])

        ok = present & finite[:, None] & (norms > 0) & np.isfinite(norms)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_g = np.log10(norms)
        _accumulate(self.g_sum, self.g_cnt, log_g, ok)
        weights = self._weights(rows)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_w = np.log10(weights)
            log_layer = 0.5 * np.log10(self._layer_squares(weights))[:, self._layer_index]
            log_ratio = log_g - log_w
        _accumulate(self.r_sum, self.r_cnt, log_ratio, ok & np.isfinite(log_w))
        self._absorb_updates(rows, steps, log_g, log_layer, ok)
        self._absorb_norms(rows, finite)
        if self.signal_modules:
            self._absorb_activations(rows, finite)

    def _absorb_order(self, rows: list[_Row]) -> None:
        longest = max(rows, key=lambda r: len(r.arrivals))
        if len(longest.arrivals) >= len(self.order) and longest.arrivals:
            self.order = self._arrival_positions(longest.arrivals)

    def _absorb_dead(self, steps: np.ndarray, norms: np.ndarray, present: np.ndarray) -> None:
        b = len(steps)
        if b == 0:
            return
        alive = present & (norms != 0)
        any_alive = alive.any(axis=0)
        last_alive = np.where(any_alive, b - 1 - np.argmax(alive[::-1], axis=0), -1)
        in_tail = np.arange(b)[:, None] > last_alive[None, :]
        tail_missing = (~present & in_tail).sum(axis=0)
        tail = b - 1 - last_alive
        start = steps[np.minimum(last_alive + 1, b - 1)]
        continuing = ~any_alive & (self.streak > 0)
        self.since = np.where(tail == 0, -1, np.where(continuing, self.since, start))
        self.streak = np.where(any_alive, tail, self.streak + b)
        self.streak_missing = np.where(any_alive, tail_missing, self.streak_missing + tail_missing)
        self.ever_alive |= any_alive

    def _weights(self, rows: list[_Row]) -> np.ndarray:
        out = np.full((len(rows), len(self.names)), np.nan)
        cache: dict[int, np.ndarray | None] = {}
        for i, r in enumerate(rows):
            if r.probe is None:
                continue
            number = r.probe.weights
            if number not in cache:
                cache[number] = self._probe.weights(number)
            sample = cache[number]
            if sample is not None:
                out[i] = sample
        return out

    def _layer_squares(self, weights: np.ndarray) -> np.ndarray:
        squares = np.square(weights[:, self._perm])
        return np.add.reduceat(squares, self._starts, axis=1)

    def _absorb_updates(
        self,
        rows: list[_Row],
        steps: np.ndarray,
        log_g: np.ndarray,
        log_layer: np.ndarray,
        ok: np.ndarray,
    ) -> None:
        rule = self._probe.rule
        if rule is None:
            return
        groups = self._probe.groups
        lr = np.full(log_g.shape, np.nan)
        for i, r in enumerate(rows):
            if r.probe is not None and r.probe.lrs is not None:
                lrs = np.append(np.asarray(r.probe.lrs, dtype=np.float64), np.nan)
                lr[i] = lrs[groups]  # group -1 (not in the optimizer) reads the trailing NaN
        with np.errstate(divide="ignore", invalid="ignore"):
            size = log_g if rule == "sgd" else 0.5 * np.log10(self._numel)[None, :]
            log_u = np.log10(lr) + size - log_layer
        use = ok & np.isfinite(log_u)
        _accumulate(self.u_sum, self.u_cnt, log_u, use)
        masked = np.where(use, log_u, -np.inf)
        best = masked.argmax(axis=0)
        top = masked[best, np.arange(masked.shape[1])]
        better = top > self.u_max
        self.u_max = np.where(better, top, self.u_max)
        self.u_max_step = np.where(better, steps[best], self.u_max_step)

    def _absorb_norms(self, rows: list[_Row], finite: np.ndarray) -> None:
        g = np.array([r.global_norm for r in rows], dtype=np.float64)
        calm = finite & ~np.array([r.spike for r in rows]) & (g > 0)
        if calm.any():
            bins = np.clip(((np.log10(g[calm]) - _LOG_MIN) / _BIN).astype(np.int64), 0, _N_BINS - 1)
            self.hist += np.bincount(bins, minlength=_N_BINS)
        if finite.any():
            self.norm_max = max(self.norm_max, float(g[finite].max()))

    def _absorb_activations(self, rows: list[_Row], finite: np.ndarray) -> None:
        acts = self._probe.activations
        if acts is None:
            return
        k = len(self.signal_modules)
        forward = np.full((len(rows), k + 1), np.nan)
        backward = np.full((len(rows), k), np.nan)
        last = -1
        for i, r in enumerate(rows):
            if r.probe is None or r.probe.activations < 0:
                continue
            number = r.probe.activations
            row = acts.read(number)
            last = max(last, number)
            if row is not None and finite[i]:
                forward[i], backward[i] = row.forward, row.backward
            if r.probe.backward_calls:
                self.signal_order = list(dict.fromkeys(r.probe.backward_calls))
        if last >= 0:
            acts.release(last)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_f, log_b = np.log10(forward), np.log10(backward)
        _accumulate(self.a_sum, self.a_cnt, log_f, np.isfinite(log_f))
        _accumulate(self.s_sum, self.s_cnt, log_b, np.isfinite(log_b))

    # ---------------------------------------------------------------------------- reading

    def report(self) -> HealthReport:
        """Everything seen so far, as plain data (absorbs queued steps first)."""
        self._absorb()
        order = list(dict.fromkeys(self.order))
        rest = [i for i in reversed(range(len(self.names))) if i not in set(order)]
        return HealthReport(
            names=self.names,
            modules=self.modules,
            types=self.types,
            shapes=self.shapes,
            backward_order=tuple(order + rest),
            steps=self.steps,
            finite_steps=self.finite_steps,
            grad_log=_mean(self.g_sum, self.g_cnt),
            ratio_log=_mean(self.r_sum, self.r_cnt),
            update_log=_mean(self.u_sum, self.u_cnt),
            update_log_max=np.where(np.isfinite(self.u_max), self.u_max, np.nan),
            update_max_step=self.u_max_step.copy(),
            update_rule=self._probe.rule,
            dead_streak=self.streak.copy(),
            dead_missing=self.streak_missing.copy(),
            dead_since=self.since.copy(),
            ever_alive=self.ever_alive.copy(),
            dead_after=self.dead_after,
            norm_quantiles={q: self._quantile(q) for q in (0.5, 0.9, 0.99)},
            norm_max=self.norm_max if math.isfinite(self.norm_max) else math.nan,
            spikes=tuple(self.spikes),
            spike_count=self.spike_count,
            loss_spikes=tuple(self.loss_spikes),
            loss_spike_count=self.loss_spike_count,
            nonfinite=tuple(self.origins),
            nonfinite_count=self.nonfinite_count,
            spike_params=dict(self.spike_params),
            signal_modules=self.signal_modules,
            signal_types=self.signal_types,
            signal_order=tuple(self.signal_order),
            signal_log=_mean(self.s_sum, self.s_cnt),
            activation_log=_mean(self.a_sum, self.a_cnt),
        )

    def _quantile(self, q: float) -> float:
        total = int(self.hist.sum())
        if total == 0:
            return math.nan
        index = int(np.searchsorted(np.cumsum(self.hist), q * total))
        return float(10.0 ** (_LOG_MIN + (index + 0.5) * _BIN))

    # ---------------------------------------------------------------------------- state

    _ARRAYS = (
        "g_sum",
        "g_cnt",
        "r_sum",
        "r_cnt",
        "u_sum",
        "u_cnt",
        "u_max",
        "u_max_step",
        "streak",
        "streak_missing",
        "since",
        "ever_alive",
        "s_sum",
        "s_cnt",
        "a_sum",
        "a_cnt",
    )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where the run stopped (absorbs first)."""
        self._absorb()
        weights = self._probe.latest_weights()
        state: dict[str, Any] = {name: getattr(self, name).tolist() for name in self._ARRAYS}
        (filled,) = np.nonzero(self.hist)
        state["hist"] = {str(int(i)): int(self.hist[i]) for i in filled}
        state.update(
            names=list(self.names),
            dead_after=self.dead_after,
            steps=self.steps,
            finite_steps=self.finite_steps,
            order=list(self.order),
            norm_max=self.norm_max,
            signal_order=list(self.signal_order),
            spikes=[list(s) for s in self.spikes],
            loss_spikes=[list(s) for s in self.loss_spikes],
            spike_count=self.spike_count,
            loss_spike_count=self.loss_spike_count,
            origins=[origin_to_state(o) for o in self.origins],
            nonfinite_count=self.nonfinite_count,
            spike_params=dict(self.spike_params),
            recent_norms=list(self._recent_norms),
            recent_losses=list(self._recent_losses),
            last_spike=self._last_spike,
            last_loss_spike=self._last_loss_spike,
            probe_captures=self._probe.captures,
            probe_weights=None if weights is None else weights.tolist(),
        )
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
        self.reset()
        for name in self._ARRAYS:
            current = getattr(self, name)
            setattr(self, name, np.asarray(state[name], dtype=current.dtype))
        for i, c in state["hist"].items():
            self.hist[int(i)] = int(c)
        self.dead_after = int(state["dead_after"])
        self.steps, self.finite_steps = int(state["steps"]), int(state["finite_steps"])
        self.order = [int(i) for i in state["order"]]
        self.norm_max = float(state["norm_max"])
        self.signal_order = [int(i) for i in state["signal_order"]]
        self.spikes = [spike_from_state(s) for s in state["spikes"]]
        self.loss_spikes = [spike_from_state(s) for s in state["loss_spikes"]]
        self.spike_count = int(state["spike_count"])
        self.loss_spike_count = int(state["loss_spike_count"])
        self.origins = [origin_from_state(o) for o in state["origins"]]
        self.nonfinite_count = int(state["nonfinite_count"])
        self.spike_params = Counter(state["spike_params"])
        self._recent_norms.extend(float(v) for v in state["recent_norms"])
        self._recent_losses.extend(float(v) for v in state["recent_losses"])
        self._last_spike = _triple(state["last_spike"])
        self._last_loss_spike = _triple(state["last_loss_spike"])
        self._probe.restore(int(state["probe_captures"]), state["probe_weights"])


def _accumulate(total: np.ndarray, count: np.ndarray, values: np.ndarray, use: np.ndarray) -> None:
    total += np.where(use, values, 0.0).sum(axis=0)
    count += use.sum(axis=0)


def _mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _median(values: Sequence[float]) -> float:
    """Median of recent calm values (NaN when none: the ratio is then unknown)."""
    if not values:
        return math.nan
    level = float(np.median(np.asarray(values)))
    return level if level > 0 else math.nan


def _episode(
    current: tuple[int, float, int] | None, step: int, ratio: float
) -> tuple[int, float, int]:
    """A spike continues the current episode if it comes within ``_WINDOW`` steps of its last."""
    if current is not None and step - current[2] <= _WINDOW:
        return current[0], current[1], step
    return step, ratio, step


def _recent(episode: tuple[int, float, int] | None, step: int) -> tuple[int, float] | None:
    """The start of a spike episode that was still going within ``_WINDOW`` steps of ``step``."""
    if episode is None or step - episode[2] > _WINDOW:
        return None
    return episode[0], episode[1]


def _triple(value: Any) -> tuple[int, float, int] | None:
    return None if value is None else (int(value[0]), float(value[1]), int(value[2]))
