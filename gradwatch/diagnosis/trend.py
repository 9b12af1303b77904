"""The time axis: how the global gradient norm rose, read the way an engineer reads the curve.

A norm that stands ten times above its level can get there two ways, and they have different
causes:

* **a jump**: steady steps, then one step carries (almost) the whole rise — one batch did it (an
  outlier, a corrupt record), whatever follows is its aftermath;
* **growth**: the rise builds over several steps, each a few times the last — the optimisation
  itself is unstable (a learning rate too high for the curvature, often as a warm-up raises it).

:func:`blowup` finds the first sustained rise of a series and tells which it is. A rise that
falls back at once is a spike, not a blow-up (the spike detector reports those).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np

from gradwatch.detect.trajectory import Series

__all__ = ["FACTOR", "Blowup", "blowup", "loss_progress"]

FACTOR = 10.0
"""A norm this many times its level has blown up (healthy steps rarely reach 3x)."""
_JUMP_SHARE = 0.6
"""A rise is a jump when one step carries at least this share of it (in log scale)."""
_STEADY = 5
"""Steps of history a jump needs before it to be one batch's doing."""
_LR_RISE = 3.0
"""A rise during which the learning rate grew this much is the optimisation's, however sudden."""


class Blowup(NamedTuple):
    """The first sustained rise of the global norm.

    Attributes:
        kind: ``"jump"`` (one step carried it) or ``"growth"`` (it built over steps).
        start: The last step still within 2x of the level the rise started from.
        onset: First step at :data:`FACTOR` times that level or more.
        level: The norm at ``start``.
        value: The norm at ``onset`` (inf when the norm went non-finite there).
        peak: The largest finite norm from ``onset`` on, before any non-finite step.
        per_step: Growth factor per step from ``start`` to ``onset`` (geometric mean).
        jump: The largest one-step factor in that stretch, and ``jump_step`` its step.
        nonfinite_step: The first non-finite step after the rise began, or None.
        lr_ratio: Learning rate at ``onset`` over the one at the trough before the rise (None:
            unknown).
        loss_ratio: Loss at ``onset`` (or the last finite one) over the loss at ``start``.
    """

    kind: Literal["jump", "growth"]
    start: int
    onset: int
    level: float
    value: float
    peak: float
    per_step: float
    jump: float
    jump_step: int
    nonfinite_step: int | None
    lr_ratio: float | None
    loss_ratio: float | None

    @property
    def rise(self) -> float:
        """Peak over level (inf if it went non-finite)."""
        return math.inf if self.nonfinite_step is not None else self.peak / self.level


def blowup(series: Series, factor: float = FACTOR) -> Blowup | None:
    """The first rise of the norm to ``factor`` times its level that does not fall back.

    The level is the trough of the trailing 3-step median so far, so one outlier sets no level.
    A rise is sustained when the next two steps stay within 2x of it or the norm goes non-finite
    within three steps.
    """
    n = len(series)
    if n < 2:
        return None
    norms = series.norms
    bad = ~np.isfinite(norms) | (norms <= 0)
    end = int(np.argmax(bad)) if bad.any() else n
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log10(np.where(bad, np.nan, norms))
    need = math.log10(factor)
    trough, trough_at = math.inf, -1
    for t in range(end + (1 if end < n else 0)):
        if t >= 1 and trough_at >= 0:
            value = x[t] if t < end else math.inf
            if value >= trough + need and _sustained(x, t, end, trough + need - math.log10(2)):
                return _describe(series, x, trough_at, t, end)
        if t < end:
            smooth = float(np.median(x[max(0, t - 2) : t + 1]))
            if smooth < trough:
                trough, trough_at = smooth, _nearest(x, t, smooth)
    return None


def _nearest(x: np.ndarray, t: int, smooth: float) -> int:
    window = x[max(0, t - 2) : t + 1]
    return max(0, t - 2) + int(np.argmin(np.abs(window - smooth)))


def _sustained(x: np.ndarray, t: int, end: int, floor: float) -> bool:
    if t >= end or end - t <= 3:  # non-finite at or within three steps of the rise
        return True
    after = x[t + 1 : t + 3]
    return bool(np.all(after >= floor))


def _describe(series: Series, x: np.ndarray, trough: int, onset: int, end: int) -> Blowup:
    steps, norms, losses, lrs = series
    # The rise starts at the last step still within 2x of the trough's level.
    level = x[trough]
    start = trough
    for t in range(trough, min(onset, end)):
        if x[t] <= level + math.log10(2.0):
            start = t
    top = x[start : min(onset + 1, end)]
    diffs = np.diff(top)
    total = (x[onset] if onset < end else top.max() + 1.0) - x[start]
    if onset >= end:  # the last step of the rise is the non-finite one
        diffs = np.append(diffs, math.inf)
    j = int(np.argmax(diffs)) if diffs.size else 0
    jump = float(diffs[j]) if diffs.size else 0.0
    # One batch can only be told from the optimisation after a few steady steps: a jump at the
    # first updates is the first update being too large.
    is_jump = jump >= _JUMP_SHARE * total and start + j >= _STEADY

    last = min(onset, end - 1)
    per_step = 10 ** float((x[last] - x[start]) / (last - start)) if last > start else math.inf
    stop = end if end > onset else onset
    peak = float(np.nanmax(norms[onset:stop])) if stop > onset else math.inf
    nonfinite = int(steps[end]) if end < len(series) else None
    lr_ratio = _ratio(lrs[min(onset, len(series) - 1)], lrs[trough])
    if lr_ratio is not None and lr_ratio >= _LR_RISE:
        is_jump = False  # the learning rate rose with it: the optimisation, not one batch
    if is_jump and onset < end and stop - onset > 3:
        later = norms[onset + 3 : stop]
        if later.size and float(np.nanmax(later)) > 10.0 * norms[onset]:
            is_jump = False  # it kept growing for steps after the crossing: not one batch
    return Blowup(
        kind="jump" if is_jump else "growth",
        start=int(steps[start]),
        onset=int(steps[onset]),
        level=float(norms[start]),
        value=float(norms[onset]) if onset < end else math.inf,
        peak=peak,
        per_step=per_step,
        jump=10**jump if math.isfinite(jump) else math.inf,
        jump_step=int(steps[start + j + 1]) if start + j + 1 < len(series) else int(steps[-1]),
        nonfinite_step=nonfinite,
        lr_ratio=lr_ratio,
        loss_ratio=_ratio(_last_finite(losses[start : last + 1]), losses[start]),
    )


def _ratio(a: float, b: float) -> float | None:
    if not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return None
    return float(a / b)


def _last_finite(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if finite.size else math.nan


def loss_progress(series: Series) -> float | None:
    """The loss at the end of ``series`` over its level at the start (median of 5 each side).

    Below 1: the loss fell. None without enough finite losses.
    """
    losses = series.losses[np.isfinite(series.losses)]
    if losses.size < 6:
        return None
    k = min(5, losses.size // 2)
    first, last = float(np.median(losses[:k])), float(np.median(losses[-k:]))
    if first <= 0:
        return None
    return last / first
