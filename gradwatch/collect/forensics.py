"""What the diagnosis needs beyond gradient norms, collected on the device without host reads.

At every check :class:`StepProbe` takes a :class:`Probe` of the step:

* the attached optimizer's learning rates (host floats already; no device work);
* every ``WEIGHT_EVERY`` checks, the norm of every watched weight (one fused kernel per
  device/dtype group), written to a small device buffer mirrored to the host like the stats ring;
* with forensics on, an :class:`ActivationProbe` sample: the largest activation (max-abs of the
  output) of each hooked module call in forward order and the largest backpropagated signal
  (max-abs of the gradient of the output) of each call in backward order, reduced on the device
  to one row per step (per module), the per-call values kept aside on the device.

Nothing here reads a device value on the host during a step. Rows are read when the watcher emits
the step (from a host mirror, as the stats ring does); the per-call values, which locate the first
non-finite module, are only read when the step's gradients turned out non-finite.

The max-abs (infinity) norm is used for activations and signals because it is NaN- and
Inf-propagating and cannot overflow: a value is non-finite exactly when one element is.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch.collect.distributed import is_dtensor
from gradwatch.collect.norms import foreach_norms
from gradwatch.collect.params import WatchedParams
from gradwatch.collect.ring import StatsRing
from gradwatch.errors import ConfigTypeError

__all__ = ["ActivationProbe", "ActivationRow", "Probe", "StepProbe"]

WEIGHT_EVERY = 256
"""Checks between two samples of the weights' norms (they change slowly)."""

_MAX_CALLS = 1 << 16
"""Module calls recorded per step at most (bounds memory if nobody checks)."""


class Probe(NamedTuple):
    """What :meth:`StepProbe.capture` took at one check (host data and device row numbers).

    Attributes:
        lrs: Learning rate of each param group of the attached optimizer, or None.
        weights: Row number of the latest weight-norm sample, or -1.
        activations: Row number in the activation probe's buffer, or -1.
        forward_calls: Hooked-module index of each forward call, in call order.
        backward_calls: Hooked-module index of each backward signal, in arrival order.
        forward_values: Max-abs output of each forward call (device), read only if the step's
            gradients turn out non-finite.
        backward_values: Max-abs output gradient of each backward call (device), likewise.
    """

    lrs: tuple[float, ...] | None
    weights: int
    activations: int = -1
    forward_calls: Sequence[int] = ()
    backward_calls: Sequence[int] = ()
    forward_values: Tensor | None = None
    backward_values: Tensor | None = None


class ActivationRow(NamedTuple):
    """One step of an :class:`ActivationProbe`, on the host.

    Attributes:
        forward: Max-abs output of each hooked module (and the input, last), -1 if not called.
        backward: Max-abs gradient of each hooked module's output, -1 if none arrived.
    """

    forward: np.ndarray
    backward: np.ndarray


class ActivationProbe:
    """Forward hooks (and output-gradient hooks) recording max-abs activations and signals.

    Hooks every module that directly owns a watched parameter, in ``named_modules()`` order.
    Forward passes run with gradients disabled (evaluation) are not recorded. A module called
    several times in a step (an RNN cell over time, a shared layer, micro-batches) keeps the
    largest value; the first non-finite value is located over the individual calls. The hooks
    are Python: meant for eager mode (under ``torch.compile`` they break the graph).

    Args:
        model: The module whose submodules are hooked.
        watched: The watched parameters (decides which modules are hooked).
        device: Device of the statistics.
        dtype: Dtype of the statistics.
        capacity: Rows kept until the host reads them.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """

    def __init__(
        self,
        model: Any,
        watched: WatchedParams,
        device: torch.device,
        dtype: torch.dtype,
        capacity: int = 256,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(
                "forensics=True needs the model as an nn.Module (forward hooks go on its "
                f"submodules), got {type(model).__name__}"
            )
        ids = set(watched.position)
        chosen = [
            (name or type(module).__name__, module)
            for name, module in model.named_modules()
            if any(id(p) in ids for p in module.parameters(recurse=False))
        ]
        self.names = tuple(name for name, _ in chosen)
        self.types = tuple(type(module).__name__ for _, module in chosen)
        self.device = device
        self.dtype = dtype
        k = len(chosen)
        self._k = k
        self._ring = StatsRing(2 * k + 1, capacity, device, dtype)
        self._forward = _CallBuffer(device, dtype, 2 * (k + 1))
        self._backward = _CallBuffer(device, dtype, 2 * (k + 1))
        self._index: dict[tuple[int, ...], Tensor] = {}
        self._signal_hooks = [functools.partial(self._on_signal, j, 0) for j in range(k)]
        self._handles = [
            module.register_forward_hook(functools.partial(self._on_forward, j))
            for j, (_, module) in enumerate(chosen)
        ]

    # ------------------------------------------------------------------------- hooks

    def _on_forward(self, j: int, module: nn.Module, args: Any, output: Any) -> None:
        # Runs at every module call: kept to a few attribute reads, one kernel and one hook.
        forward = self._forward
        if len(forward.calls) >= _MAX_CALLS or not torch.is_grad_enabled():
            return
        out = output if type(output) is Tensor else _first_tensor(output)
        if out is None or not out.is_floating_point():
            return
        if not forward.calls:  # the first call of the step: also look at the model's input
            x = _first_tensor(args)
            if x is not None and x.is_floating_point():
                forward.record(self._k, x)
        forward.record(j, out)
        node = out.grad_fn
        if node is not None:
            # A pre-hook on the node that made the output receives the output's gradient; it is
            # ~4x cheaper to register than Tensor.register_hook (no Python bookkeeping).
            index = out.output_nr
            if index == 0:
                node.register_prehook(self._signal_hooks[j])
            else:
                node.register_prehook(functools.partial(self._on_signal, j, index))

    def _on_signal(self, j: int, index: int, grad_outputs: tuple[Tensor | None, ...]) -> None:
        grad = grad_outputs[index]
        if grad is not None and len(self._backward.calls) < _MAX_CALLS:
            self._backward.record(j, grad)

    # ---------------------------------------------------------------------- per step

    def capture(self, lrs: tuple[float, ...] | None, weights: int) -> Probe:
        """Reduce this step's recorded values into one device row; start the next step."""
        forward, forward_calls = self._forward.take()
        backward, backward_calls = self._backward.take()
        ring = self._ring
        number = -1
        with torch.no_grad():
            forward = self._per_call(forward, len(forward_calls))
            backward = self._per_call(backward, len(backward_calls))
            if ring.written - ring.read < ring.capacity:
                number, slot = ring.claim()
                row, k = slot.norms, self._k
                self._per_module(forward, forward_calls, row[: k + 1])
                self._per_module(backward, backward_calls, row[k + 1 :])
                ring.commit(number)
        return Probe(lrs, weights, number, forward_calls, backward_calls, forward, backward)

    @staticmethod
    def _per_call(values: Tensor, n: int) -> Tensor | None:
        """Max-abs of each call (a fresh tensor: kept, unread, in case the step goes bad)."""
        return values.view(n, 2).abs().amax(dim=1) if n else None

    def _per_module(self, largest: Tensor | None, calls: list[int], out: Tensor) -> None:
        """The largest max-abs of each module over its calls, -1 where it was not called."""
        out.fill_(-1.0)
        if largest is not None:
            out.scatter_reduce_(0, self._positions(calls), largest.to(out.dtype), "amax")

    def _positions(self, calls: list[int]) -> Tensor:
        key = tuple(calls)
        index = self._index.get(key)
        if index is None:
            if len(self._index) >= 16:
                self._index.clear()
            index = torch.tensor(key, dtype=torch.long).to(self.device, non_blocking=True)
            self._index[key] = index
        return index

    def read(self, number: int) -> ActivationRow | None:
        """The host copy of row ``number`` (waits for it on accelerators), or None if gone."""
        ring = self._ring
        if number < 0 or number < ring.written - ring.capacity:
            return None
        if not ring.ready(number):
            ring.wait(number)
        row = ring.host_row(number)[4:]
        return ActivationRow(row[: self._k + 1], row[self._k + 1 :])

    @staticmethod
    def first_nonfinite(probe: Probe) -> tuple[int | None, int | None]:
        """Module index of the first non-finite call in forward and in backward order.

        Reads the step's per-call values on the host: call it only for a step whose gradients
        are non-finite (the one place where forensics waits for the device). Index
        ``len(names)`` in forward order stands for the model's input.
        """
        return (
            _first_bad(probe.forward_values, probe.forward_calls),
            _first_bad(probe.backward_values, probe.backward_calls),
        )

    def release(self, number: int) -> None:
        """Rows up to ``number`` were read: their space may be reused."""
        self._ring.read = max(self._ring.read, number + 1)

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._forward.take()
        self._backward.take()


class _CallBuffer:
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
        self.calls: list[int] = []
        self._allocate(calls)

    def _allocate(self, calls: int) -> None:
        self.capacity = calls
        self.buffer = torch.zeros(2 * calls, device=self.device, dtype=self.dtype)
        self._slots = [self.buffer[i] for i in range(2 * calls)]

    def record(self, j: int, t: Tensor) -> None:
        """Record call ``j`` of this step: the min and max of ``t`` (NaN/Inf propagate)."""
        c = len(self.calls)
        if c >= self.capacity:
            old = self.buffer
            self._allocate(2 * self.capacity)
            self.buffer[: old.numel()].copy_(old)
        low, high = self._slots[2 * c], self._slots[2 * c + 1]
        # aminmax: one fast kernel (the infinity norm is ~10x slower on CPU)
        if t.dtype is self.dtype and t.device == self.device:
            torch.aminmax(t.detach(), out=(low, high))
        else:
            values = torch.aminmax(t.detach())
            low.copy_(values[0], non_blocking=True)
            high.copy_(values[1], non_blocking=True)
        self.calls.append(j)

    def take(self) -> tuple[Tensor, list[int]]:
        """This step's values (a view, to reduce before the next record) and calls."""
        calls, self.calls = self.calls, []
        return self.buffer[: 2 * len(calls)], calls


class StepProbe:
    """Takes a :class:`Probe` at every check: learning rates, weight norms, activations.

    Args:
        watched: The watched parameters.
        device: Device of the statistics (the first parameter's).
        dtype: Dtype of the statistics.
        activations: An :class:`ActivationProbe` (forensics on), or None.
    """

    def __init__(
        self,
        watched: WatchedParams,
        device: torch.device,
        dtype: torch.dtype,
        activations: ActivationProbe | None = None,
    ) -> None:
        self.watched = watched
        self.activations = activations
        self.device = device
        self.dtype = dtype
        self._weights = StatsRing(len(watched), 8, device, dtype)
        self._samples: dict[int, np.ndarray] = {}
        self.captures = 0
        layout: dict[tuple[object, ...], list[int]] = {}
        for i, p in enumerate(watched.params):
            layout.setdefault(_group_key(p), []).append(i)
        self._layout = list(layout.values())
        flat = [i for idx in self._layout for i in idx]
        self._order = None if flat == list(range(len(flat))) else torch.tensor(flat, device=device)
        self._optimizer: Any = None
        self._n_groups = 0
        self.groups = np.full(len(watched), -1, dtype=np.intp)
        self.rule: str | None = None

    def capture(self, guard: Any) -> Probe:
        """Take this check's probe (device work only; never reads a device value)."""
        if self.captures % WEIGHT_EVERY == 0:
            self._sample_weights()
        self.captures += 1
        lrs = self._lrs(getattr(guard, "optimizer", None))
        weights = self._weights.written - 1
        if self.activations is None:
            return Probe(lrs, weights)
        return self.activations.capture(lrs, weights)

    def _lrs(self, optimizer: Any) -> tuple[float, ...] | None:
        if optimizer is None:
            return None
        groups = optimizer.param_groups
        if optimizer is not self._optimizer or len(groups) != self._n_groups:
            self._bind_optimizer(optimizer)
        lrs = tuple(group.get("lr") for group in groups)
        if not all(isinstance(lr, (int, float)) for lr in lrs):
            return None  # a tensor learning rate would need a host read
        return lrs  # type: ignore[return-value]

    def _bind_optimizer(self, optimizer: Any) -> None:
        self._optimizer = optimizer
        self._n_groups = len(optimizer.param_groups)
        self.groups = np.full(len(self.watched), -1, dtype=np.intp)
        position = self.watched.position
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                i = position.get(id(p))
                if i is not None:
                    self.groups[i] = g
        self.rule = _update_rule(optimizer)

    def _sample_weights(self) -> None:
        ring = self._weights
        if ring.written - ring.read >= ring.capacity:
            ring.read = ring.written - ring.capacity + 1  # drop the oldest unread sample
        number, slot = ring.claim()
        params = self.watched.params
        with torch.no_grad():
            norms = torch.cat([_norms([params[i] for i in idx]) for idx in self._layout])
            norms = norms.to(self.device, self.dtype, non_blocking=True)
            if self._order is None:
                slot.norms.copy_(norms)
            else:
                slot.norms.index_copy_(0, self._order, norms)
        ring.commit(number)

    def weights(self, number: int) -> np.ndarray | None:
        """Weight norms of sample ``number`` on the host, or None if no sample is there yet.

        Never waits: a sample whose copy has not completed falls back to the newest one that has.
        """
        ring = self._weights
        while ring.read < ring.written and ring.ready(ring.read):
            self._samples[ring.read] = ring.host_row(ring.read)[4:].astype(np.float64)
            ring.read += 1
        while len(self._samples) > 4:
            del self._samples[min(self._samples)]
        known = [n for n in self._samples if n <= number]
        return self._samples[max(known)] if known else None

    def latest_weights(self) -> np.ndarray | None:
        """The newest weight-norm sample on the host (for a checkpoint), or None."""
        return self.weights(self._weights.written - 1)

    def restore(self, captures: int, weights: np.ndarray | None) -> None:
        """Continue a run: its capture count (the sampling schedule) and newest weight sample."""
        self.captures = captures
        self._samples = {} if weights is None else {-1: np.asarray(weights, dtype=np.float64)}

    def remove(self) -> None:
        """Remove the activation hooks, if any (idempotent)."""
        if self.activations is not None:
            self.activations.remove()


def _update_rule(optimizer: Any) -> str | None:
    """How an update's size follows from lr: ``"sgd"`` (lr·‖g‖), ``"adaptive"`` (≈ lr per
    coordinate) or None (unknown)."""
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    adaptive = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)
    if isinstance(optimizer, adaptive) or "betas" in optimizer.param_groups[0]:
        return "adaptive"
    return None


def _group_key(param: Tensor) -> tuple[object, ...]:
    """Tensors that one foreach kernel (and, sharded, one all-reduce) can reduce together."""
    if is_dtensor(param):
        mesh = param.device_mesh  # type: ignore[attr-defined]
        return (param.to_local().device, param.dtype, id(mesh), tuple(param.placements))  # type: ignore[attr-defined]
    return (param.device, param.dtype, None, None)


def _norms(tensors: list[Tensor]) -> Tensor:
    """Norm of each (full) tensor of one group; FSDP2 shards: one all-reduce for the group.

    Every rank samples on the same schedule (every ``WEIGHT_EVERY`` checks), so the collectives
    line up.
    """
    if is_dtensor(tensors[0]):
        half = tensors[0].dtype in (torch.float16, torch.bfloat16)
        norms = torch._foreach_norm(tensors, 2.0, dtype=torch.float32 if half else None)
        return torch.stack(list(norms)).full_tensor()
    return torch.stack(foreach_norms(tensors[0].device, tensors, 2.0))


def _first_bad(values: Tensor | None, calls: list[int]) -> int | None:
    if values is None:
        return None
    finite = np.isfinite(values.detach().cpu().numpy())  # a non-finite step: a read is allowed
    bad = np.flatnonzero(~finite)
    return calls[int(bad[0])] if bad.size else None


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, Tensor):
                return item
    return None
