"""Clippers: objects that rescale or clamp gradients in place, deciding on the device.

Every clipper implements one method, :meth:`Clipper.clip_`, which receives the step's gradients and
the norms gradwatch already computed for monitoring (so clipping costs no second read pass for
norm-based rules), scales the gradients in place, and writes into ``out`` the factor by which the
global norm changed. No clipper reads a value back to the host: coefficients are clamped on the
device and multiplied in, exactly as ``torch.nn.utils.clip_grad_norm_`` does.

Adaptive clippers (z-score, percentile, unit-wise) follow the same protocol and keep their state on
the device; they live in their own modules.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from gradwatch.collect.norms import GradBatch, has_foreach
from gradwatch.errors import ConfigError
from gradwatch.validation import check_norm_type, check_positive

__all__ = ["ClipNorm", "ClipValue", "Clipper"]

EPS = 1e-6
"""Added to the norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` does."""


class Clipper:
    """Base class of gradient clippers.

    A clipper declares its settings once, as :attr:`settings` (names of its attributes): its
    :meth:`config` and ``repr`` are derived from them. A clipper that keeps state across steps
    declares it as :attr:`state_keys` and builds it in :meth:`initial_state`: the state is one
    dict of device tensors, allocated on the first step where the norms live, moved with them,
    and saved and restored by :meth:`state_dict` and :meth:`load_state_dict`.

    Attributes:
        norm_type: Order of the global norm passed to :meth:`clip_` (the watcher computes it once
            and shares it with monitoring).
        settings: Names of the attributes that are the clipper's settings.
        state_keys: Names of the state tensors (empty for a stateless clipper).
    """

    norm_type: float = 2.0
    settings: ClassVar[tuple[str, ...]] = ()
    state_keys: ClassVar[tuple[str, ...]] = ()
    _state: dict[str, Tensor] | None = None

    def clip_(self, batch: GradBatch, total_norm: Tensor, param_norms: Tensor, out: Tensor) -> None:
        """Clip ``batch``'s gradients in place.

        Args:
            batch: The gradients present at this step, grouped by device and dtype.
            total_norm: Global norm of order :attr:`norm_type` before clipping (0-d, on device).
            param_norms: L2 norm of each watched parameter's gradient (0 where absent).
            out: 0-d tensor to receive the factor by which the global norm was scaled.
        """
        raise NotImplementedError

    def bind(self, named_params: Iterable[tuple[str, Tensor]]) -> Clipper:
        """Learn the watched parameters' names (the watcher calls this once); returns self.

        Clippers that refer to parameters by name (e.g. to exclude a classifier) resolve them here.
        """
        return self

    def initial_state(self, like: Tensor) -> dict[str, Tensor]:
        """A stateful clipper's state before its first step, on ``like``'s device and dtype."""
        raise NotImplementedError(f"{type(self).__name__} keeps no state")

    def state_on(self, like: Tensor) -> dict[str, Tensor]:
        """The state on ``like``'s device, floats in its dtype (allocated or moved once)."""
        state = self._state
        if state is None:
            state = self._state = self.initial_state(like)
        elif any(_needs_move(v, like) for v in state.values()):
            state = self._state = {k: _moved(v, like) for k, v in state.items()}
        return state

    def state_dict(self) -> dict[str, Any]:
        """Copies of the state tensors ({} for a stateless clipper or before the first step)."""
        return {} if self._state is None else {k: v.clone() for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; moved to the norms' device on the next step.

        Raises:
            ValueError: The clipper is stateless, or a key is missing or malformed.
        """
        name = type(self).__name__
        if not self.state_keys:
            if state:
                raise ValueError(f"{name} is stateless, got state keys {sorted(state)}")
            return
        if not state:
            self._state = None
            return
        missing = [k for k in self.state_keys if k not in state]
        if missing:
            raise ConfigError(f"{name} state is missing {missing[0]!r}, got keys {sorted(state)}")
        loaded = {k: torch.as_tensor(state[k]).detach().clone() for k in self.state_keys}
        self._state = self.loaded_state(loaded)

    def loaded_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A state about to be loaded, checked (a ConfigError names what is wrong) and brought
        to the dtypes :meth:`clip_` uses. Stateful clippers override it."""
        return state

    def config(self) -> dict[str, Any]:
        """The clipper's settings as plain values, for run headers."""
        return {"name": type(self).__name__, **{n: _plain(getattr(self, n)) for n in self.settings}}

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.settings)
        return f"{type(self).__name__}({args})"


def _needs_move(value: Tensor, like: Tensor) -> bool:
    return value.device != like.device or (value.is_floating_point() and value.dtype != like.dtype)


def _moved(value: Tensor, like: Tensor) -> Tensor:
    return value.to(like.device, like.dtype if value.is_floating_point() else value.dtype)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def scale_(batch: GradBatch, coef: Tensor) -> None:
    """Multiply every gradient in ``batch`` by the 0-d tensor ``coef`` (one kernel per group).

    Sparse gradients are scaled one by one (``mul_`` scales their stored values; duplicates of
    an index scale with them, so the dense equivalent is scaled exactly).
    """
    for group in batch.groups:
        device, grads = group.device, group.grads
        factor = coef if coef.device == device else coef.to(device, non_blocking=True)
        if has_foreach(device) and not group.sparse:
            torch._foreach_mul_(grads, factor)
        else:
            for g in grads:
                g.mul_(factor)


class ClipNorm(Clipper):
    """Rescale gradients so their global norm is at most ``max_norm``.

    Numerically identical to ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)``: the
    same norm, the same coefficient ``min(max_norm / (norm + 1e-6), 1)``, the same gradients.
    Sparse gradients, which ``clip_grad_norm_`` rejects (torch 2.13 has no sparse
    ``linalg.vector_norm``), are scaled as ``clip_grad_norm_`` scales their dense equivalent.

    Args:
        max_norm: Largest allowed global norm, a finite number > 0.
        norm_type: Order of the norm (> 0, or ``float("inf")``).

    Raises:
        ValueError: ``max_norm`` or ``norm_type`` is out of range.
    """

    settings = ("max_norm", "norm_type")

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = check_positive("ClipNorm(max_norm)", max_norm)
        self.norm_type = check_norm_type("ClipNorm(norm_type)", norm_type)

    def clip_(self, batch: GradBatch, total_norm: Tensor, param_norms: Tensor, out: Tensor) -> None:
        torch.add(total_norm, EPS, out=out)
        out.reciprocal_().mul_(self.max_norm).clamp_(max=1.0)
        scale_(batch, out)


class ClipValue(Clipper):
    """Clamp every gradient element to ``[-clip_value, clip_value]``.

    Identical to ``torch.nn.utils.clip_grad_value_``. Reports the resulting change of the global
    norm as the clip coefficient, which costs one extra read of the gradients.

    Sparse gradients, which ``clip_grad_value_`` rejects (torch has no sparse clamp), are
    coalesced in place and their values clamped: the result is ``clip_grad_value_`` of the dense
    equivalent, still sparse.

    Args:
        clip_value: Largest allowed absolute value, a finite number > 0.
    """

    settings = ("clip_value",)

    def __init__(self, clip_value: float) -> None:
        self.clip_value = check_positive("ClipValue(clip_value)", clip_value)

    def bind(self, named_params: Iterable[tuple[str, Tensor]]) -> Clipper:
        """Refuse complex parameters now: an order on complex values does not exist."""
        for name, p in named_params:
            if p.is_complex():
                raise ConfigError(
                    f"ClipValue cannot clamp the complex gradient of parameter {name!r} "
                    f"({str(p.dtype).replace('torch.', '')}): complex numbers have no order "
                    "(torch's clip_grad_value_ fails on them too); use ClipNorm, which scales "
                    "them by their magnitude"
                )
        return self

    def clip_(self, batch: GradBatch, total_norm: Tensor, param_norms: Tensor, out: Tensor) -> None:
        for group in batch.groups:
            grads = group.grads
            if group.sparse:
                for g in grads:
                    _clamp_sparse_(g, self.clip_value)
            elif has_foreach(group.device):
                torch._foreach_clamp_min_(grads, -self.clip_value)
                torch._foreach_clamp_max_(grads, self.clip_value)
            else:
                for g in grads:
                    g.clamp_(min=-self.clip_value, max=self.clip_value)
        after = batch.total_norm(self.norm_type, out.device, out.dtype)
        # after / before, and 1 where nothing changed (also covers a zero norm).
        torch.div(after, total_norm, out=out)
        out.masked_fill_(after == total_norm, 1.0)


def _clamp_sparse_(grad: Tensor, clip_value: float) -> None:
    """Clamp a gradient in place; a sparse one is coalesced first (in place, same tensor).

    Clamping acts on each element of the dense equivalent, so duplicate indices must be summed
    before clamping (clamping each duplicate would let their sum exceed ``clip_value``).
    """
    if not grad.is_sparse:
        grad.clamp_(min=-clip_value, max=clip_value)
        return
    if not grad.is_coalesced():
        grad.copy_(grad.coalesce())
    grad._values().clamp_(min=-clip_value, max=clip_value)
