"""What every rule reads: the run's health data and the readings several rules share.

A rule is ``rule(run: Run) -> list[Finding]``. Readings more than one rule needs (the first
incident's explanation, the first step's depth profile, the clipping) are computed once here, so
two findings about one incident cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from gradwatch.detect.health_report import HealthReport, NonFiniteOrigin
from gradwatch.diagnosis.clipping import Clipping
from gradwatch.diagnosis.incident import Explanation, StartDepth, explain, start_depth
from gradwatch.diagnosis.trend import Blowup, blowup

__all__ = ["Run"]


@dataclass
class Run:
    """A run as the rules see it.

    Args:
        health: What the health detector accumulated.
        clip: The clipper's ``config()``, or None.
    """

    health: HealthReport
    clip: Mapping[str, Any] | None = None

    @cached_property
    def clipping(self) -> Clipping:
        return Clipping.of(self.health, self.clip)

    @cached_property
    def origin(self) -> NonFiniteOrigin | None:
        """The first NaN/Inf of the run: in a gradient, or in a loss with finite gradients.

        A GradScaler's skips are not incidents when they are its own doing (the scaled gradients
        overflowed, the loss was finite) or when the loss is NaN/Inf at most steps (the scaler
        finding tells that story). A skip of an occasional NaN/Inf loss is an incident, which the
        scaler happened to catch: a bad batch, say.
        """
        h = self.health
        candidates = []
        if h.nonfinite and not self.scaler_only:
            scaled = math.isfinite(h.min_scale)
            first = next((o for o in h.nonfinite if not scaled or _loss_bad(o)), None)
            if first is not None:
                candidates.append(first)
        if h.loss_nonfinite:
            candidates.append(h.loss_nonfinite[0])
        return min(candidates, key=lambda o: o.step) if candidates else None

    @cached_property
    def scaler_only(self) -> bool:
        """Every non-finite step was a GradScaler skip the scaler finding explains: its normal
        loss-scale backoff, or a loss non-finite at most steps (:attr:`scaler_loss_persists`)."""
        h = self.health
        own = h.scaler_skips - (0 if self.scaler_loss_persists else h.scaler_loss_skips)
        return bool(h.nonfinite_count) and own >= h.nonfinite_count

    @cached_property
    def scaler_loss_persists(self) -> bool:
        """A GradScaler skipped most steps because the loss itself was NaN/Inf: the forward pass
        leaves the half-precision range at every step, not one bad batch."""
        h = self.health
        return h.scaler_loss_skips >= 3 and h.scaler_loss_skips >= 0.5 * h.steps

    @cached_property
    def incident(self) -> Explanation | None:
        """The cause of the first NaN/Inf, else of the first sustained rise (None: neither)."""
        if self.origin is not None:
            return explain(self.health, self.origin)
        if self.rise is not None or self.depth.exploding:
            found = explain(self.health, None)
            return None if found.cause == "unknown" else found
        return None

    @cached_property
    def depth(self) -> StartDepth:
        return start_depth(self.health)

    @cached_property
    def rise(self) -> Blowup | None:
        """The first sustained rise of the global norm (over the early steps, then the run)."""
        for series in (self.health.early, self.health.overview):
            if len(series) >= 2:
                found = blowup(series)
                if found is not None:
                    return found
        return None

    @cached_property
    def lr(self) -> float | None:
        """The learning rate at the start of the trouble (the largest param group's)."""
        h = self.health
        step = None
        if self.origin is not None:
            step = self.origin.step
        if self.rise is not None:
            step = self.rise.onset if step is None else min(step, self.rise.onset)
        for series in (h.run_ups.get("nonfinite"), h.early, h.overview):
            if series is None or not len(series):
                continue
            lrs = series.lrs
            use = np.isfinite(lrs) & ((series.steps <= step) if step is not None else True)
            if use.any():
                return float(lrs[use][-1])
        return None

    @cached_property
    def unhealthy_from_start(self) -> bool:
        """The trouble began at the first steps: no healthy norm to set a threshold from."""
        h = self.health
        if self.depth.exploding:
            return True
        first = h.first_step if h.first_step is not None else 0
        start = self.origin.step if self.origin is not None else None
        if self.rise is not None:
            start = self.rise.start if start is None else min(start, self.rise.start)
        return start is not None and start - first < 5

    def update_bound(self) -> float | None:
        """A ``max_norm`` that keeps an SGD step below 1% of the weights' norm: 0.01·‖w‖ / lr.

        For runs with no healthy step to learn a threshold from. Adaptive optimizers normalise
        the step, so any moderate bound works for them: the same formula, which they tolerate.
        """
        w = self.health.first_weights
        lr = self.lr
        if lr is None or lr <= 0 or not np.isfinite(w).any():
            return None
        weights = float(np.sqrt(np.nansum(w**2)))
        return float(f"{0.01 * weights / lr:.2g}") if weights > 0 else None

    def bound_advice(self) -> tuple[str, float] | None:
        """The remedy and ``max_norm`` of :meth:`update_bound`, for an unclipped run."""
        bound = self.update_bound()
        if bound is None or self.clipping.on:
            return None
        text = (
            f"clip by norm: gradwatch.ClipNorm({bound:.3g}) keeps each step below 1% of the "
            "weights' norm (no healthy step to set it from: the trouble began at the start)"
        )
        return text, bound

    def suggested_lr(self) -> float | None:
        """A learning rate that should hold: a tenth of the one the trouble started at.

        An adaptive optimizer's update is ≈ lr per coordinate whatever the gradient, so its
        suggestion is also capped at 1e-3, the usual ceiling for Adam-family optimizers.
        """
        lr = self.lr
        if lr is None or not math.isfinite(lr) or lr <= 0:
            return None
        value = lr / 10.0
        if self.health.update_rule == "adaptive":
            value = min(value, 1e-3)
        return float(f"{value:.1g}")


def _loss_bad(origin: NonFiniteOrigin) -> bool:
    return origin.loss is not None and not math.isfinite(origin.loss)
