"""Which parameters a watcher sees and what they are called.

Parameters are named by ``named_parameters()`` (tied parameters appear once, under their first
name), frozen parameters are left out, buffers are never parameters.
"""

from __future__ import annotations

import reprlib
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gradwatch.errors import ConfigError, ConfigTypeError
from gradwatch.records import ParamInfo

__all__ = ["ParamChanges", "WatchedParams", "resolve_params"]


class WatchedParams:
    """The watched parameters with their names and owning module types.

    Attributes:
        names: Parameter names, in ``named_parameters()`` order.
        params: The parameters, same order.
        owner_types: Class name of the module that owns each parameter (e.g. ``"Linear"``).
        modules: ``(name, class name)`` of every module of the model in ``named_modules()``
            order, parameter-free ones included (empty when given bare parameters): what the
            diagnosis knows of the architecture (activations, normalisation, recurrence).
    """

    def __init__(
        self,
        names: list[str],
        params: list[torch.Tensor],
        owner_types: list[str],
        modules: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.names = tuple(names)
        self.params = params
        self.owner_types = tuple(owner_types)
        self.modules = modules
        self.position = {id(p): i for i, p in enumerate(params)}

    def __len__(self) -> int:
        return len(self.params)

    def infos(self) -> tuple[ParamInfo, ...]:
        """Name, shape and dtype of each watched parameter, as plain data."""
        return tuple(
            ParamInfo(n, tuple(p.shape), str(p.dtype).replace("torch.", ""))
            for n, p in zip(self.names, self.params)
        )


def resolve_params(model: object) -> WatchedParams:
    """The trainable parameters of ``model``.

    Args:
        model: An ``nn.Module``, or an iterable of ``(name, parameter)`` pairs such as
            ``model.named_parameters()``.

    Raises:
        TypeError: ``model`` is neither.
        ValueError: It has no parameter that requires a gradient, or one lives on the meta device
            or is not initialised yet (a lazy module before its first forward).
    """
    owner_types: dict[int, str] = {}
    modules: tuple[tuple[str, str], ...] = ()
    if isinstance(model, nn.Module):
        modules = tuple((name, type(m).__name__) for name, m in model.named_modules())
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owner_types.setdefault(id(p), type(module).__name__)
        named: Iterable[tuple[str, torch.Tensor]] = model.named_parameters()
        what = f"model ({type(model).__name__})"
    elif isinstance(model, Iterable) and not isinstance(model, (str, bytes, torch.Tensor)):
        named = model
        what = "named parameters"
    else:
        raise ConfigTypeError(
            "model must be a torch.nn.Module or an iterable of (name, parameter) pairs, "
            f"got {type(model).__name__}"
        )
    names: list[str] = []
    params: list[torch.Tensor] = []
    seen: set[int] = set()
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise ConfigTypeError(_not_a_pair(item))
        name, p = item
        if id(p) in seen or not p.requires_grad:
            continue
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ConfigError(
                f"parameter {name!r} is not initialised yet (a lazy module such as LazyLinear): "
                "run one forward pass with a sample batch before creating the GradWatch"
            )
        if p.is_meta:
            raise ConfigError(
                f"parameter {name!r} is on the meta device and can never have a gradient; "
                "materialise the model first (e.g. model.to_empty(device=...) then initialise it)"
            )
        seen.add(id(p))
        names.append(str(name))
        params.append(p)
    if not params:
        raise ConfigError(
            f"{what} has no parameter with requires_grad=True, so there is no gradient to watch"
        )
    return WatchedParams(names, params, [owner_types.get(id(p), "") for p in params], modules)


def _not_a_pair(item: object) -> str:
    """Why an element of ``model`` is not a (name, parameter) pair, and what to pass instead."""
    if isinstance(item, torch.Tensor):
        return (
            "model must be an nn.Module or yield (name, parameter) pairs, got a bare "
            f"{_describe(item)} without a name (from model.parameters()?): pass the model "
            "itself, GradWatch(model), or GradWatch(model.named_parameters()), so that every "
            "gradient is reported under its name"
        )
    shown = reprlib.repr(item)
    if isinstance(item, tuple):
        shown = "(" + ", ".join(_describe(v) for v in item) + ")"
    hint = " (a dict? pass its .items())" if isinstance(item, str) else ""
    return (
        f"model must yield (name, parameter) pairs, got {shown} ({type(item).__name__}){hint}; "
        "pass the model itself or model.named_parameters()"
    )


def _describe(value: object) -> str:
    """A tensor as its kind and shape, never its values; anything else as a short repr."""
    if isinstance(value, torch.Tensor):
        kind = "Parameter" if isinstance(value, nn.Parameter) else "tensor"
        return f"{kind} of shape {tuple(value.shape)}"
    return reprlib.repr(value)


class ParamChanges:
    """Notices, at almost no cost per step, when the watched parameters may be out of date.

    Four things make them so after the watcher was created: a module or parameter registered in
    the model (``model.head = nn.Linear(...)``, ``load_state_dict(..., assign=True)``), a frozen
    parameter unfrozen, or the model moved to another dtype or device (``model.double()``,
    ``model.to("cuda")``). Registrations are seen through torch's global registration hooks
    (filtered to this model's modules); the rest is checked at every :meth:`changed` call by
    reading the first watched parameter's dtype and device and the frozen parameters'
    ``requires_grad`` flags. A partial move (one submodule only) is caught at the next
    registration or by :meth:`changed` every ``full_every`` calls, which compares every
    parameter.

    Args:
        model: The model (None when the watcher was given named parameters: only moves of the
            given parameters are noticed then).
        watched: The parameters watched now.
        full_every: Calls between two full comparisons of every parameter.
    """

    def __init__(self, model: nn.Module | None, watched: WatchedParams, full_every: int = 256):
        self._model = model
        self._full_every = full_every
        self._calls = 0
        self.dirty = False
        self._handles: list[Any] = []
        self.track(watched)
        if model is not None:
            from torch.nn.modules import module as torch_module

            hook = _RegistrationHook(weakref.ref(self))  # the global hook must not keep us alive
            self._handles = [
                torch_module.register_module_parameter_registration_hook(hook),
                torch_module.register_module_module_registration_hook(hook),
            ]
            weakref.finalize(self, _remove_all, self._handles)

    def track(self, watched: WatchedParams) -> None:
        """Take ``watched`` as the current parameters (after a rebind, or to accept a change)."""
        self._watched = watched
        self._first = watched.params[0]
        self._key = (self._first.dtype, self._first.device)
        self._layout = [(p.dtype, p.device) for p in watched.params]
        model = self._model
        self._modules = set() if model is None else {id(m) for m in model.modules()}
        params = [] if model is None else model.parameters()
        self._frozen = [p for p in params if not p.requires_grad]
        self.dirty = False

    @property
    def layout(self) -> list[tuple[torch.dtype, torch.device]]:
        """(dtype, device) of each tracked parameter when it was tracked."""
        return self._layout

    def accept(self) -> None:
        """Stop reporting the current change (the watcher warned and keeps its parameters)."""
        self.track(self._watched)

    def _registered(self, module: nn.Module) -> None:
        if id(module) in self._modules:
            self.dirty = True

    def changed(self) -> bool:
        """True if the parameters may differ from the watched ones (then call :meth:`resolve`)."""
        first = self._first
        if self.dirty or first.dtype is not self._key[0] or first.device != self._key[1]:
            return True
        if self._frozen and any(p.requires_grad for p in self._frozen):
            return True
        self._calls += 1
        if self._calls % self._full_every == 0:
            return [(p.dtype, p.device) for p in self._watched.params] != self._layout
        return False

    def resolve(self) -> WatchedParams:
        """The model's trainable parameters now (the given ones when there is no model)."""
        if self._model is None:
            return self._watched
        return resolve_params(self._model)

    def remove(self) -> None:
        """Remove the global registration hooks."""
        _remove_all(self._handles)


class _RegistrationHook:
    """Marks a :class:`ParamChanges` dirty when a module of its model registers something."""

    def __init__(self, owner: weakref.ReferenceType[ParamChanges]) -> None:
        self._owner = owner

    def __call__(self, module: nn.Module, name: str, value: object) -> None:
        owner = self._owner()
        if owner is not None:
            owner._registered(module)


def _remove_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
