"""The step path: gradients -> norms -> policy -> clipping -> a row for the emission.

Everything a check does on the device lives here, in the order it happens: follow a model whose
parameters changed, read the gradients once (per-parameter and global norms), decide what a
policy must decide now, clip, keep or restore the buffers, and hand the row to the emission.
:class:`~gradwatch.GradWatch` owns the lifecycle and the public API; it calls
:meth:`StepPath.check`.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch

from gradwatch.act.policy import StepPolicy
from gradwatch.act.skip import BufferSnapshot, StepGuard, optimizer_params
from gradwatch.alerts import policy_error
from gradwatch.binding import Binding
from gradwatch.collect.distributed import RankBlame, unwrap_model
from gradwatch.collect.params import ParamChanges, WatchedParams
from gradwatch.collect.pipeline import StageLayout
from gradwatch.detect.health import HealthDetector
from gradwatch.emission import Emission, Pending
from gradwatch.errors import ConfigError, ConfigTypeError, GradWatchWarning, StateError
from gradwatch.report.sink import _outside_gradwatch
from gradwatch.settings import WatchSettings
from gradwatch.step_result import StepResult

__all__ = ["StepPath", "detached_loss"]


class StepPath:
    """Checks the watched gradients at each step; see :class:`~gradwatch.GradWatch`.

    Args:
        settings: The watcher's settings.
        model: The model as the user gave it (a DDP wrapper for ``rank_blame``), or named
            parameters.
        watched: The watched parameters.
        emission: Takes each step's row.
        health: The health detector, bound to the parts over the watched tensors.

    Raises:
        ConfigError, ConfigTypeError: ``forensics`` or ``rank_blame`` without the model they need.

    Attributes:
        step: Steps checked so far.
        guard: The attached optimizer's :class:`~gradwatch.act.skip.StepGuard`, or None.
        micro_losses: Losses of the backward passes since the last check.
        micro_batches: Backward passes since the last check.
        last_skip: The last check decided to skip its step.
    """

    def __init__(
        self,
        settings: WatchSettings,
        model: Any,
        watched: WatchedParams,
        emission: Emission,
        health: HealthDetector,
        stages: StageLayout | None = None,
    ) -> None:
        module = unwrap_model(model)
        module = module if isinstance(module, torch.nn.Module) else None
        if settings.forensics and module is None:
            raise ConfigTypeError(
                "forensics=True needs the model as an nn.Module to hook its modules, "
                "got named parameters"
            )
        self._blame: RankBlame | None = None
        if settings.rank_blame:
            if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
                raise ConfigError(
                    "rank_blame=True needs the DistributedDataParallel-wrapped model, "
                    f"got {type(model).__name__}"
                )
            self._blame = RankBlame(watched.params[0].device)
            self._blame.install(model)
        self.settings = settings
        self._module = module
        self._stages = stages
        self._emission = emission
        self._health = health
        self._policy = StepPolicy(
            settings.on_nonfinite, settings.on_spike, emission.spike_threshold
        )
        self.bind(watched)
        self._changes = ParamChanges(module, watched)
        self._snapshot = None
        if settings.skips and module is not None:
            self._snapshot = BufferSnapshot(module)
        self.step = 0
        self.micro_losses: list[Any] = []
        self.micro_batches = 0
        self.guard: StepGuard | None = None
        self.last_skip = False

    def attach(self, optimizer: Any, scaler: Any) -> None:
        """Check before every step of ``optimizer``; see :meth:`GradWatch.attach`."""
        if self.guard is not None:
            raise StateError(
                f"attach() was already called with {type(self.guard.optimizer).__name__}; "
                "a watcher guards one optimizer (call detach() first to switch)"
            )
        if not callable(getattr(optimizer, "step", None)):
            raise ConfigTypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        params = optimizer_params(optimizer)
        watched = self.bound.watched
        if params is not None and not any(id(p) in watched.position for p in params):
            raise ConfigError(
                f"optimizer ({type(optimizer).__name__}) updates none of the "
                f"{len(watched)} parameters this GradWatch watches: its {len(params)} "
                "parameters belong to another model (a copy made with copy.deepcopy, an EMA "
                "model?); attach the optimizer built over the watched model's parameters"
            )
        if scaler is not None and not callable(getattr(scaler, "step", None)):
            raise ConfigTypeError(
                f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
            )
        self.guard = StepGuard(optimizer, self.before_step, scaler, self.after_scaler_skip)

    def remove(self) -> None:
        """Remove every hook this path installed."""
        self.bound.remove()
        self._changes.remove()
        if self._snapshot is not None:
            self._snapshot.remove()

    def bind(self, watched: WatchedParams) -> None:
        """Build the parts over ``watched`` and connect the emission and health to them."""
        self.bound = bound = Binding(watched, self.settings, self._module, self._stages)
        self._emission.bind(bound.ring, bound.arrivals.positions)
        self._health.bind(watched, bound.probe, bound.arrivals.positions)

    def _refresh(self) -> None:
        """Follow the model after its parameters changed (see :class:`ParamChanges`).

        The same parameters, replaced (``load_state_dict(assign=True)``) or moved to another
        dtype or device, are watched again under the same names, bit-exactly in the new dtype.
        A changed set of names (a module added, a parameter unfrozen) cannot be merged into the
        run's history: the watcher warns once, naming them, and goes on with the original set.
        """
        if self._snapshot is not None:
            self._snapshot.mark_dirty()  # a module added may bring buffers
        current = self._changes.resolve()
        if current.names == self.bound.watched.names:
            same = all(map(operator.is_, current.params, self.bound.watched.params))
            moved = [(p.dtype, p.device) for p in current.params] != self._changes.layout
            if moved or not same:
                self._emission.drain(wait=True)  # every pending row belongs to the old layout
                self.bound.remove()
                self.bind(current)
            self._changes.track(current)
            return
        names = self.bound.watched.names
        watched, now = set(names), set(current.names)
        added = [n for n in current.names if n not in watched]
        gone = [n for n in names if n not in now]
        parts = []
        if added:
            parts.append(f"trainable but not watched: {_listed(added)}")
        if gone:
            parts.append(f"watched but no longer trainable in the model: {_listed(gone)}")
        warnings.warn(
            "gradwatch: the model's trainable parameters changed after the GradWatch was "
            f"created ({'; '.join(parts)}). Norms, NaN/Inf checks and clipping keep covering "
            f"the original {len(names)} parameters only; create the GradWatch after the "
            "model is final, or close this one and create a new one",
            GradWatchWarning,
            stacklevel=3,
        )
        self._changes.accept()

    def before_step(self) -> bool:
        """The attached optimizer's step pre-hook: check; False to skip the step."""
        self.check(skip_reason=None, from_optimizer=True)
        return not self.last_skip

    def after_scaler_skip(self) -> None:
        """The GradScaler skipped the step: report it as skipped."""
        self.check(skip_reason="GradScaler found inf/NaN", from_optimizer=True)

    def check(self, *, skip_reason: str | None, from_optimizer: bool) -> StepResult:
        """One check of the gradients present now: a row for the emission, and its result."""
        if self._changes.changed():
            self._refresh()
        bound = self.bound
        if bound.hold is not None:
            bound.hold.clear()
        ring = bound.ring
        if ring.written - ring.read >= ring.capacity:
            self._emission.drain(wait=True, upto=ring.read)
        number, slot = ring.claim()
        blame = self._blame.take() if self._blame is not None else None
        with torch.no_grad():
            batch = bound.collector.gather()
            if batch is None:
                slot.row.zero_()
                slot.coef.fill_(1.0)
            has_loss = self._write_loss(slot.loss)  # before the norms: pipeline stages share it
            if batch is not None:
                loss = slot.loss if has_loss else None
                bound.collector.param_norms_(batch, slot.norms, slot.shared, loss)
                bound.collector.global_norm_(
                    batch, slot.norms, self.settings.norm_type, slot.global_norm
                )
            has_scale = self._write_scale(slot.scale)
            action = None
            if skip_reason is None:
                skip_reason, action = self._policy.decide(slot.global_norm)
            self.last_skip = skip_reason is not None
            if batch is not None and not self.last_skip:
                self._clip(batch, slot)
            elif self.settings.writes_coef:
                slot.coef.fill_(1.0)
            if action == "skipped" and not from_optimizer and batch is not None:
                bound.hold.skip()  # type: ignore[union-attr]
            if self._snapshot is not None:
                if self.last_skip:
                    self._restore_buffers()
                else:
                    self._snapshot.take()
        ring.commit(number)

        result = StepResult(self.step, lambda: self._emission.drain(wait=True, upto=number))
        emission = self._emission
        emission.add(
            number,
            Pending(
                result,
                [] if batch is None else batch.positions,
                bound.arrivals.snapshot(),
                has_loss,
                has_scale,
                skip_reason,
                action or ("skipped" if skip_reason else None),
                bound.micro.take() if bound.micro is not None else [],
                blame,
                bound.probe.capture(self.guard),
            ),
        )
        self.step += 1
        self.micro_batches = 0
        bound.arrivals.clear()
        if action == "raise":
            emission.drain(wait=True, upto=number)
            raise policy_error(result.report)
        emission.scan()
        return result

    def _clip(self, batch: Any, slot: Any) -> None:
        clip = self.settings.clip
        if clip is not None:
            clip.clip_(batch, slot.global_norm, slot.norms, slot.coef)
        if self.settings.on_spike == "clip":
            if clip is None:
                slot.coef.fill_(1.0)
            self._policy.clip_to_threshold_(batch, slot.global_norm, slot.coef)

    def _write_loss(self, out: torch.Tensor) -> bool:
        losses = self.micro_losses
        if not losses:
            return False
        if len(losses) == 1:
            loss = losses[0]
        else:
            loss = torch.stack(
                [torch.as_tensor(v, dtype=out.dtype, device=out.device) for v in losses]
            ).mean()
        if isinstance(loss, torch.Tensor):
            out.copy_(loss.reshape(()))
        else:
            out.fill_(float(loss))
        self.micro_losses = []
        return True

    def _write_scale(self, out: torch.Tensor) -> bool:
        scaler = self.guard.scaler if self.guard is not None else None
        scale = getattr(scaler, "_scale", None)
        if scale is None:
            return False
        out.copy_(scale.reshape(()))
        return True

    def _restore_buffers(self) -> None:
        failed = self._snapshot.restore()  # type: ignore[union-attr]
        if failed:
            warnings.warn(
                f"gradwatch: step {self.step} was skipped, but {len(failed)} buffer(s) of the "
                "model could not be put back and keep what this step's forward pass wrote: "
                f"{_listed(failed)}",
                GradWatchWarning,
                stacklevel=_outside_gradwatch(),
            )


def _listed(names: list[str], most: int = 5) -> str:
    more = f" (+{len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def detached_loss(loss: Any) -> Any:
    """``loss`` as the step path keeps it: a detached one-element tensor or a float.

    Raises:
        ConfigError, ConfigTypeError: ``loss`` is not a scalar tensor or a number.
    """
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ConfigError(
                f"loss must be a scalar (one element), got a tensor of shape {tuple(loss.shape)}: "
                "reduce it first (e.g. loss.mean()) and pass what you backpropagate"
            )
        return loss.detach()
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise ConfigTypeError(f"loss must be a tensor or a number, got {type(loss).__name__}")
