"""Spike detection against the run's own history: exponential moving mean and variance.

A step is a spike when its value is an outlier relative to what this run has seen: its z-score on
an exponential moving mean/variance exceeds ``z_threshold`` after a warm-up, in the spirit of ZClip
(alpha 0.97, z 2.5, warm-up 25 are known-good defaults). Spikes enter the statistics at the
threshold, not at their own value, so one explosion does not raise the bar for the next; non-finite
values never enter them at all.

References:
    Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", 2025.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch.config import check_int, check_positive, check_probability

__all__ = ["ParamBaseline", "SpikeDetector"]


class SpikeDetector:
    """Flags values that are outliers against an exponential moving mean and variance.

    The detector runs on the host over floats that the watcher has already brought back, so it
    adds no device work to a step.

    Args:
        alpha: EMA smoothing factor in (0, 1); higher remembers longer.
        z_threshold: A value more than this many standard deviations above the mean is a spike.
        warmup: Number of finite values used to initialise mean and variance; an outlier among
            them enters capped (at the median plus ``z_threshold`` robust standard deviations),
            so a bad batch during warm-up does not blind the detector. No spike is flagged
            before that.
        min_ratio: A spike must also exceed ``min_ratio`` times the mean. Guards against flagging
            noise in a run whose values barely vary (a tiny variance makes any wobble an outlier).

    Raises:
        ValueError: An argument is out of range.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup: int = 25,
        min_ratio: float = 1.5,
    ) -> None:
        self.alpha = check_probability("alpha", alpha)
        self.z_threshold = check_positive("z_threshold", z_threshold)
        self.warmup = check_int("warmup", warmup, minimum=1)
        self.min_ratio = check_positive("min_ratio", min_ratio)
        self.reset()

    def reset(self) -> None:
        """Forget the history."""
        self.count = 0
        self.mean = 0.0
        self.var = 0.0
        self._warm: list[float] = []

    @property
    def threshold(self) -> float | None:
        """The value above which the next step is a spike, or None during warm-up."""
        if self.count < self.warmup:
            return None
        std = math.sqrt(self.var)
        return max(self.mean + self.z_threshold * std, self.min_ratio * abs(self.mean))

    def update(self, value: float) -> bool:
        """Feed one step's value; return True if it is a spike.

        Non-finite values are ignored (never a spike here, never in the statistics).
        """
        if not math.isfinite(value):
            return False
        if self.count < self.warmup:
            self._warm.append(value)
            self.count += 1
            if self.count == self.warmup:
                self._start(np.asarray(self._warm))
                self._warm = []
            return False
        threshold = self.threshold
        assert threshold is not None
        spike = value > threshold
        self._ema(threshold if spike else value)
        return spike

    def _start(self, warm: np.ndarray) -> None:
        """Mean and variance of the warm-up values, outliers capped first.

        An outlier during warm-up (a bad batch at step 10) would otherwise inflate the variance
        and blind the detector for a few hundred steps. The cap is the detector's own rule with
        robust statistics: the median plus ``z_threshold`` robust standard deviations (1.4826 x
        the median absolute deviation), and at least ``min_ratio`` x the median. Values above
        it enter at the cap, as outliers do after warm-up.
        """
        median = float(np.median(warm))
        spread = 1.4826 * float(np.median(np.abs(warm - median)))
        cap = max(median + self.z_threshold * spread, self.min_ratio * abs(median))
        capped = np.minimum(warm, cap)
        self.mean = float(np.mean(capped))
        self.var = float(np.var(capped))

    def _ema(self, value: float) -> None:
        self.count += 1
        self.mean = self.alpha * self.mean + (1.0 - self.alpha) * value
        self.var = self.alpha * self.var + (1.0 - self.alpha) * (value - self.mean) ** 2

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where the run stopped."""
        return {"count": self.count, "mean": self.mean, "var": self.var, "warm": list(self._warm)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self._warm = [float(v) for v in state["warm"]]


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
