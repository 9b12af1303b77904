"""Spike detection against the run's own history, on the logarithm of the value.

Gradient norms (and losses) are positive, heavy-tailed and skewed: roughly log-normal, noisier
still with small batches. A z-score on the raw value fires on about one healthy step in a hundred,
so the detector works on ``log(value)``, where a spike is a *multiple* of the run's level whatever
its scale, and asks for a real outlier:

* after ``warmup`` values, a step is a spike when it exceeds the level (an exponential moving mean
  of ``log(value)``) by more than ``z_threshold`` moving standard deviations **and** by more than
  ``min_ratio`` times: a healthy step rarely exceeds 2-3x the recent level, a bad batch is 5-10x
  or more;
* during the warm-up the spread is not known yet, so a step is a spike when it exceeds
  ``warmup_ratio`` times the level (or the run's early level, of its first 5 values, if lower)
  and two typical step-to-step changes (noise that swings x5 between batches needs a higher bar
  than x10). A divergence that starts at step 0 is flagged a step or two after it reached x10 the
  early level, while a model leaving its initialisation (x2-5) is not.

What enters the statistics is bounded, as ZClip clips before updating: a value enters the level
at most at the post-warm-up bar, and a spike enters the spread as a one-spread deviation (so one
explosion, a bad batch during the warm-up or a bad batch every few steps does not raise the bar
for the next one, while a lasting shift still moves the level); after the warm-up a value enters
at least ``2`` spreads below the level (so a run of tiny values does not drag the level down and
inflate the spread). Non-finite values, zeros and negative values never enter them. Each update
is a handful of float operations on the host, with no buffer.

References:
    Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", 2025.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch.errors import ConfigError, ConfigTypeError
from gradwatch.validation import check_int, check_positive, check_probability

__all__ = ["ParamBaseline", "SpikeDetector"]

_FLOOR = 2.0  # after the warm-up, a value enters at least this many spreads below the level
_WARMUP_Z = 2.0  # during the warm-up, a spike exceeds the level by this many typical step changes
_EARLY = 5  # the run's early level is the level of its first values


def _check_ratio(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number >= 1, else raise."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and value >= 1:  # type: ignore[arg-type]
        return float(value)  # type: ignore[arg-type]
    error = ConfigError if number else ConfigTypeError
    raise error(f"{name} must be a finite number >= 1, got {value!r}")


class SpikeDetector:
    """Flags values that are outliers against the run's own level, on a logarithmic scale.

    The detector runs on the host over floats that the watcher has already brought back, so it
    adds no device work to a step; an update costs about a microsecond and keeps no buffer.

    Args:
        alpha: EMA smoothing factor in (0, 1) of the level and spread of ``log(value)``; higher
            remembers longer. The first ``1 / (1 - alpha)`` values are averaged equally, so the
            level starts unbiased.
        z_threshold: After the warm-up, a spike exceeds the level by more than this many
            standard deviations of ``log(value)``.
        warmup: Number of finite values before the spread is trusted; until then a spike must
            exceed ``warmup_ratio`` times the level.
        min_ratio: After the warm-up, a spike must also exceed ``min_ratio`` times the level
            (>= 1). Guards against flagging noise in a run whose values barely vary.
        warmup_ratio: During the warm-up, a spike must exceed ``warmup_ratio`` times the level,
            or the early level if lower (>= 1), and two typical step-to-step changes: a value far
            above the run's early values is flagged before the spread is known, the transients of
            a model leaving its initialisation are not.

    Raises:
        ValueError: An argument is out of range.
        TypeError: An argument is not a number.

    Attributes:
        count: Finite, positive values seen.
        mean: The level: exponential moving mean of ``log(value)``.
        var: Exponential moving variance of ``log(value)``.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 4.0,
        warmup: int = 25,
        min_ratio: float = 3.0,
        *,
        warmup_ratio: float = 10.0,
    ) -> None:
        self.alpha = check_probability("alpha", alpha)
        self.z_threshold = check_positive("z_threshold", z_threshold)
        self.warmup = check_int("warmup", warmup, minimum=1)
        self.min_ratio = _check_ratio("min_ratio", min_ratio)
        self.warmup_ratio = _check_ratio("warmup_ratio", warmup_ratio)
        self._log_min_ratio = math.log(self.min_ratio)
        self._log_warmup_ratio = math.log(self.warmup_ratio)
        self.reset()

    def reset(self) -> None:
        """Forget the history."""
        self.count = 0
        self.mean = 0.0
        self.var = 0.0
        self._last = 0.0  # the last log-value that entered, during the warm-up
        self._step_var = 0.0  # mean of squared step-to-step changes of log(value), warm-up
        self._early = 0.0  # the level of the first _EARLY values
        self._refresh()

    def _refresh(self) -> None:
        """Derive the bars for the next value from the statistics (once per update)."""
        spread = math.sqrt(self.var)
        self._cap = self.mean + max(self.z_threshold * spread, self._log_min_ratio)
        self._floor = self.mean - _FLOOR * spread
        if not self.count:
            self._threshold: float | None = None
            return
        if self.count >= self.warmup:
            bar = self._cap
        else:  # successive differences of i.i.d. noise have spread sqrt(2) sigma
            step_spread = math.sqrt(0.5 * self._step_var)
            level = self.mean if self.count <= _EARLY else min(self.mean, self._early)
            bar = level + max(_WARMUP_Z * step_spread, self._log_warmup_ratio)
        self._threshold = math.exp(bar) if bar < 709.0 else math.inf

    @property
    def threshold(self) -> float | None:
        """The value above which the next step is a spike, or None before the first value."""
        return self._threshold

    def update(self, value: float) -> bool:
        """Feed one step's value; return True if it is a spike.

        Non-finite values, zeros and negative values are ignored: never a spike here, never in
        the statistics (a logarithmic scale has no room for them).
        """
        if not (value > 0.0 and value < math.inf):  # also False for NaN
            return False
        threshold = self._threshold
        spike = threshold is not None and value > threshold
        x = math.log(value)
        count = self.count
        if count:
            if x > self._cap:  # one explosion does not raise the bar for the next
                x = self._cap
            if count >= self.warmup:
                if x < self._floor:
                    x = self._floor
            else:
                self._step_var += ((x - self._last) ** 2 - self._step_var) / count
        if count < self.warmup:
            self._last = x
        weight = max(1.0 - self.alpha, 1.0 / (count + 1))
        delta = x - self.mean
        self.mean += weight * delta
        if spike:  # a spike moves the level, but enters the spread as a one-spread step
            delta = min(delta, math.sqrt(self.var))
        self.var = (1.0 - weight) * (self.var + weight * delta * delta)
        self.count = count + 1
        if self.count == _EARLY:
            self._early = self.mean
        self._refresh()
        return spike

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where the run stopped."""
        return {
            "count": self.count,
            "mean": self.mean,
            "var": self.var,
            "last": self._last,
            "step_var": self._step_var,
            "early": self._early,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        A state saved by an earlier gradwatch, before the logarithmic detector (``mean``/``var``
        of the raw value and a ``warm`` list), is converted: its warm-up values are replayed, or
        its moments are carried to the log scale (as for a log-normal value).
        """
        if "warm" in state:
            self._load_raw_state(state)
            return
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self._last = float(state["last"])
        self._step_var = float(state["step_var"])
        self._early = float(state["early"])
        self._refresh()

    def _load_raw_state(self, state: dict[str, Any]) -> None:
        self.reset()
        warm = [float(v) for v in state["warm"]]
        count, mean, var = int(state["count"]), float(state["mean"]), float(state["var"])
        if warm or count == 0 or mean <= 0.0:
            for value in warm:
                self.update(value)
            return
        self.var = math.log1p(var / (mean * mean))
        self.mean = math.log(mean) - 0.5 * self.var
        self.count = max(count, self.warmup)
        self._refresh()


class ParamBaseline:
    """Each parameter's typical gradient norm (EMA), to name the parameters driving a spike.

    Args:
        n_params: Number of watched parameters.
        alpha: EMA smoothing factor.
    """

    def __init__(self, n_params: int, alpha: float = 0.97) -> None:
        self.alpha = alpha
        self.ema = np.full(n_params, np.nan)
        self._complete = False  # every parameter has an EMA

    def culprits(self, norms: np.ndarray, k: int = 3, stand_out: float = 1.5) -> np.ndarray:
        """Indices of up to ``k`` parameters whose norm grew most relative to their own EMA.

        Only parameters whose growth stands out (``stand_out`` times the median growth) are
        named: when every parameter grew alike (a chain of equal layers), picking among ties
        would point at arbitrary parameters, so none is named.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = norms / self.ema
        finite = np.isfinite(ratio)
        if not finite.any():
            return np.empty(0, dtype=np.intp)
        bar = max(1.0, stand_out * float(np.median(ratio[finite])))
        ratio = np.where(finite, ratio, -np.inf)
        k = min(k, len(ratio))
        top = np.argpartition(-ratio, k - 1)[:k]
        top = top[np.argsort(-ratio[top], kind="stable")]
        return top[ratio[top] > bar]

    def growth(self, norms: np.ndarray) -> float:
        """Median growth of the parameters' norms relative to their EMA (NaN if unknown)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = norms / self.ema
        finite = ratio[np.isfinite(ratio)]
        return float(np.median(finite)) if finite.size else float("nan")

    def update(self, norms: np.ndarray) -> None:
        """Fold one step's norms in; non-finite entries leave their parameter's EMA unchanged."""
        ema = self.ema
        if self._complete and math.isfinite(norms.sum()):  # the common step: two array ops
            ema *= self.alpha
            ema += (1.0 - self.alpha) * norms
            return
        finite = np.isfinite(norms)
        fresh = finite & np.isnan(self.ema)
        self.ema[fresh] = norms[fresh]
        blend = finite & ~fresh
        self.ema[blend] = self.alpha * self.ema[blend] + (1.0 - self.alpha) * norms[blend]
        self._complete = not np.isnan(self.ema).any()

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ema = np.asarray(state["ema"], dtype=np.float64)
        if ema.shape != self.ema.shape:
            raise ValueError(
                f"ParamBaseline state has {ema.size} parameters, this watcher has {self.ema.size}"
            )
        self.ema = ema
        self._complete = not np.isnan(ema).any()
