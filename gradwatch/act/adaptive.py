"""Adaptive clippers: thresholds that follow the run instead of a fixed ``max_norm``.

:class:`ClipZScore` (ZClip) clips the global norm when it is an outlier against an exponential
moving mean and variance; :class:`ClipPercentile` (AutoClip) clips it to a percentile of the norms
seen so far. Per-unit clipping relative to the weights (AGC) is in :mod:`gradwatch.act.unitwise`.

They follow the :class:`~gradwatch.act.clip.Clipper` protocol and its hot-path rules: every
decision is a device op (``torch.where``, ``clamp``), state lives in device tensors allocated on
the first step where the norms live, and nothing is read back to the host. A non-finite norm never
enters the state and never yields a coefficient: that step is left unscaled (coefficient 1) for
the watcher's ``on_nonfinite`` policy to handle.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from gradwatch.act.clip import EPS, Clipper, scale_
from gradwatch.collect.norms import GradBatch
from gradwatch.errors import ConfigError, ConfigTypeError
from gradwatch.validation import (
    check_choice,
    check_int,
    check_norm_type,
    check_positive,
    check_probability,
)

__all__ = ["ClipPercentile", "ClipZScore", "ZScoreMode"]

ZScoreMode = Literal["reciprocal", "fixed"]
"""ZClip's threshold rule: ``mean + z_thr²/z · std`` (its default) or ``mean + z_thr · std``."""

ZSCORE_MODES: tuple[str, ...] = get_args(ZScoreMode)

_Z_EPS = 1e-6
"""ZClip's ``eps`` in ``z = (norm - mean) / (std + eps)``."""


class ClipZScore(Clipper):
    """Clip the global norm when its z-score against the run's own history is too high (ZClip).

    The first ``warmup`` finite norms initialise the mean and (population) variance and are never
    clipped. After that, with ``std = sqrt(var)`` and ``z = (norm - mean) / (std + 1e-6)``:

    * ``mode="reciprocal"`` (ZClip's default, "adaptive_scaling"): if ``z > z_threshold`` the norm
      is clipped to ``mean + z_threshold² / z · std`` — the larger the outlier, the harder it is
      pulled back.
    * ``mode="fixed"`` (ZClip's "percentile" mode): a norm above ``mean + z_threshold · std`` is
      clipped to that value.

    The statistics are then updated with the norm *after* clipping, in ZClip's order:
    ``mean ← α·mean + (1-α)·x``, then ``var ← α·var + (1-α)·(x - mean)²`` with the new mean.
    The coefficient is that of ``clip_grad_norm_``: ``target / (norm + 1e-6)`` when the norm
    exceeds the target, else 1.

    Only the global norm passed in by the watcher is used, so under DDP/FSDP every rank sees the
    same (reduced) norm, keeps the same state and applies the same coefficient.

    This is ZClip's published rule, kept exact and run on the device with no host read. It is
    not the rule of gradwatch's alerts: :class:`~gradwatch.SpikeDetector` judges ``log(norm)``
    on the host, after the fact, with bars tuned so healthy runs raise no alarm, and
    ``on_spike="clip"`` clips to that detector's threshold (a host wait per step) for a run that
    wants its clipping to agree with its alerts.

    Args:
        alpha: EMA smoothing factor in (0, 1); higher remembers longer.
        z_threshold: z-score above which a norm is clipped, > 0.
        warmup: Number of finite norms that initialise mean and variance (no clipping until then).
        mode: ``"reciprocal"`` or ``"fixed"``, see above.
        max_norm: Optional hard ceiling, as ZClip's ``max_grad_norm``: the norm is also clipped to
            it (during warm-up too); the statistics still see the adaptive value.
        norm_type: Order of the global norm the watcher computes.

    Raises:
        ValueError, TypeError: An argument is out of range or of the wrong type.

    References:
        Kumar, Abbas, Koutsoukos, Hamid et al., "ZClip: Adaptive Spike Mitigation for LLM
        Pre-Training", arXiv:2504.02507, 2025; reference code github.com/bluorion-com/ZClip.
    """

    settings = ("alpha", "z_threshold", "warmup", "mode", "max_norm", "norm_type")
    state_keys = ("count", "mean", "var")

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup: int = 25,
        *,
        mode: ZScoreMode = "reciprocal",
        max_norm: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        self.alpha = check_probability("ClipZScore(alpha)", alpha)
        self.z_threshold = check_positive("ClipZScore(z_threshold)", z_threshold)
        self.warmup = check_int("ClipZScore(warmup)", warmup)
        self.mode = check_choice("ClipZScore(mode)", mode, ZSCORE_MODES)
        self.max_norm = (
            None if max_norm is None else check_positive("ClipZScore(max_norm)", max_norm)
        )
        self.norm_type = check_norm_type("ClipZScore(norm_type)", norm_type)

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        """Finite-norm count, mean and (population) variance, all zero."""
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        count = torch.zeros((), dtype=torch.int64, device=like.device)
        return {"count": count, "mean": zero, "var": zero.clone()}

    def loaded_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**state, "count": state["count"].to(torch.int64)}

    def clip_(self, batch: GradBatch, total_norm: Tensor, param_norms: Tensor, out: Tensor) -> None:
        state = self.state_on(total_norm)
        count, mean, var = state["count"], state["mean"], state["var"]
        norm, zt = total_norm, self.z_threshold
        finite = torch.isfinite(norm)
        ready = count >= self.warmup
        std = var.sqrt()
        if self.mode == "reciprocal":
            z = (norm - mean) / (std + _Z_EPS)
            outlier = z > zt
            bound = mean + (zt * std) / (z / zt)
        else:
            bound = mean + zt * std
            outlier = norm > bound
        # The value the norm is clipped to, and the value the statistics see.
        target = torch.where(outlier & ready & finite, bound, norm)
        allowed = target if self.max_norm is None else target.clamp(max=self.max_norm)
        out.copy_(torch.where(finite & (norm > allowed), allowed / (norm + EPS), 1.0))
        scale_(batch, out)

        # Warm-up: running mean and population variance (Welford), equal at the end of warm-up
        # to ZClip's initialisation from the buffered norms. After: ZClip's EMA update.
        n = (count + 1).to(mean.dtype)
        warm_mean = mean + (target - mean) / n
        warm_var = var + ((target - mean) * (target - warm_mean) - var) / n
        ema_mean = self.alpha * mean + (1.0 - self.alpha) * target
        ema_var = self.alpha * var + (1.0 - self.alpha) * (target - ema_mean) ** 2
        new_mean = torch.where(ready, ema_mean, warm_mean)
        new_var = torch.where(ready, ema_var, warm_var)
        mean.copy_(torch.where(finite, new_mean, mean))
        var.copy_(torch.where(finite, new_var, var))
        count.add_(finite.to(count.dtype))


class ClipPercentile(Clipper):
    """Clip the global norm to a percentile of the norms observed so far (AutoClip).

    At each step the observed (unclipped) norm is appended to the history first, then the
    threshold is ``np.percentile(history, percentile)`` (linear interpolation) and the gradients
    are clipped as ``clip_grad_norm_(params, threshold)`` does: by ``min(threshold / (norm +
    1e-6), 1)``. The published rule keeps every norm; here the history is the last ``history``
    finite norms (a ring buffer on the device). Non-finite norms are not recorded and not clipped.

    Only the global norm passed in by the watcher is used, so under DDP/FSDP every rank keeps the
    same history and applies the same coefficient.

    Args:
        percentile: Percentile of the history to clip to, in [0, 100] (AutoClip used 10).
        history: Number of recent norms kept.
        norm_type: Order of the global norm the watcher computes.

    Raises:
        ValueError, TypeError: An argument is out of range or of the wrong type.

    References:
        Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
        Separation Networks", MLSP 2020, arXiv:2007.14469; reference code
        github.com/pseeth/autoclip (``autoclip.py``).
    """

    settings = ("percentile", "history", "norm_type")
    state_keys = ("count", "history")

    def __init__(
        self, percentile: float = 10.0, history: int = 1000, *, norm_type: float = 2.0
    ) -> None:
        if not isinstance(percentile, (int, float)) or isinstance(percentile, bool):
            raise ConfigTypeError(
                f"ClipPercentile(percentile) must be a number in [0, 100], got {percentile!r}"
            )
        if not 0.0 <= float(percentile) <= 100.0:
            raise ConfigError(
                f"ClipPercentile(percentile) must be a number in [0, 100], got {percentile!r}"
            )
        self.percentile = float(percentile)
        self.history = check_int("ClipPercentile(history)", history)
        self.norm_type = check_norm_type("ClipPercentile(norm_type)", norm_type)

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        """Finite-norm count and the ring of recent norms (NaN: an empty slot)."""
        count = torch.zeros((), dtype=torch.int64, device=like.device)
        ring = torch.full((self.history,), math.nan, dtype=like.dtype, device=like.device)
        return {"count": count, "history": ring}

    def clip_(self, batch: GradBatch, total_norm: Tensor, param_norms: Tensor, out: Tensor) -> None:
        state = self.state_on(total_norm)
        count, norms = state["count"], state["history"]
        finite = torch.isfinite(total_norm)
        slot = torch.remainder(count, self.history).reshape(1)
        kept = norms.index_select(0, slot)
        norms.index_copy_(0, slot, torch.where(finite, total_norm, kept))
        count.add_(finite.to(count.dtype))
        # nanquantile skips the empty (NaN) slots; its linear interpolation is np.percentile's.
        threshold = torch.nanquantile(norms, self.percentile / 100.0)
        coef = (threshold / (total_norm + EPS)).clamp_(max=1.0)
        out.copy_(torch.where(finite, coef, 1.0))
        scale_(batch, out)

    def loaded_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        shape = tuple(state["history"].shape)
        if shape != (self.history,):
            raise ConfigError(
                f"ClipPercentile state holds a history of shape {shape}, "
                f"this clipper keeps history={self.history}"
            )
        return {**state, "count": state["count"].to(torch.int64)}
