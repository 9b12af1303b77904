"""Skipping a step so that nothing in the model moves: parameters, optimizer state, buffers.

Three parts, each used by the watcher when a policy can skip (``"skip"``):

* :class:`StepGuard` (an attached optimizer) runs the check from the optimizer's own step
  pre-hook (``register_step_pre_hook``), so ``optimizer.step`` is never replaced and LR
  schedulers, which patch it, work whichever was created first. On a skip, the pre-hook hides the
  gradients of every parameter of the optimizer (``p.grad = None``) for that step and the post-hook
  puts them back: torch optimizers (and the others, which follow torch's convention since
  ``zero_grad()`` sets gradients to None) leave a parameter without gradient untouched, momentum,
  weight decay, Adam moments and step counts included. An object that is not a torch optimizer
  and wraps none has its ``step`` wrapped instead, and a skip does not call it.
* :class:`SkipHold` (no attached optimizer, ``watch.check()``): a skip zeroes the gradients in
  place, so a hand-written update (``p.data.add_(p.grad, alpha=-lr)``) adds nothing and finds no
  None, and it hides them from any torch optimizer that steps before the next backward (a global
  step pre-hook), so momentum and Adam do not move on zeros either.
* :class:`BufferSnapshot`: a device copy of the model's buffers (BatchNorm statistics and any
  buffer forward writes) taken at every step that goes through and copied back on a skip. The
  forward pass updates buffers before anything could know the step will be skipped.

With a ``torch.amp.GradScaler``, the guard also wraps ``scaler.step`` to notice the steps the scaler
itself skips (inf/NaN found after unscaling), which never reach ``optimizer.step``.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_buffer_registration_hook
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

__all__ = ["BufferSnapshot", "SkipHold", "StepGuard", "optimizer_params"]


def _hook_target(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer whose step hooks run when ``optimizer.step()`` is called.

    Wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``) do not
    run hooks of their own; they call the torch optimizer they hold.
    """
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if (
            isinstance(optimizer, torch.optim.Optimizer)
            and "_optimizer_step_pre_hooks" in vars(optimizer)
            and getattr(type(optimizer).step, "hooked", False)
        ):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", getattr(optimizer, "_optimizer", None))
    return None


def optimizer_params(optimizer: Any) -> list[torch.Tensor] | None:
    """The parameters ``optimizer`` updates, or None when it does not say (no ``param_groups``)."""
    target = _hook_target(optimizer) or optimizer
    groups = getattr(target, "param_groups", None)
    if not isinstance(groups, list):
        return None
    return [p for g in groups if isinstance(g, dict) for p in g.get("params", ())]


class _Hidden:
    """Gradients taken away for one optimizer step (``p.grad = None``) and put back after it."""

    def __init__(self) -> None:
        self._taken: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hide(self, params: Iterable[torch.Tensor]) -> None:
        for p in params:
            if p.grad is not None:
                self._taken.append((p, p.grad))
                p.grad = None

    def restore(self) -> None:
        taken, self._taken = self._taken, []
        for p, grad in taken:
            if p.grad is None:  # the step did not make a gradient of its own (a closure)
                p.grad = grad


class StepGuard:
    """Runs a check before each step of the attached optimizer and skips the step when told to.

    Args:
        optimizer: The optimizer whose steps are guarded.
        before_step: Called before each step; returns False to skip it.
        scaler: A ``torch.amp.GradScaler`` stepping this optimizer, or None.
        on_scaler_skip: Called when ``scaler.step(optimizer)`` did not step the optimizer.
    """

    def __init__(
        self,
        optimizer: Any,
        before_step: Callable[[], bool],
        scaler: Any = None,
        on_scaler_skip: Callable[[], None] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.scaler = scaler
        self.active = True
        self._before_step = before_step
        self._stepped = False
        self._hidden = _Hidden()
        self._handles: list[Any] = []
        self._patched: list[tuple[object, types.MethodType, bool, Any]] = []
        target = _hook_target(optimizer)
        if target is not None:
            self._handles = [
                target.register_step_pre_hook(self._pre_hook),
                target.register_step_post_hook(self._post_hook),
            ]
        else:
            self._wrap_step(optimizer)
        if scaler is not None:
            self._wrap_scaler_step(scaler, on_scaler_skip)

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.active:
            self._stepped = True
            if not self._before_step():
                self._hidden.hide(p for g in optimizer.param_groups for p in g["params"])

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._hidden.restore()

    def _wrap_step(self, optimizer: Any) -> None:
        original_step = optimizer.step
        guard = self

        def step(opt: Any, *args: Any, **kwargs: Any) -> Any:
            if guard.active:
                guard._stepped = True
                if not guard._before_step():
                    return None
            return original_step(*args, **kwargs)

        self._patch(optimizer, types.MethodType(step, optimizer))

    def _wrap_scaler_step(self, scaler: Any, on_scaler_skip: Callable[[], None] | None) -> None:
        original_scaler_step = scaler.step
        guard = self

        def scaler_step(sc: Any, opt: Any, *args: Any, **kwargs: Any) -> Any:
            guard._stepped = False
            result = original_scaler_step(opt, *args, **kwargs)
            if guard.active and opt is guard.optimizer and not guard._stepped and on_scaler_skip:
                on_scaler_skip()
            return result

        self._patch(scaler, types.MethodType(scaler_step, scaler))

    def _patch(self, owner: object, method: types.MethodType) -> None:
        had_own = "step" in vars(owner)
        self._patched.append((owner, method, had_own, vars(owner).get("step")))
        owner.step = method  # type: ignore[attr-defined]

    def remove(self) -> None:
        """Remove the hooks and undo any wrapping; if something wrapped ``step`` after us, stay
        as a pass-through."""
        self.active = False
        self._hidden.restore()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for owner, ours, had_own, previous in self._patched:
            if vars(owner).get("step") is not ours:
                continue  # wrapped again after us: stay, as a pass-through
            if had_own:
                owner.step = previous  # type: ignore[attr-defined]
            else:
                del owner.step  # type: ignore[attr-defined]
        self._patched = []


class SkipHold:
    """Skips a step without an attached optimizer, for hand-written updates and torch optimizers.

    :meth:`skip` zeroes the gradients in place. Until the next backward reaches a watched
    parameter, every torch optimizer step (a global step pre-hook; a Python call per step, nothing
    else while no skip is pending) runs with those gradients hidden (``p.grad = None``) and gets
    the zeros back after. A skip decided inside an optimizer step (a ``closure``, as Lightning
    runs backward and the check) hides them at once from that step.

    Args:
        params: The watched parameters.
        arrived: True when a gradient arrived since the check (a new backward began).
    """

    def __init__(self, params: list[torch.Tensor], arrived: Callable[[], bool]) -> None:
        self._params = params
        self._arrived = arrived
        self._pending = False
        self._stepping: list[int] = []  # ids of optimizers inside step()
        self._hidden = _Hidden()
        this = weakref.ref(self)  # the global hooks must not keep the watcher alive
        self._handles = [
            register_optimizer_step_pre_hook(_Forward(this, "_pre")),
            register_optimizer_step_post_hook(_Forward(this, "_post")),
        ]
        weakref.finalize(self, _remove_all, self._handles)

    def skip(self) -> None:
        """Zero the gradients of a skipped step and keep torch optimizers from stepping on them."""
        grads = [p.grad for p in self._params if p.grad is not None]
        dense = [g for g in grads if g.layout == torch.strided]
        if dense:
            torch._foreach_zero_(dense)
        for g in grads:
            if g.layout != torch.strided:
                g.zero_()
        self._pending = True
        if self._stepping:
            self._hidden.hide(self._params)

    def clear(self) -> None:
        """A new step is being checked: nothing is held any more."""
        self._pending = False

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) not in self._stepping:
            self._stepping.append(id(optimizer))
        if self._pending:
            if self._arrived():
                self._pending = False
            else:
                self._hidden.hide(self._params)

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self._stepping:
            self._stepping.remove(id(optimizer))
        if not self._stepping:
            self._hidden.restore()

    def remove(self) -> None:
        """Remove the global hooks (idempotent)."""
        self._hidden.restore()
        _remove_all(self._handles)


class _Forward:
    """A global hook calling a method of an object it holds weakly (a no-op once it is gone)."""

    def __init__(self, owner: weakref.ReferenceType[Any], method: str) -> None:
        self._owner = owner
        self._method = method

    def __call__(self, *args: Any) -> None:
        owner = self._owner()
        if owner is not None:
            getattr(owner, self._method)(*args)


def _remove_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class BufferSnapshot:
    """The model's buffers as they were after the last step that went through, kept on device.

    :meth:`take` copies every buffer into its copy (one fused copy per device and dtype; no host
    sync) after a step went through; :meth:`restore` copies them back when a step is skipped, by
    which time forward has already written its statistics. Costs one copy of the buffers in
    memory (BatchNorm: 2 floats and a counter per channel) and one read and write of them per
    step. A buffer forward replaces (``self.buf = new``) or registers is seen through its
    identity and torch's global buffer-registration hook. One that cannot be put back (replaced by
    one of another shape or dtype, removed, or registered during the skipped step) is named in
    :meth:`restore`'s result.

    Args:
        module: The model.
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._build()
        hook = _Forward(weakref.ref(self), "_registered")  # global: must not keep us alive
        self._handles = [register_module_buffer_registration_hook(hook)]
        weakref.finalize(self, _remove_all, self._handles)

    def _registered(self, module: nn.Module, name: str, buffer: object) -> None:
        if id(module) in self._owners:
            self._dirty = True

    def mark_dirty(self) -> None:
        """The model's modules changed: look at every buffer again at the next call."""
        self._dirty = True

    def remove(self) -> None:
        """Remove the global hook (idempotent)."""
        _remove_all(self._handles)

    def _build(self) -> None:
        entries: list[tuple[str, nn.Module, str, torch.Tensor, torch.Tensor]] = []
        copies: dict[int, torch.Tensor] = {}  # a buffer shared by two modules is copied once
        groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
        with torch.no_grad():
            for prefix, owner in self._module.named_modules(remove_duplicate=False):
                for attr, buffer in owner._buffers.items():
                    if buffer is None:
                        continue
                    copy = copies.get(id(buffer))
                    if copy is None:
                        copy = copies[id(buffer)] = buffer.detach().clone()
                        dst, src = groups.setdefault((buffer.device, buffer.dtype), ([], []))
                        dst.append(copy)
                        src.append(buffer)
                    name = f"{prefix}.{attr}" if prefix else attr
                    entries.append((name, owner, attr, buffer, copy))
        self._entries = entries
        self._groups = list(groups.values())
        self._owners = {id(m) for m in self._module.modules()}
        self._dirty = False

    @property
    def nbytes(self) -> int:
        """Bytes held by the copies."""
        return sum(t.numel() * t.element_size() for dst, _ in self._groups for t in dst)

    def _current(self) -> bool:
        return all(
            owner._buffers.get(attr) is buffer for _, owner, attr, buffer, _ in self._entries
        )

    def take(self) -> None:
        """Copy the buffers as they are now (a step went through)."""
        if self._dirty or not self._current():
            self._build()
            return
        if not self._groups:
            return  # a model without buffers
        try:
            with torch.no_grad():
                for copies, buffers in self._groups:
                    torch._foreach_copy_(copies, buffers)
        except RuntimeError:  # a buffer changed shape in place (a lazy module materialised)
            self._build()

    def restore(self) -> list[str]:
        """Put the buffers back as :meth:`take` last saw them.

        Returns:
            Names of the buffers that could not be put back, each with the reason.
        """
        failed: list[str] = []
        with torch.no_grad():
            if self._current():
                for copies, buffers in self._groups:
                    try:
                        torch._foreach_copy_(buffers, copies)
                    except RuntimeError:  # e.g. an inference tensor: copy one by one below
                        failed += self._restore_each(buffers, copies)
            else:
                failed += self._restore_moved()
        if self._dirty:
            known = {name for name, *_ in self._entries}
            for name, _ in self._module.named_buffers(remove_duplicate=False):
                if name not in known:
                    failed.append(f"{name} (registered during the skipped step)")
        self._build()
        return failed

    def _restore_each(self, buffers: list[torch.Tensor], copies: list[torch.Tensor]) -> list[str]:
        names = {id(buffer): name for name, _, _, buffer, _ in self._entries}
        failed = []
        for buffer, copy in zip(buffers, copies):
            try:
                buffer.copy_(copy)
            except RuntimeError as error:
                failed.append(f"{names[id(buffer)]} ({str(error).splitlines()[0]})")
        return failed

    def _restore_moved(self) -> list[str]:
        failed = []
        for name, owner, attr, _, copy in self._entries:
            now = owner._buffers.get(attr)
            if now is None:
                failed.append(f"{name} (removed)")
            elif now.shape != copy.shape or now.dtype != copy.dtype:
                failed.append(
                    f"{name} (now {now.dtype} {tuple(now.shape)}, was "
                    f"{copy.dtype} {tuple(copy.shape)})"
                )
            else:
                try:
                    now.copy_(copy)  # replaced by a tensor of the same shape (or moved)
                except RuntimeError as error:
                    failed.append(f"{name} ({str(error).splitlines()[0]})")
        return failed
