"""Hugging Face transformers: :class:`GradWatchCallback`, gradwatch as a ``TrainerCallback``.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[GradWatchCallback()])

Where it runs. For each optimizer step the ``Trainer`` (transformers 5.x, ``Trainer._run_epoch``
in ``trainer.py``) runs the backward of every micro-batch, then ``_clip_grad_norm`` (the
``max_grad_norm`` clipping, through ``accelerator.clip_grad_norm_``, which unscales fp16
gradients first) and ``_get_grad_norm``, then the ``on_pre_optimizer_step`` callbacks,
``optimizer.step()``, ``on_optimizer_step`` and ``on_step_end``. No callback runs between the last
backward and the clipping, and the clipping multiplies every gradient by NaN as soon as one is
non-finite (``max_norm / nan``), which would erase where a NaN came from. So the callback checks at
the end of the backward of the last micro-batch of each optimizer step (an autograd end-of-backward
callback, after DDP's all-reduce; see :class:`~gradwatch.integrations.AfterBackward`): the
gradients are accumulated, synchronised, and not yet clipped. When ``max_grad_norm > 0`` the norm
after the Trainer's clipping is measured in ``on_pre_optimizer_step``. Or gradwatch clips instead:
``clip=gradwatch.ClipNorm(...)`` with ``max_grad_norm=0``.

Under fp16 with a ``GradScaler`` the gradients are still scaled at the end of backward and the
Trainer unscales them inside its clipping; the check then runs in ``on_pre_optimizer_step`` on the
unscaled gradients, after the Trainer's clipping (a warning says so once).

Metrics are added to the Trainer's logs every ``logging_steps`` (``trainer.state.log_history``,
the progress output and the ``report_to`` integrations; see
:class:`~gradwatch.integrations.WindowStats` for the keys), aggregated over the steps since the
last log, including steps whose NaN the Trainer's loss logging hides (``logging_nan_inf_filter``).
Next to them the Trainer logs its own ``grad_norm``: the norm before clipping of the window's last
step only, where ``grad_norm/global_mean`` and ``grad_norm/global_max`` cover every step (with
``logging_steps=1`` the three are equal). The summary table is printed when training ends.

Reaching ``report_to``. The Trainer calls its callbacks in order, its ``report_to`` integrations
(TensorBoard, W&B, MLflow, ...) before the callbacks passed to it, and each integration writes the
logs it is given at once. So when training begins the callback moves itself ahead of those
integrations in the Trainer's callback list; its keys are then in the logs they write. (The
Trainer passes callbacks no reference to itself: the callback finds the list through the
Trainer's ``CallbackHandler`` calling it. If it cannot, it warns once and the keys reach
``trainer.state.log_history`` and the progress output only.)
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from typing_extensions import override

from gradwatch._optional import require
from gradwatch.errors import ConfigError, GradWatchWarning
from gradwatch.integrations.backward import AfterBackward
from gradwatch.integrations.core import CallbackAdapter
from gradwatch.step_result import StepResult

__all__ = ["GradWatchCallback"]

_transformers = require("transformers", extra="transformers")
_GradientState = require("accelerate.state", extra="transformers").GradientState
_CallbackHandler = require("transformers.trainer_callback", extra="transformers").CallbackHandler

_FRAMES = 8
"""Call-stack frames searched for the Trainer's ``CallbackHandler`` (normally the first one)."""

_UNCLOSED_WINDOW = 50
"""Steps per window when the Trainer never logs: bounds memory."""


class GradWatchCallback(CallbackAdapter, _transformers.TrainerCallback):
    """Watches the gradients of a Hugging Face ``Trainer`` run: one check per optimizer step.

    The check sees the accumulated, synchronised gradients before the Trainer clips them; the
    norm after the Trainer's ``max_grad_norm`` clipping is measured too. Every ``logging_steps``
    the window's statistics (max, mean, counts over every step since the last log) are added to
    the Trainer's logs; alerts are printed as they happen and the summary table at the end.

    Args:
        clip: Let gradwatch clip (``gradwatch.ClipNorm(1.0)``, an adaptive clipper, ...) instead of
            the Trainer; then ``TrainingArguments.max_grad_norm`` must be 0.
        on_nonfinite: On NaN/Inf gradients: ``"warn"``, ``"skip"`` or ``"raise"``. ``"skip"``
            drops the step's gradients before the Trainer clips and steps, so neither the weights
            nor the optimizer state change, and the LR scheduler is not advanced (as for a step
            the GradScaler skips).
        on_spike: On a gradient-norm spike: ``"warn"``, ``"clip"``, ``"skip"`` or ``"raise"``.
        sinks: gradwatch sinks (main process only). None: alerts and the final table on the
            console.
        top_k: Layers logged by name each window (``grad_norm/<layer>``, the layer's largest
            norm): the ``top_k`` with the largest norms; None: every layer; 0: none.
        layers: Only layers matching these glob patterns are logged by name
            (``"transformer.h.*"``), still at most ``top_k`` of them; with ``top_k=None``, all.
        **watch_options: Further :class:`~gradwatch.GradWatch` options (``layer_depth``,
            ``spike_detector``, ``forensics``, ``history``, ...).

    Its state (the watcher's detectors and clipper) is :meth:`state_dict`, under
    :attr:`state_key`: save it next to the Trainer's checkpoint and :meth:`load_state_dict` it
    before resuming. (The Trainer's own callback state, ``ExportableState``, is not used: on
    resume it rebuilds a callback from JSON constructor arguments, which cannot hold a clipper or
    sinks, and only with ``restore_callback_states_from_checkpoint=True``.)

    Attributes:
        watch: The :class:`~gradwatch.GradWatch` of the current run (None before training).
        history: Reports of the logged steps (bounded), with the Trainer's clipping filled in:
            ``clipped_norm`` and ``clip_coef`` as measured after ``max_grad_norm`` clipping.
        summary: The run summary, set when training ends, counting the steps the Trainer clipped.

    Raises:
        ConfigError: When training begins, ``clip`` is given and ``max_grad_norm > 0`` too, or a
            ``layers`` pattern matches no layer.
    """

    @override
    def _reset(self) -> None:
        self._params: list[torch.Tensor] = []
        self._after_backward: AfterBackward | None = None
        self._check_before_step = False  # fp16: check in on_pre_optimizer_step instead
        self._report: StepResult | None = None
        self._post: torch.Tensor | None = None
        self._scheduler_hold: Any = None  # optimizer whose skip flag we set
        self._gradient_state: Any = None

    @property
    def state_key(self) -> str:
        """The name to save :meth:`state_dict` under: ``"GradWatchCallback"``, as in Lightning."""
        return type(self).__qualname__

    def state_dict(self) -> dict[str, Any]:
        """The watcher's state (detectors, clipper), to save with a checkpoint."""
        return self.core.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; applied when training begins if it has not yet."""
        self.core.load_state_dict(state_dict)

    # ----------------------------------------------------------------------------- set up

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()
        _run_before_reporters(self)
        max_norm = args.max_grad_norm or 0.0
        clip = self.core.clip
        if clip is not None and max_norm > 0:
            raise ConfigError(
                f"GradWatchCallback(clip={clip!r}) and TrainingArguments(max_grad_norm="
                f"{max_norm!r}) would both clip the gradients; keep one: set max_grad_norm=0 to "
                "let gradwatch clip, or pass clip=None to let the Trainer clip (gradwatch then "
                "reports the norm before and after the Trainer's clipping)"
            )
        model = kwargs["model"]
        self.core.start(
            model, is_main_process=state.is_world_process_zero, framework_clips=max_norm > 0
        )
        self._params = [p for p in model.parameters() if p.requires_grad]
        scaler = getattr(kwargs.get("optimizer"), "scaler", None)
        self._check_before_step = scaler is not None and scaler.is_enabled()
        if self._check_before_step:
            warnings.warn(
                "gradwatch: under fp16 the Trainer unscales gradients inside its clipping, so "
                "they are checked after it, in on_pre_optimizer_step: reported norms are after "
                "max_grad_norm clipping",
                GradWatchWarning,
                stacklevel=2,
            )
        else:
            self._after_backward = AfterBackward(self._params, self._on_backward_end)
        self._gradient_state = _GradientState()  # accelerate's: is this the last micro-batch?

    # ----------------------------------------------------------------------- each step

    def _on_backward_end(self) -> None:
        """End of a backward pass: check if it completes the accumulation of an optimizer step."""
        watch = self.core.watch
        if watch is None or watch.closed or not self._gradient_state.sync_gradients:
            return
        if self._report is None:  # once per step (a second backward, e.g. a penalty, is ignored)
            self._report = watch.check()

    @override
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        watch = self.core.watch
        if watch is None:
            return
        if self._check_before_step or self._report is None:
            self._report = watch.check()
        else:
            self._post = self.core.post_clip(self._params, self._report)

    @override
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        report = self._report
        skipped = self.core.skips and report is not None and report.skipped  # read if it can be
        if skipped and hasattr(optimizer, "_is_overflow"):
            # Tell the Trainer the step was skipped, as accelerate does for a GradScaler skip, so
            # that it does not advance the LR scheduler (reset in on_step_end).
            optimizer._is_overflow = True
            self._scheduler_hold = optimizer

    @override
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._scheduler_hold is not None:
            self._scheduler_hold._is_overflow = False
            self._scheduler_hold = None
        report, self._report = self._report, None
        post, self._post = self._post, None
        if report is None or self.core.watch is None:
            return
        optimizer = kwargs.get("optimizer")
        scaler_skipped = bool(getattr(optimizer, "step_was_skipped", False)) and not report.skipped
        self.core.add(report, post, skipped=scaler_skipped)
        if self.core.pending() >= _UNCLOSED_WINDOW and not _logs_steps(args):
            self.core.close_window()

    @override
    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs is None or not self.core.pending():
            return
        if "loss" not in logs and "train_loss" not in logs:
            return  # an evaluation's log
        metrics = self.core.close_window()
        logs.update(metrics)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(metrics)  # the Trainer stored a copy of logs just before

    # ------------------------------------------------------------------------------- end

    @override
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._after_backward is not None:
            self._after_backward.remove()
            self._after_backward = None
        self.core.close()
        self._report = None


def _run_before_reporters(callback: GradWatchCallback) -> None:
    """Move ``callback`` ahead of the Trainer's ``report_to`` callbacks in its callback list.

    Called from the callback's ``on_train_begin``: the ``CallbackHandler`` calling it is found on
    the call stack, and its list is replaced (not changed in place: the loop dispatching this
    event goes on over the old one). Warns once when the handler cannot be found.
    """
    handler = None
    frame = sys._getframe(2)  # skip on_train_begin
    for _ in range(_FRAMES):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, _CallbackHandler) and any(c is callback for c in owner.callbacks):
            handler = owner
            break
        frame = frame.f_back
    if handler is None:
        warnings.warn(
            "gradwatch: could not place GradWatchCallback before the Trainer's report_to "
            "integrations; its grad_norm/* keys reach trainer.state.log_history and the progress "
            "output but not TensorBoard, W&B or MLflow",
            GradWatchWarning,
            stacklevel=3,
        )
        return
    callbacks = list(handler.callbacks)
    reporters = [i for i, c in enumerate(callbacks) if _is_reporter(c)]
    mine = next(i for i, c in enumerate(callbacks) if c is callback)
    if reporters and reporters[0] < mine:
        callbacks.pop(mine)
        callbacks.insert(reporters[0], callback)
        handler.callbacks = callbacks


def _is_reporter(callback: Any) -> bool:
    """True for the Trainer's ``report_to`` callbacks (``transformers.integrations``)."""
    return type(callback).__module__.startswith("transformers.integrations")


def _logs_steps(args: Any) -> bool:
    strategy = str(getattr(args, "logging_strategy", "steps"))
    return strategy.endswith("steps") and bool(getattr(args, "logging_steps", 0))
