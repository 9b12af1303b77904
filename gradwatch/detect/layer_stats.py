"""Per-parameter gradient statistics over a run, absorbed in batches with numpy.

:class:`LayerStats` queues every emitted step (an append on the host) and absorbs the queue in
batches, with no Python loop over parameters. It keeps, per watched parameter: the typical
(geometric-mean) gradient norm, the typical ratio of the gradient norm to the parameter's own
norm, the typical and largest update-to-weight ratio when the optimizer's learning rate is known,
and the current run of steps with a zero or missing gradient; with forensics on, each hooked
module's typical largest activation and backpropagated signal; and the distribution of the healthy
global norms (a log-spaced histogram, flat in memory). Only finite steps enter the statistics.

Sums are accumulated one step after the other, whatever the batch boundaries, so a run resumed
from :meth:`LayerStats.state_dict` (which absorbs the queue first) continues bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from gradwatch.layers import layer_of

if TYPE_CHECKING:
    from gradwatch.collect.forensics import StepProbe
    from gradwatch.collect.params import WatchedParams

__all__ = ["BIN", "LayerStats", "Row", "mean"]

_LOG_MIN, _LOG_MAX = -30.0, 30.0
"""Range of the histogram of log10(global norm)."""
BIN = 0.01
"""Its bin width, in log10 units (2.3% resolution)."""
_N_BINS = round((_LOG_MAX - _LOG_MIN) / BIN)

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
"""Per-parameter (and per-hooked-module) arrays, saved as lists."""


class Row(NamedTuple):
    """One emitted step, queued until the next batch is absorbed."""

    step: int
    norms: np.ndarray
    positions: list[int] | None
    global_norm: float
    finite: bool
    spike: bool
    probe: Any
    arrivals: tuple[Any, ...]


class LayerStats:
    """Per-parameter statistics of a run, absorbed in batches.

    Args:
        watched: The watcher's parameters.
        probe: The watcher's step probe (weight-norm samples, learning rates, activations).
        arrival_positions: Maps a backward arrival snapshot to parameter positions.
    """

    BATCH = 128
    """Steps absorbed together."""

    def __init__(
        self,
        watched: WatchedParams,
        probe: StepProbe,
        arrival_positions: Callable[[tuple[Any, ...]], list[int]],
    ) -> None:
        self.n = len(watched.names)
        self._numel = np.array([max(p.numel(), 1) for p in watched.params], dtype=np.float64)
        self._probe = probe
        self._arrival_positions = arrival_positions
        layers: dict[str, int] = {}
        modules = [layer_of(name) for name in watched.names]
        layer_index = np.array([layers.setdefault(m, len(layers)) for m in modules])
        self._layer_index = layer_index
        self._perm = np.argsort(layer_index, kind="stable")
        self._starts = np.searchsorted(layer_index[self._perm], np.arange(len(layers)))
        acts = probe.activations
        self.k = len(acts.names) if acts is not None else 0
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        n, k = self.n, self.k
        self._rows: list[Row] = []
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

    def add(self, row: Row) -> None:
        """Queue one step; absorb the queue when it holds :attr:`BATCH` steps."""
        self._rows.append(row)
        if len(self._rows) >= self.BATCH:
            self.absorb()

    # ---------------------------------------------------------------------------- batches

    def absorb(self) -> None:
        """Fold the queued steps into the statistics."""
        rows, self._rows = self._rows, []
        if not rows:
            return
        n = self.n
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
        if self.k:
            self._absorb_activations(rows, finite)

    def _absorb_order(self, rows: list[Row]) -> None:
        """The latest longest arrival order, as if rows came one at a time."""
        longest = max(len(r.arrivals) for r in rows)
        if longest == 0 or longest < len(self.order):
            return
        last = next(r for r in reversed(rows) if len(r.arrivals) == longest)
        self.order = self._arrival_positions(last.arrivals)

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

    def _weights(self, rows: list[Row]) -> np.ndarray:
        out = np.full((len(rows), self.n), np.nan)
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
        rows: list[Row],
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

    def _absorb_norms(self, rows: list[Row], finite: np.ndarray) -> None:
        g = np.array([r.global_norm for r in rows], dtype=np.float64)
        calm = finite & ~np.array([r.spike for r in rows]) & (g > 0)
        if calm.any():
            bins = np.clip(((np.log10(g[calm]) - _LOG_MIN) / BIN).astype(np.int64), 0, _N_BINS - 1)
            self.hist += np.bincount(bins, minlength=_N_BINS)
        if finite.any():
            self.norm_max = max(self.norm_max, float(g[finite].max()))

    def _absorb_activations(self, rows: list[Row], finite: np.ndarray) -> None:
        acts = self._probe.activations
        if acts is None:
            return
        k = self.k
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

    @property
    def calm_steps(self) -> int:
        """Healthy steps in the histogram (finite, not a spike)."""
        return int(self.hist.sum())

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """The healthy global norms: log10 centre of each non-empty bin, and its count."""
        (filled,) = np.nonzero(self.hist)
        return _LOG_MIN + (filled + 0.5) * BIN, self.hist[filled].copy()

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the healthy global norms (NaN before any)."""
        total = self.calm_steps
        if total == 0:
            return math.nan
        index = int(np.searchsorted(np.cumsum(self.hist), q * total))
        return float(10.0 ** (_LOG_MIN + (index + 0.5) * BIN))

    # ---------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Plain values to continue exactly where the run stopped (absorbs first)."""
        self.absorb()
        weights = self._probe.latest_weights()
        state: dict[str, Any] = {name: getattr(self, name).tolist() for name in _ARRAYS}
        (filled,) = np.nonzero(self.hist)
        state["hist"] = {str(int(i)): int(self.hist[i]) for i in filled}
        state.update(
            steps=self.steps,
            finite_steps=self.finite_steps,
            order=list(self.order),
            norm_max=self.norm_max,
            signal_order=list(self.signal_order),
            probe_captures=self._probe.captures,
            probe_weights=None if weights is None else weights.tolist(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.reset()
        for name in _ARRAYS:
            current = getattr(self, name)
            setattr(self, name, np.asarray(state[name], dtype=current.dtype))
        for i, c in state["hist"].items():
            self.hist[int(i)] = int(c)
        self.steps, self.finite_steps = int(state["steps"]), int(state["finite_steps"])
        self.order = [int(i) for i in state["order"]]
        self.norm_max = float(state["norm_max"])
        self.signal_order = [int(i) for i in state["signal_order"]]
        self._probe.restore(int(state["probe_captures"]), state["probe_weights"])


def _accumulate(total: np.ndarray, count: np.ndarray, values: np.ndarray, use: np.ndarray) -> None:
    """Add the used ``values`` of each row to ``total``, one row after the other.

    A cumulative sum adds in row order, so the result does not depend on how the steps were
    split into batches (a single ``sum`` would round differently for other batch boundaries).
    """
    masked = np.where(use, values, 0.0)
    total[...] = np.cumsum(np.concatenate((total[None], masked)), axis=0)[-1]
    count += use.sum(axis=0)


def mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``total / count`` where ``count > 0``, else NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
