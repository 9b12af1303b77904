"""The steps a framework callback logs at once, turned into its metric keys.

:class:`WindowStats` collects the watcher's reports of the steps since the last log together with
what the framework did to them after gradwatch's check (its own clipping, measured as the global
norm after it by :func:`post_clip_norm`; a step its GradScaler skipped), and turns them into the few
``grad_norm/*`` keys an adapter logs, through the one aggregator of :mod:`gradwatch.report.stats`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from gradwatch.collect.norms import sparse_values
from gradwatch.records import StepReport
from gradwatch.report.stats import LayerGroups, StepAggregator
from gradwatch.report.tracker import layer_patterns, match_layers
from gradwatch.step_result import StepResult

__all__ = ["PREFIX", "UNCLIPPED", "WindowStats", "post_clip_norm"]

PREFIX = "grad_norm/"
"""Namespace of every metric key the adapters log."""

UNCLIPPED = 1.0 - 1e-5
"""A clip coefficient measured from two norms counts as 1.0 (nothing clipped) above this."""


def post_clip_norm(params: Sequence[torch.Tensor], norm_type: float) -> torch.Tensor | None:
    """Global norm of the gradients present now, as a 0-d tensor on their device (no host sync).

    Returns None when no parameter has a gradient (e.g. the step was skipped by dropping them).
    """
    grads = [sparse_values(p.grad) for p in params if p.grad is not None]
    if not grads:
        return None
    with torch.no_grad():
        return torch.nn.utils.get_total_norm(grads, norm_type=norm_type)


class WindowStats:
    """The steps since the last log, turned into the few metric keys an adapter logs.

    Every step of the window counts (max, mean, counts), not only the last one. Reports are kept
    as they come and read once, when the window is closed, so adding a step costs no host sync.

    Keys (all under ``grad_norm/``): ``global_mean`` and ``global_max`` (mean and largest global
    norm before clipping, finite steps; the Hugging Face Trainer's own ``grad_norm`` is the
    window's last step),
    ``clipped_max`` (largest norm after clipping; only when something clips), ``clip_coef``
    (smallest factor the gradients were scaled by, the window's hardest clip; 1.0 = unclipped),
    ``clipped_steps``, ``spikes``, ``nan_steps``, ``skipped_steps``, and ``<layer>`` (the layer's
    largest norm in the window) for the layers chosen by ``layers`` and ``top_k``. The keys the
    tracker sinks write too (``global_mean``, ``clip_coef``, the counts, ``<layer>``) mean the
    same there (:mod:`gradwatch.report.tracker`).

    Args:
        names: The watcher's parameter names (``GradWatch.names``).
        top_k: Log the ``top_k`` layers with the largest norms of the window (among those
            ``layers`` matches); None: every one of them. 0: no layer.
        layers: Glob patterns of the layers that may be logged (``"encoder.*"``, ``["embed",
            "lm_head"]``); None: any layer.
        layer_depth: Group parameters into layers by their first ``layer_depth`` name parts.
        clips: Log the clipping keys even in a window where nothing was clipped.

    Raises:
        ConfigError: A ``layers`` pattern matches no layer (the message lists the layers).
    """

    def __init__(
        self,
        names: Iterable[str],
        *,
        top_k: int | None = 3,
        layers: str | Sequence[str] | None = None,
        layer_depth: int | None = None,
        clips: bool = False,
    ) -> None:
        self.names = tuple(names)
        self.top_k = top_k
        self.layer_depth = layer_depth
        self.clips = clips
        self._groups = LayerGroups(self.names, layer_depth)
        self._candidates = match_layers(self._groups.layers, layer_patterns("layers", layers))
        self._reports: list[StepResult | StepReport] = []
        self._post: list[torch.Tensor | float | None] = []
        self._skipped: list[bool] = []

    def __len__(self) -> int:
        return len(self._reports)

    def add(
        self,
        report: StepResult | StepReport,
        post_clip: torch.Tensor | float | None = None,
        *,
        skipped: bool = False,
    ) -> None:
        """Add one optimizer step.

        Args:
            report: The watcher's report of the step (norms before any framework clipping), or
                the ``StepResult`` ``check()`` returned (read when the window closes).
            post_clip: The global norm measured after the framework clipped the gradients, or
                None if the framework did not clip (gradwatch's own clipping is in the report).
            skipped: The framework skipped the optimizer step (e.g. GradScaler found inf/NaN).
        """
        self._reports.append(report)
        self._post.append(post_clip)
        self._skipped.append(skipped)

    def close(self) -> tuple[dict[str, float], list[StepReport]]:
        """End the window: its metrics, and its reports with the framework's clipping filled in.

        A report whose step the framework clipped gets ``clipped_norm`` (the measured norm after
        clipping) and ``clip_coef`` (its ratio to ``global_norm``) set; a step the framework
        skipped gets ``skipped=True``. Starts a new, empty window.
        """
        reports, posts, skipped = self._reports, self._post, self._skipped
        self._reports, self._post, self._skipped = [], [], []
        if not reports:
            return {}, []
        measured = _to_host(posts)
        fixed = [_with_framework_clip(r, p, s) for r, p, s in zip(reports, measured, skipped)]
        return self._metrics(fixed, any(p is not None for p in posts)), fixed

    def _metrics(self, reports: list[StepReport], framework_clips: bool) -> dict[str, float]:
        window = StepAggregator.of(self._groups)
        for report in reports:
            window.update(report)
        s = window.summary()
        out = {
            PREFIX + "global_mean": s.global_mean,
            PREFIX + "global_max": s.global_max,
            PREFIX + "spikes": float(s.spikes),
            PREFIX + "nan_steps": float(s.nonfinite_steps),
            PREFIX + "skipped_steps": float(s.skipped_steps),
        }
        stepped = [r for r in reports if not r.skipped and math.isfinite(r.clipped_norm)]
        if stepped and (self.clips or framework_clips or s.clipped_steps):
            out[PREFIX + "clipped_max"] = max(r.clipped_norm for r in stepped)
            out[PREFIX + "clip_coef"] = min(r.clip_coef for r in stepped)
            out[PREFIX + "clipped_steps"] = float(sum(r.clipped for r in stepped))
        if self.top_k != 0 and s.layers:
            maxima = np.array([layer.max for layer in s.layers], dtype=np.float64)
            order = np.argsort(-np.nan_to_num(maxima, nan=-np.inf), kind="stable")
            chosen = [i for i in order if self._candidates[i] and s.layers[i].steps]
            if self.top_k is None:
                chosen.sort()  # every layer, in model order
            for i in chosen[: self.top_k]:
                out[PREFIX + s.layers[i].name] = s.layers[i].max
        return out


def _to_host(values: list[torch.Tensor | float | None]) -> list[float | None]:
    """Device tensors to floats in one batched copy per device; None and floats pass through."""
    out: list[float | None] = [v if not isinstance(v, torch.Tensor) else None for v in values]
    tensors = [(i, v) for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, v in tensors:
        by_device.setdefault(v.device, []).append((i, v))
    for items in by_device.values():
        host = torch.stack([v.reshape(()).float() for _, v in items]).tolist()
        for (i, _), value in zip(items, host):
            out[i] = value
    return out


def _with_framework_clip(
    result: StepResult | StepReport, post: float | None, skipped: bool
) -> StepReport:
    report = result.report if isinstance(result, StepResult) else result
    changes: dict[str, object] = {}
    if skipped and not report.skipped:
        changes.update(skipped=True, skip_reason=report.skip_reason or "skipped by the framework")
    if post is not None and not report.skipped:
        before = report.clipped_norm  # after gradwatch's own clipping, if any
        factor = post / before if math.isfinite(before) and before > 0 else 1.0
        if not math.isfinite(factor) or factor > UNCLIPPED:
            factor = 1.0  # the same norm measured twice, up to rounding: nothing was clipped
        if factor < 1.0:
            changes.update(clipped_norm=post, clip_coef=report.clip_coef * factor)
    return dataclasses.replace(report, **changes) if changes else report
