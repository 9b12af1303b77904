"""How every call of a model's modules is seen, and where each call's values are written.

:func:`route_calls` puts a gate in each module's ``_compiled_call_impl`` slot (the slot
``Module.__call__`` tries first; pickles leave it out) that runs the module's own ``_call_impl``
and hands the call to a recorder; :func:`unroute_calls` takes the gates out again. On a torch whose
pickles keep that slot, one global module forward hook does the same. :class:`CallBuffer` holds
the min and max of each recorded call in one reused device buffer. Used by
:mod:`gradwatch.collect.activations`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

__all__ = ["MAX_CALLS", "CallBuffer", "route_calls", "unroute_calls"]

MAX_CALLS = 1 << 16
"""Module calls recorded per step at most (bounds memory if nobody checks)."""

_SLOT = "_compiled_call_impl"
"""The per-instance call slot of ``nn.Module`` that pickling leaves out."""

_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled
_compiling = torch.compiler.is_compiling
_aminmax = torch.aminmax


class CallBuffer:
    """The min and max of each recorded call, written by one kernel each into a reused buffer.

    Writing into preallocated views (``aminmax(out=...)``) spares a per-call allocation and the
    stacking of many small tensors at the end of the step.

    Args:
        device: Device of the buffer.
        dtype: Its dtype; tensors of another dtype or device take a slower path (two copies).
        calls: Initial capacity in calls (doubled when exceeded).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, calls: int) -> None:
        self.device = device
        self.dtype = dtype
        # Tensor.get_device() of a tensor on ``device`` (an int compare, no device object).
        self._index = -1 if device.type == "cpu" else (device.index or 0)
        self.calls: list[int] = []
        self._allocate(calls)

    def _allocate(self, calls: int) -> None:
        self.capacity = calls
        self.buffer = torch.zeros(2 * calls, device=self.device, dtype=self.dtype)
        self._pairs = [(self.buffer[2 * i], self.buffer[2 * i + 1]) for i in range(calls)]

    def _grow(self) -> bool:
        if self.capacity >= MAX_CALLS:
            return False
        old = self.buffer
        self._allocate(2 * self.capacity)
        self.buffer[: old.numel()].copy_(old)
        return True

    def skip(self, j: int) -> int:
        """Record call ``j`` without a value (its owner writes it later); its position or -1."""
        calls = self.calls
        c = len(calls)
        if c >= self.capacity and not self._grow():
            return -1
        calls.append(j)
        return c

    def record(self, j: int, t: Tensor) -> int:
        """Record call ``j``: the min and max of ``t`` (NaN/Inf propagate); its position, or -1
        if ``MAX_CALLS`` calls are recorded already."""
        calls = self.calls
        c = len(calls)
        if c >= self.capacity and not self._grow():
            return -1
        pair = self._pairs[c]
        # Gradient mode off rather than t.detach(): half the cost of the call on CPU. Backward
        # hooks run with it off already.
        grad = _grad_enabled()
        if grad:
            _set_grad_enabled(False)
        try:
            # aminmax: one fast kernel (the infinity norm is ~10x slower on CPU)
            if t.dtype is self.dtype and t.get_device() == self._index:
                _aminmax(t, out=pair)
            else:
                values = _aminmax(t)
                pair[0].copy_(values[0], non_blocking=True)
                pair[1].copy_(values[1], non_blocking=True)
        finally:
            if grad:
                _set_grad_enabled(True)
        calls.append(j)
        return c

    def take(self) -> tuple[Tensor, list[int]]:
        """This step's values (a view, to reduce before the next record) and calls."""
        calls, self.calls = self.calls, []
        return self.buffer[: 2 * len(calls)], calls


_Sink = tuple[Callable[[int, Any, Any], None], int]


def _gate(call: Callable[..., Any]) -> Callable[..., Any]:
    """A module's call slot: its own ``_call_impl``, then each recorder given the call."""
    sinks: list[_Sink] = []

    def gate(*args: Any, **kwargs: Any) -> Any:
        output = call(*args, **kwargs)
        if _grad_enabled() and not _compiling():  # not an evaluation, not traced by dynamo
            for record, j in sinks:
                record(j, args, output)
        return output

    gate.gradwatch_sinks = sinks  # type: ignore[attr-defined]
    return gate


def route_calls(
    modules: list[tuple[str, nn.Module]], record: Callable[[int, Any, Any], None]
) -> Any:
    """Hand every eager call of ``modules[j]`` to ``record(j, args, output)``; returns what
    :func:`unroute_calls` takes to undo it."""
    if not _slot_is_private():
        index = {id(module): j for j, (_, module) in enumerate(modules)}
        return torch_module.register_module_forward_hook(
            functools.partial(_global_hook, index, record)
        )
    routes: list[tuple[nn.Module, Any, _Sink]] = []
    skipped: set[int] = set()
    for j, (_, module) in enumerate(modules):
        if id(module) in skipped:
            continue
        gate = module.__dict__.get(_SLOT)
        compiled = gate is not None and not hasattr(gate, "gradwatch_sinks")
        if compiled or isinstance(module, nn.DataParallel):
            # Compiled in place: its calls run in a compiled graph. DataParallel: its replicas
            # copy their modules' __dict__, slot included, and would call the originals.
            skipped.update(id(m) for m in module.modules() if m is not module)
            if compiled:
                continue
        if gate is None:
            gate = module.__dict__[_SLOT] = _gate(module._call_impl)
        sink = (record, j)
        gate.gradwatch_sinks.append(sink)
        routes.append((module, gate, sink))
    return routes


def unroute_calls(routes: Any) -> None:
    """Undo :func:`route_calls` (idempotent); a slot the user set since (``compile()``) is kept."""
    if not isinstance(routes, list):
        routes.remove()  # the global hook
        return
    for module, gate, sink in routes:
        sinks = gate.gradwatch_sinks
        sinks[:] = [s for s in sinks if s is not sink]
        if not sinks and module.__dict__.get(_SLOT) is gate:
            del module.__dict__[_SLOT]
    routes.clear()


def _global_hook(
    index: dict[int, int], record: Callable[[int, Any, Any], None], module: Any, args: Any, out: Any
) -> None:
    j = index.get(id(module))
    if j is not None and _grad_enabled():
        record(j, args, out)


@functools.cache
def _slot_is_private() -> bool:
    """True if ``Module.__call__`` calls ``_compiled_call_impl`` and pickles leave it out."""
    module = nn.Module()
    called: list[Any] = []
    module.__dict__[_SLOT] = lambda *args, **kwargs: called.append(args)
    try:
        module()
        return bool(called) and _SLOT not in module.__getstate__()
    except Exception:
        return False
