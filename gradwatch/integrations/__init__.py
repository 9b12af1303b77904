"""Adapters that run gradwatch inside training frameworks, and the few parts they share.

Each framework has its own module, imported on demand so that ``import gradwatch`` never imports a
framework: :mod:`gradwatch.integrations.lightning` (``GradWatchCallback`` for Lightning) and
:mod:`gradwatch.integrations.transformers` (``GradWatchCallback`` for the Hugging Face
``Trainer``). A missing framework raises :class:`~gradwatch._optional.MissingExtraError` naming
the extra that installs it.

Both adapters follow one plan. The watcher checks the gradients once per optimizer step at the
last moment they are still raw: accumulated, synchronised across ranks, unscaled, and not yet
clipped by the framework. When the framework then clips them itself (Lightning's
``gradient_clip_val``, the Trainer's ``max_grad_norm``), the adapter measures the global norm again
after that clipping, so the norms before and after clipping are both measured, not inferred. What is
shared lives here: the per-window statistics an adapter logs (:class:`WindowStats`), the norm
measured after a framework's clipping (:func:`post_clip_norm`) and a hook that runs after a
backward pass has finished (:class:`AfterBackward`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from gradwatch.collect.norms import sparse_values
from gradwatch.layers import layer_of
from gradwatch.records import RunSummary, StepReport
from gradwatch.report.base import StepAggregator
from gradwatch.report.console import ConsoleSink
from gradwatch.report.tracker import layer_patterns, match_layers
from gradwatch.step_result import StepResult
from gradwatch.watch import GradWatch

__all__ = ["AfterBackward", "CallbackConsole", "WindowStats", "post_clip_norm", "start_watch"]

PREFIX = "grad_norm/"
"""Namespace of every metric key the adapters log."""

UNCLIPPED = 1.0 - 1e-5
"""A clip coefficient measured from two norms counts as 1.0 (nothing clipped) above this."""


class CallbackConsole(ConsoleSink):
    """A callback's default console: alerts as they happen and the final table, counting the
    steps the framework clipped (the watcher itself does not see that clipping)."""

    def __init__(self, callback: Any) -> None:
        super().__init__(every=0)
        self._callback = callback

    def render_summary(self, s: RunSummary) -> Any:
        return super().render_summary(self._callback._count_clipped(s))


def start_watch(
    callback: Any,
    model: torch.nn.Module,
    *,
    is_main_process: bool,
    framework_clips: bool,
) -> tuple[GradWatch, WindowStats]:
    """The watcher and logging window of a framework callback, built from its settings.

    Args:
        callback: A gradwatch framework callback (``clip``, ``on_nonfinite``, ``on_spike``,
            ``sinks``, ``top_k``, ``layers``, ``watch_options`` attributes).
        model: The module being trained.
        is_main_process: Only the main process gets the default :class:`CallbackConsole`
            (used when the callback's ``sinks`` is None).
        framework_clips: The framework clips the gradients itself (windows then report it).
    """
    sinks = callback.sinks
    if sinks is None:
        sinks = [CallbackConsole(callback)] if is_main_process else []
    watch = GradWatch(
        model,
        clip=callback.clip,
        on_nonfinite=callback.on_nonfinite,
        on_spike=callback.on_spike,
        sinks=sinks,
        **callback.watch_options,
    )
    window = WindowStats(
        watch.names,
        top_k=callback.top_k,
        layers=callback.layers,
        layer_depth=callback.watch_options.get("layer_depth"),
        clips=callback.clip is not None or framework_clips,
    )
    return watch, window


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
        layer_names = tuple(dict.fromkeys(layer_of(n, layer_depth) for n in self.names))
        self._candidates = match_layers(layer_names, layer_patterns("layers", layers))
        self._reports: list[StepReport] = []
        self._post: list[torch.Tensor | float | None] = []
        self._skipped: list[bool] = []

    def __len__(self) -> int:
        return len(self._reports)

    def add(
        self,
        report: StepReport,
        post_clip: torch.Tensor | float | None = None,
        *,
        skipped: bool = False,
    ) -> None:
        """Add one optimizer step.

        Args:
            report: The watcher's report of the step (norms before any framework clipping).
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
        window = StepAggregator(self.names, depth=self.layer_depth)
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


class AfterBackward:
    """Calls ``fn()`` once at the very end of every backward pass that reaches ``params``.

    "The end" means after every gradient has been accumulated into ``.grad`` and after the
    callbacks other parts of torch queue for the end of the pass: DDP waits for its all-reduce
    there, so ``fn`` sees the synchronised gradients. Backward passes nested inside another (the
    recomputation of reentrant activation checkpointing) are ignored: ``fn`` runs once, at the end
    of the outermost pass.

    This is the hook a framework lacks when it offers no callback between the last backward and
    its own gradient clipping (the Hugging Face ``Trainer``). It relies on torch's autograd engine
    callback queue, the mechanism DDP and FSDP use for the same purpose.

    Args:
        params: Parameters whose gradients mark a backward pass (those not requiring grad are
            ignored).
        fn: Called with no arguments at the end of each outermost backward pass.
    """

    def __init__(self, params: Iterable[torch.Tensor], fn: Callable[[], None]) -> None:
        self._fn = fn
        self._task = -1
        self._engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
        self._handles = [p.register_hook(self._on_grad) for p in params if p.requires_grad]

    def _on_grad(self, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:  # first gradient of this pass: ask to be called at its end
            self._task = task
            self._engine.queue_callback(self._requeue)

    def _requeue(self) -> None:
        # Callbacks queued during the pass (DDP's) run in order after this one; queue again so
        # that fn runs after all of them.
        self._engine.queue_callback(self._run)

    def _run(self) -> None:
        if torch._C._current_autograd_node() is None:  # outermost pass, not a nested one
            self._fn()

    def remove(self) -> None:
        """Remove the hooks from the parameters (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
