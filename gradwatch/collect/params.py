"""Which parameters a watcher sees and what they are called.

Parameters are named by ``named_parameters()`` (tied parameters appear once, under their first
name), frozen parameters are left out, buffers are never parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gradwatch.errors import ConfigError, ConfigTypeError

__all__ = ["WatchedParams", "resolve_params"]


class WatchedParams:
    """The watched parameters with their names and owning module types.

    Attributes:
        names: Parameter names, in ``named_parameters()`` order.
        params: The parameters, same order.
        owner_types: Class name of the module that owns each parameter (e.g. ``"Linear"``).
    """

    def __init__(
        self, names: list[str], params: list[torch.Tensor], owner_types: list[str]
    ) -> None:
        self.names = tuple(names)
        self.params = params
        self.owner_types = tuple(owner_types)
        self.position = {id(p): i for i, p in enumerate(params)}

    def __len__(self) -> int:
        return len(self.params)


def resolve_params(model: object) -> WatchedParams:
    """The trainable parameters of ``model``.

    Args:
        model: An ``nn.Module``, or an iterable of ``(name, parameter)`` pairs such as
            ``model.named_parameters()``.

    Raises:
        TypeError: ``model`` is neither.
        ValueError: It has no parameter that requires a gradient, or one lives on the meta device.
    """
    owner_types: dict[int, str] = {}
    if isinstance(model, nn.Module):
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
            raise ConfigTypeError(
                f"model must yield (name, parameter) pairs, got {item!r} ({type(item).__name__})"
            )
        name, p = item
        if id(p) in seen or not p.requires_grad:
            continue
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
    return WatchedParams(names, params, [owner_types.get(id(p), "") for p in params])
