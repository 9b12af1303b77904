"""Lightning: :class:`GradWatchCallback`, gradwatch as a ``lightning.pytorch`` callback.

    trainer = L.Trainer(callbacks=[GradWatchCallback()], gradient_clip_val=1.0)

Where it runs. For each optimizer step Lightning (2.x; ``plugins/precision/precision.py``
``_after_closure`` and ``plugins/precision/amp.py`` ``optimizer_step``) runs, in order: the
closure (forward and backward, accumulated over ``accumulate_grad_batches``, all-reduced by DDP),
``scaler.unscale_`` (``precision="16-mixed"``), the ``on_before_optimizer_step`` hooks,
``configure_gradient_clipping`` (``gradient_clip_val``), then ``optimizer.step``. The callback
checks the gradients in ``on_before_optimizer_step``: accumulated, synchronised, unscaled and not
yet clipped, so ``StepReport.global_norm`` is the true norm before clipping, and a skip decision
(``on_nonfinite="skip"``) is taken before anything changes the weights. When Lightning clips, the
callback measures the global norm again after its clipping, right before the optimizer steps (an
optimizer step pre-hook, run after Lightning's closure), and reports it as ``clipped_norm`` with
``clip_coef``. Or gradwatch clips instead: pass ``clip=gradwatch.ClipNorm(...)`` and leave
``gradient_clip_val`` unset.

Metrics go through ``pl_module.log`` to the trainer's loggers every ``log_every_n_steps``
optimizer steps, aggregated over the steps since the last log (see
:class:`~gradwatch.integrations.WindowStats` for the keys); the summary table is printed when fit
ends.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from gradwatch._optional import MissingExtraError, require
from gradwatch.act.clip import Clipper
from gradwatch.config import NonFinitePolicy, SpikePolicy, check_int
from gradwatch.errors import ConfigError
from gradwatch.integrations import WindowStats, post_clip_norm, start_watch
from gradwatch.records import RunSummary, StepReport
from gradwatch.report.base import Sink
from gradwatch.report.tracker import layer_patterns
from gradwatch.watch import GradWatch

__all__ = ["GradWatchCallback"]


def _import_lightning() -> Any:
    """``lightning.pytorch``, else the standalone ``pytorch_lightning``, else the install hint."""
    try:
        return require("lightning.pytorch", extra="lightning")
    except MissingExtraError as missing:
        try:
            return importlib.import_module("pytorch_lightning")
        except ImportError:
            raise missing from None


pl = _import_lightning()

_UNCLOSED_WINDOW = 50
"""Steps per window when the trainer never logs (``log_every_n_steps=0``): bounds memory."""


class GradWatchCallback(pl.Callback):
    """Watches the gradients of a Lightning run: one gradwatch check per optimizer step.

    The check runs after AMP unscaling and gradient accumulation and before Lightning clips
    (``gradient_clip_val``); the norm after Lightning's clipping is measured as well. Metrics are
    logged with ``pl_module.log`` every ``trainer.log_every_n_steps`` optimizer steps, aggregated
    over those steps; alerts (NaN/Inf, spikes) are printed as they happen and the summary table at
    the end of fit. Works with ``accumulate_grad_batches`` (one check per optimizer step) and DDP
    (the synchronised gradients; every rank checks, rank 0 prints). One optimizer.

    Args:
        clip: Let gradwatch clip (``gradwatch.ClipNorm(1.0)``, an adaptive clipper, ...) instead of
            Lightning; then ``gradient_clip_val`` must be left unset.
        on_nonfinite: On NaN/Inf gradients: ``"warn"``, ``"skip"`` (the optimizer step changes
            neither weights nor optimizer state) or ``"raise"``.
        on_spike: On a gradient-norm spike: ``"warn"``, ``"clip"``, ``"skip"`` or ``"raise"``.
        sinks: gradwatch sinks (rank 0 only). None: alerts and the final table on the console.
        top_k: Layers logged by name each window (``grad_norm/<layer>``, the layer's largest
            norm): the ``top_k`` with the largest norms, which keeps a dashboard readable;
            None: every layer (as Lightning's ``grad_norm`` utility does); 0: none.
        layers: Only layers matching these glob patterns are logged by name (``"net.0"``,
            ``"encoder.*"``, ``["embed", "head"]``), still at most ``top_k`` of them; with
            ``top_k=None``, all of those. A pattern matching no layer is an error at fit start.
        **watch_options: Further :class:`~gradwatch.GradWatch` options (``layer_depth``,
            ``spike_detector``, ``forensics``, ``history``, ...).

    Attributes:
        watch: The :class:`~gradwatch.GradWatch` of the current fit (None before fit starts).
        history: Reports of the logged steps (bounded), with Lightning's clipping filled in:
            ``clipped_norm`` and ``clip_coef`` as measured after ``gradient_clip_val`` clipping.
        summary: The run summary, set when fit ends, counting the steps Lightning clipped.

    Raises:
        ConfigError: At setup, ``clip`` is given and the trainer has ``gradient_clip_val`` too;
            at fit start, a ``layers`` pattern matches no layer.
    """

    def __init__(
        self,
        *,
        clip: Clipper | None = None,
        on_nonfinite: NonFinitePolicy = "warn",
        on_spike: SpikePolicy = "warn",
        sinks: list[Sink] | None = None,
        top_k: int | None = 3,
        layers: str | Sequence[str] | None = None,
        **watch_options: Any,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.on_nonfinite = on_nonfinite
        self.on_spike = on_spike
        self.sinks = sinks
        self.top_k = None if top_k is None else check_int("top_k", top_k, minimum=0)
        self.layers = layer_patterns("layers", layers)
        self.watch_options = watch_options
        self.watch: GradWatch | None = None
        self.history: deque[StepReport] = deque(maxlen=watch_options.get("history", 256))
        self.summary: RunSummary | None = None
        self._window: WindowStats | None = None
        self._params: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._lightning_clips = False
        self._skips = False
        self._report: StepReport | None = None  # checked, optimizer step not yet seen
        self._post: torch.Tensor | None = None
        self._stepped = False
        self._loss: torch.Tensor | None = None
        self._clipped = 0  # steps Lightning clipped, over the run
        self._state: dict[str, Any] | None = None  # loaded before the watcher existed
        self._final_state: dict[str, Any] | None = None  # the last fit's, once it closed

    # ----------------------------------------------------------------------------- set up

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self.clip is not None and trainer.gradient_clip_val:
            raise ConfigError(
                f"GradWatchCallback(clip={self.clip!r}) and Trainer(gradient_clip_val="
                f"{trainer.gradient_clip_val!r}) would both clip the gradients; keep one: remove "
                "gradient_clip_val to let gradwatch clip, or pass clip=None to let Lightning clip "
                "(gradwatch then reports the norm before and after Lightning's clipping)"
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._close()
        self._lightning_clips = bool(trainer.gradient_clip_val) or _overrides_clipping(pl_module)
        self.watch, self._window = start_watch(
            self,
            pl_module,
            is_main_process=trainer.is_global_zero,
            framework_clips=self._lightning_clips,
        )
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        self._skips = "skip" in (self.on_nonfinite, self.on_spike)
        self._handles = [
            opt.register_step_pre_hook(self._before_step) for opt in trainer.optimizers
        ]
        self._clipped = 0
        self.summary = None
        if self._state is not None:
            self.watch.load_state_dict(self._state)
            self._state = None

    # ----------------------------------------------------------------------- each step

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        # Lightning divides the loss by accumulate_grad_batches: the sum over the micro-batches is
        # their mean. Under 16-mixed the loss here is scaled; it is left out then.
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.watch is None or self.watch.closed:
            return
        loss, self._loss = self._loss, None
        self._report = self.watch.check(loss=loss)
        self._post = None
        self._stepped = False

    def _before_step(self, optimizer: Any, args: tuple, kwargs: dict) -> Any:
        """Optimizer step pre-hook: the norm after Lightning's clipping, right before the step.

        Without AMP Lightning calls ``optimizer.step(closure=...)`` and the closure runs backward,
        ``on_before_optimizer_step`` and the clipping: measure after it. Under 16-mixed the closure
        already ran and ``scaler.step`` calls ``optimizer.step()`` only if the gradients are finite.
        """
        closure = kwargs.get("closure")
        if closure is None:
            self._after_clip()
            return None

        def closure_then_measure() -> Any:
            out = closure()
            self._after_clip()
            return out

        return args, {**kwargs, "closure": closure_then_measure}

    def _after_clip(self) -> None:
        if self._report is None:
            return
        self._stepped = True
        skipped = self._skips and self._report.skipped  # read only if a policy can skip
        if self._lightning_clips and not skipped and self.watch is not None:
            self._post = post_clip_norm(self._params, self.watch.settings.norm_type)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._report is None or self._window is None:
            return  # accumulating: no optimizer step in this batch
        report, self._report = self._report, None
        scaler_skipped = not self._stepped and not report.skipped  # GradScaler found inf/NaN
        self._window.add(report, self._post, skipped=scaler_skipped)
        self._post = None
        every = trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            metrics = self._close_window()
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        elif not every and len(self._window) >= _UNCLOSED_WINDOW:
            self._close_window()

    def _close_window(self) -> dict[str, float]:
        if self._window is None:
            return {}
        metrics, reports = self._window.close()
        self.history.extend(reports)
        if self._lightning_clips:
            self._clipped += sum(r.clipped for r in reports)
        return metrics

    # ------------------------------------------------------------------------------- end

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._window is None or not len(self._window):
            return
        metrics = self._close_window()  # the steps since the last log
        if metrics and trainer.is_global_zero and trainer.log_every_n_steps:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=max(trainer.global_step - 1, 0))
                logger.save()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._close()

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.watch is not None and not self.watch.closed:
            if self._window is not None and len(self._window):
                self._close_window()
            self._final_state = self.watch.state_dict()
            self.summary = self._count_clipped(self.watch.close())
        self._report = None

    def _count_clipped(self, summary: RunSummary) -> RunSummary:
        if not self._lightning_clips:
            return summary
        return dataclasses.replace(summary, clipped_steps=self._clipped)

    # ----------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The watcher's state (detectors, clipper), saved in Lightning checkpoints."""
        if self.watch is not None and not self.watch.closed:
            return {"watch": self.watch.state_dict()}
        state = self._state if self._state is not None else self._final_state
        return {"watch": state} if state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied when fit starts if the watcher does not exist yet."""
        state = state_dict.get("watch")
        if state is None:
            return
        if self.watch is not None and not self.watch.closed:
            self.watch.load_state_dict(state)
        else:
            self._state = state


def _overrides_clipping(pl_module: Any) -> bool:
    """True if the module clips its own way (``configure_gradient_clipping`` overridden)."""
    from_class = type(pl_module).configure_gradient_clipping
    return from_class is not pl.LightningModule.configure_gradient_clipping
