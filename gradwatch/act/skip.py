"""Running a check right before ``optimizer.step()`` and skipping the step when told to.

:class:`StepGuard` replaces the optimizer instance's ``step`` with a bound method that asks a
callback first; when the callback says skip, the real ``step`` is not called at all, so neither the
weights nor the optimizer state (momentum, Adam moments, step counts) change. The replacement is a
bound method, so LR schedulers (which wrap ``optimizer.step`` through ``step.__func__``) keep
working.

Without an attached optimizer, :func:`drop_gradients` skips a step for standard torch optimizers:
they leave a parameter whose gradient is None untouched, state included.

With a ``torch.amp.GradScaler``, the guard also wraps ``scaler.step`` to notice the steps the scaler
itself skips (inf/NaN found after unscaling), which never reach ``optimizer.step``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["StepGuard", "drop_gradients"]


def drop_gradients(params: list[torch.Tensor]) -> None:
    """Set every gradient to None so that a following ``optimizer.step()`` changes nothing."""
    for p in params:
        p.grad = None


class StepGuard:
    """Wraps ``optimizer.step`` (and optionally ``scaler.step``) for the duration of an attachment.

    Args:
        optimizer: The optimizer whose steps are guarded.
        before_step: Called before each real step; returns False to skip it.
        scaler: A ``torch.amp.GradScaler`` stepping this optimizer, or None.
        on_scaler_skip: Called when ``scaler.step(optimizer)`` did not step the optimizer.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        before_step: Callable[[], bool],
        scaler: Any = None,
        on_scaler_skip: Callable[[], None] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.scaler = scaler
        self.active = True
        self._stepped = False
        self._patched: list[tuple[object, types.MethodType, bool, Any]] = []
        guard = self

        def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if guard.active:
                guard._stepped = True
                if not before_step():
                    return None
            return original_step(*args, **kwargs)

        original_step = optimizer.step
        self._patch(optimizer, types.MethodType(step, optimizer))

        if scaler is not None:
            original_scaler_step = scaler.step

            def scaler_step(sc: Any, opt: Any, *args: Any, **kwargs: Any) -> Any:
                guard._stepped = False
                result = original_scaler_step(opt, *args, **kwargs)
                if guard.active and opt is optimizer and not guard._stepped and on_scaler_skip:
                    on_scaler_skip()
                return result

            self._patch(scaler, types.MethodType(scaler_step, scaler))

    def _patch(self, owner: object, method: types.MethodType) -> None:
        had_own = "step" in vars(owner)
        self._patched.append((owner, method, had_own, vars(owner).get("step")))
        owner.step = method  # type: ignore[attr-defined]

    def remove(self) -> None:
        """Undo the wrapping; if something wrapped ``step`` after us, become a pass-through."""
        self.active = False
        for owner, ours, had_own, previous in self._patched:
            if vars(owner).get("step") is not ours:
                continue  # wrapped again after us (e.g. an LR scheduler): stay, as a pass-through
            if had_own:
                owner.step = previous  # type: ignore[attr-defined]
            else:
                del owner.step  # type: ignore[attr-defined]
        self._patched = []
