"""What the diagnosis says about clipping: was the run already clipped, and at what max_norm.

:class:`Clipping` tells whether a run was clipped (the watcher's clipper settings, or clipped steps
seen) so that a clipped run is told what its clipper did instead of being told to add one.
:func:`suggest_threshold` suggests a ``ClipNorm`` ``max_norm`` from the run's healthy steps: a
robust z-score on the log of the global norm (median + 3 robust standard deviations), which cuts
outliers and spares healthy steps however noisy the run, and says why in words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from gradwatch.detect.health_report import HealthReport, SpikeRecord
from gradwatch.detect.layer_stats import BIN

__all__ = ["Clipping", "Threshold", "suggest_threshold"]


class Clipping(NamedTuple):
    """Whether the run was already clipped, and how.

    Attributes:
        on: A clipper was configured, or some step was scaled down (``on_spike="clip"``).
        name: ``"ClipNorm(max_norm=0.25, norm_type=2.0)"``; empty when only clipped steps were
            seen.
        max_norm: A ``ClipNorm``'s threshold, else None.
    """

    on: bool
    name: str
    max_norm: float | None

    @classmethod
    def of(cls, health: HealthReport, clip: Mapping[str, Any] | None) -> Clipping:
        """From the clipper's ``config()`` (or None) and the clipped steps the run saw."""
        if clip:
            settings = ", ".join(f"{k}={v!r}" for k, v in clip.items() if k != "name")
            name = f"{clip.get('name', 'a clipper')}({settings})"
            max_norm = clip.get("max_norm") if clip.get("name") == "ClipNorm" else None
            return cls(True, name, None if max_norm is None else float(max_norm))
        if health.clipped_steps:
            return cls(True, "", None)  # clipped steps seen, the clipper's settings not given
        return cls(False, "", None)

    def summary(self, health: HealthReport) -> str:
        by = f" by {self.name}" if self.name else ""
        return (
            f"the run was already clipped{by}: {health.clipped_steps} of {health.steps} steps "
            "were scaled down"
        )


class Threshold(NamedTuple):
    value: float
    healthy_above: int  # healthy steps it would have scaled down
    healthy: int
    why: str

    def cuts(self, spikes: Sequence[SpikeRecord]) -> str:
        """``"would have scaled down 4 of the 4 spikes and 2 of the 86 healthy steps"``."""
        cut = sum(s.value > self.value for s in spikes)
        of = f"{cut} of the {len(spikes)} spikes and " if spikes else ""
        return (
            f"would have scaled down {of}{self.healthy_above} of the {self.healthy} healthy steps"
        )


def suggest_threshold(health: HealthReport, z: float = 3.0) -> Threshold | None:
    """A ClipNorm ``max_norm`` that cuts outliers and spares healthy steps, and why.

    ZClip's rule (a z-score: mean + z·std of recent norms) made robust, over the run's healthy
    steps: on a log scale (norms are multiplicative), the median plus ``z`` robust standard
    deviations (1.4826 × the median absolute deviation, at least one histogram bin). Outliers the
    spike detector missed (during its warm-up, say) move neither the median nor the MAD, whereas
    they set a 99th percentile of a short run; a 90th percentile would clip 1 healthy step in 10.

    References:
        Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", 2025.
    """
    centers, counts = health.calm_log_norms, health.calm_counts
    total = int(counts.sum())
    if total == 0:
        return None
    median = _weighted_median(centers, counts)
    sigma = max(1.4826 * _weighted_median(np.abs(centers - median), counts), BIN)
    value = float(f"{10 ** (median + z * sigma):.3g}")
    above = int(counts[centers - BIN / 2 >= math.log10(value)].sum())
    why = (
        f"{value:.3g} is {z:g} robust standard deviations above the healthy steps' median norm "
        f"{10**median:.3g} on a log scale (median and MAD: a ZClip-style z-score that outliers "
        "cannot inflate)"
    )
    return Threshold(value, above, total, why)


def _weighted_median(values: np.ndarray, counts: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(counts[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])
