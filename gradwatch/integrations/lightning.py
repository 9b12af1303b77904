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
ends. The callback is an adapter: what it does without Lightning lives in
:class:`~gradwatch.integrations.core.CallbackCore`; here each hook only hands the core its step.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from typing_extensions import override

from gradwatch._optional import MissingExtraError, require
from gradwatch.errors import ConfigError
from gradwatch.integrations.core import CallbackAdapter
from gradwatch.step_result import StepResult

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


class GradWatchCallback(CallbackAdapter, pl.Callback):
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

    Its state (the watcher's detectors and clipper) is saved in Lightning checkpoints under
    :attr:`state_key` and restored when fit resumes.

    Attributes:
        watch: The :class:`~gradwatch.GradWatch` of the current fit (None before fit starts).
        history: Reports of the logged steps (bounded), with Lightning's clipping filled in:
            ``clipped_norm`` and ``clip_coef`` as measured after ``gradient_clip_val`` clipping.
        summary: The run summary, set when fit ends, counting the steps Lightning clipped.

    Raises:
        ConfigError: At setup, ``clip`` is given and the trainer has ``gradient_clip_val`` too;
            at fit start, a ``layers`` pattern matches no layer.
    """

    @override
    def _reset(self) -> None:
        self._params: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._report: StepResult | None = None  # checked, optimizer step not yet seen
        self._post: torch.Tensor | None = None
        self._stepped = False
        self._loss: torch.Tensor | None = None

    @property
    @override
    def state_key(self) -> str:
        """Where Lightning keeps this callback's state in a checkpoint: ``"GradWatchCallback"``.

        One watcher per model is the rule, so the class name is the key (checkpoints written so
        far keep loading).
        """
        return type(self).__qualname__

    # ----------------------------------------------------------------------------- set up

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        clip = self.core.clip
        if stage == "fit" and clip is not None and trainer.gradient_clip_val:
            raise ConfigError(
                f"GradWatchCallback(clip={clip!r}) and Trainer(gradient_clip_val="
                f"{trainer.gradient_clip_val!r}) would both clip the gradients; keep one: remove "
                "gradient_clip_val to let gradwatch clip, or pass clip=None to let Lightning clip "
                "(gradwatch then reports the norm before and after Lightning's clipping)"
            )

    @override
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._close()
        self.core.start(
            pl_module,
            is_main_process=trainer.is_global_zero,
            framework_clips=bool(trainer.gradient_clip_val) or _overrides_clipping(pl_module),
        )
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        self._handles = [
            opt.register_step_pre_hook(self._before_step) for opt in trainer.optimizers
        ]

    # ----------------------------------------------------------------------- each step

    @override
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        # Lightning divides the loss by accumulate_grad_batches: the sum over the micro-batches is
        # their mean. Under 16-mixed the loss here is scaled; it is left out then.
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        watch = self.core.watch
        if watch is None or watch.closed:
            return
        loss, self._loss = self._loss, None
        self._report = watch.check(loss=loss)
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
        self._post = self.core.post_clip(self._params, self._report)

    @override
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._report is None or self.core.watch is None:
            return  # accumulating: no optimizer step in this batch
        report, self._report = self._report, None
        scaler_skipped = not self._stepped and not report.skipped  # GradScaler found inf/NaN
        self.core.add(report, self._post, skipped=scaler_skipped)
        self._post = None
        every = trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            metrics = self.core.close_window()
            if metrics:
                pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        elif not every and self.core.pending() >= _UNCLOSED_WINDOW:
            self.core.close_window()

    # ------------------------------------------------------------------------------- end

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.core.pending():
            return
        metrics = self.core.close_window()  # the steps since the last log
        if metrics and trainer.is_global_zero and trainer.log_every_n_steps:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=max(trainer.global_step - 1, 0))
                logger.save()

    @override
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._close()

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.core.close()
        self._report = None

    # ----------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        """The watcher's state (detectors, clipper), saved in Lightning checkpoints."""
        return self.core.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied when fit starts if the watcher does not exist yet."""
        self.core.load_state_dict(state_dict)


def _overrides_clipping(pl_module: Any) -> bool:
    """True if the module clips its own way (``configure_gradient_clipping`` overridden)."""
    from_class = type(pl_module).configure_gradient_clipping
    return from_class is not pl.LightningModule.configure_gradient_clipping
