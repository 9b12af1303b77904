"""Forensics: the largest activation and backpropagated signal of every module call, on device.

:class:`ActivationProbe` sees every call of every module of one model (parameter-free ones,
containers and the root included) and nothing else. Each module's ``_compiled_call_impl`` (the
slot ``Module.__call__`` tries first, set by ``module.compile()``) holds a gate that runs the
module's own ``_call_impl`` and then records the call. ``Module.__getstate__`` leaves that slot
out of a pickle, so ``torch.save(model)`` writes the same bytes as without gradwatch and a
``weights_only=True`` load still works (per-module hooks are pickled with the model); and no
global module hook exists, so other models run untouched and ``torch.compile`` has nothing to
warn about. A model run through ``torch.compile`` is not recorded: dynamo calls the modules'
``_call_impl`` itself, inside the compiled graph (a Python hook there would break the graph).
On a torch whose pickles keep the slot, one global module forward hook is used instead.

For each call it records the max-abs of the output (forward order) and, through a pre-hook on
the output's ``grad_fn``, the max-abs of the output's gradient (backward order), into reused
device buffers reduced to one row per step. Two rules keep the record exact and cheap:

* A call whose output *is* a tensor already recorded this step (a ``Sequential`` returning its
  last child's output, an ``nn.Identity``) is not recorded again: the module takes that
  record's value (an alias), and the first non-finite call stays the child that made it.
* A call whose input is *not* a recorded tensor got it from its parent's own code (``x + f(x)``,
  ``torch.log`` between two children): that input is recorded too, on behalf of the parent, so a
  NaN made between children is blamed on the parent, not on the next child. At the root the
  unrecorded input is the model's input.

Nothing here reads a device value on the host during a step; :meth:`ActivationProbe.
first_nonfinite` reads the per-call values, only for a step whose gradients are non-finite.
The max-abs (infinity) norm is NaN- and Inf-propagating and cannot overflow.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch.collect.calls import route_calls, unroute_calls
from gradwatch.collect.params import WatchedParams
from gradwatch.collect.recorder import CallRecorder, Taken
from gradwatch.collect.ring import StatsRing
from gradwatch.errors import ConfigTypeError

__all__ = ["ActivationProbe", "ActivationRow", "Probe"]

_Plan = tuple[Tensor | None, ...]
"""Index tensors of one pattern of calls (see :meth:`ActivationProbe._plan`)."""


class Probe(NamedTuple):
    """What :meth:`~gradwatch.collect.forensics.StepProbe.capture` took at one check.

    Attributes:
        lrs: Learning rate of each param group of the attached optimizer, or None.
        weights: Row number of the latest weight-norm sample, or -1.
        activations: Row number in the activation probe's buffer, or -1.
        forward_calls: Module index of each forward record, in call order (``len(names)`` for
            the model's input; a container's index for a value its own code made).
        backward_calls: Module index of each backward signal, in arrival order.
        forward_values: Max-abs of each forward record (device), read only if the step's
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
        forward: Max-abs output of each module (and the input, last), -1 if not called.
        backward: Max-abs gradient of each module's output, -1 if none arrived.
    """

    forward: np.ndarray
    backward: np.ndarray


class ActivationProbe:
    """Max-abs activations and backpropagated signals of every module call of ``model``.

    Every module of ``model.named_modules()`` is watched (the root named by its class name).
    Forward passes run with gradients disabled (evaluation) are not recorded. A module called
    several times in a step (an RNN cell over time, a shared layer, micro-batches) keeps the
    largest value; the first non-finite value is located over the individual calls. Calls made
    inside a compiled graph are not recorded: those of a model run through ``torch.compile``,
    of a module compiled in place (``module.compile()``) and of its children. Neither are the
    children of an ``nn.DataParallel`` (its replicas run them); watch a
    ``DistributedDataParallel`` model instead.

    Args:
        model: The module whose calls are recorded.
        watched: The watched parameters (kept for the signature; every module is watched).
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
                "forensics=True needs the model as an nn.Module (its module calls are "
                f"recorded), got {type(model).__name__}"
            )
        modules = list(model.named_modules())
        self.names = tuple(name or type(module).__name__ for name, module in modules)
        self.types = tuple(type(module).__name__ for _, module in modules)
        self.device = device
        self.dtype = dtype
        k = len(modules)
        self._k = k
        self._ring = StatsRing(2 * k + 2, capacity, device, dtype)  # and a scratch column
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        relus = [type(module) is nn.ReLU for _, module in modules]
        self._recorder = CallRecorder(_parents(modules), relus, device, dtype)
        # The routes hold the recorder only: a dropped probe is collected and unroutes.
        self._finalizer = weakref.finalize(
            self, unroute_calls, route_calls(modules, self._recorder.record)
        )

    # ---------------------------------------------------------------------- per step

    def capture(self, lrs: tuple[float, ...] | None, weights: int) -> Probe:
        """Reduce this step's recorded values into one device row; start the next step."""
        taken = self._recorder.take()
        forward_calls, backward_calls = taken.forward_calls, taken.backward_calls
        ring = self._ring
        number = -1
        # No gradient mode to switch off: the buffers never require a gradient.
        plan = self._plan(taken)
        if plan[6] is not None:  # ReLU outputs: relu of their input's min and max
            pairs = taken.forward.view(-1, 2)
            pairs.index_copy_(0, plan[6], pairs.index_select(0, plan[7]).clamp_min_(0.0))
        forward = _per_call(taken.forward, len(forward_calls))
        backward = _per_call(taken.backward, len(backward_calls))
        if ring.written - ring.read < ring.capacity:
            number, slot = ring.claim()
            self._reduce(plan, forward, backward, slot.norms)
            ring.commit(number)
        return Probe(lrs, weights, number, forward_calls, backward_calls, forward, backward)

    @staticmethod
    def _reduce(plan: _Plan, forward: Tensor | None, backward: Tensor | None, row: Tensor) -> None:
        """The largest value of each module over its calls into ``row``, -1 where none.

        ``row`` is ``[forward (k modules, then the input) | backward (k) | scratch]``. Values a
        container's code passed to a child go to the scratch column: the row holds outputs. A
        module that returned a recorded tensor (an alias) takes that record's module's values,
        forward and backward. Five kernels, with index tensors cached per pattern of calls.
        """
        row.fill_(-1.0)
        if forward is not None:
            row.scatter_reduce_(0, plan[0], forward, "amax")
        if backward is not None:
            row.scatter_reduce_(0, plan[1], backward, "amax")
        if plan[2] is not None:
            row.scatter_reduce_(0, plan[2], row.index_select(0, plan[3]), "amax")
        if plan[4] is not None and forward is not None:  # an alias of a container's value
            row.scatter_reduce_(0, plan[4], forward.index_select(0, plan[5]), "amax")

    def _plan(self, taken: Taken) -> _Plan:
        """Index tensors for :meth:`_reduce`, cached per pattern of calls (it repeats)."""
        forward, inputs, aliases, derived = (
            taken.forward_calls,
            taken.inputs,
            taken.aliases,
            taken.derived,
        )
        key = (
            tuple(forward),
            tuple(sorted(inputs)),
            tuple(aliases),
            tuple(taken.backward_calls),
            tuple(derived.items()),
        )
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        k = self._k
        own = {c for c in inputs if forward[c] != k}  # values a container made, not outputs
        lists: list[list[int] | None] = [
            [2 * k + 1 if c in own else j for c, j in enumerate(forward)],
            [k + 1 + j for j in taken.backward_calls],
        ]
        # An alias takes its source module's values (forward and backward) from the row...
        pairs = {(j, forward[c]): None for j, c in aliases if c not in own and forward[c] != j}
        back = [(j, s) for j, s in pairs if s < k]
        lists += [[j for j, _ in pairs] + [k + 1 + j for j, _ in back]] if pairs else [None]
        lists += [[s for _, s in pairs] + [k + 1 + s for _, s in back]] if pairs else [None]
        # ... or, when it returned a value its container made, that call's value.
        made = [(j, c) for j, c in aliases if c in own]
        lists += [[j for j, _ in made], [c for _, c in made]] if made else [None, None]
        lists += [list(derived), list(derived.values())] if derived else [None, None]
        if len(self._plans) >= 16:
            self._plans.clear()
        plan = tuple(
            None
            if values is None
            else torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
            for values in lists
        )
        self._plans[key] = plan
        return plan

    def read(self, number: int) -> ActivationRow | None:
        """The host copy of row ``number`` (waits for it on accelerators), or None if gone."""
        ring = self._ring
        if number < 0 or number < ring.written - ring.capacity:
            return None
        if not ring.ready(number):
            ring.wait(number)
        row, k = ring.host_row(number)[4:], self._k
        return ActivationRow(row[: k + 1], row[k + 1 : 2 * k + 1])

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

    @staticmethod
    def first_forward_value(probe: Probe) -> float | None:
        """The max-abs of the first non-finite forward record: NaN, or inf when that output
        overflowed (held ±inf and no NaN). None when every record was finite.

        Reads the step's forward values on the host, like :meth:`first_nonfinite`.
        """
        if probe.forward_values is None:
            return None
        values = probe.forward_values.detach().cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(values))
        return float(values[bad[0]]) if bad.size else None

    def release(self, number: int) -> None:
        """Rows up to ``number`` were read: their space may be reused."""
        self._ring.read = max(self._ring.read, number + 1)

    def remove(self) -> None:
        """Stop recording: the modules' calls go straight to their code again (idempotent)."""
        self._finalizer()
        self._recorder.take()


def _parents(modules: list[tuple[str, nn.Module]]) -> list[int]:
    """Each module's parent index (the root's is ``len(modules)``)."""
    index = {id(module): j for j, (_, module) in enumerate(modules)}
    parents = [len(modules)] * len(modules)
    for j, (_, module) in enumerate(modules):
        for child in module.children():
            c = index.get(id(child))
            if c is not None and c != 0 and parents[c] == len(modules):
                parents[c] = j  # a module shared by two parents belongs to the first
    return parents


def _per_call(values: Tensor, n: int) -> Tensor | None:
    """Max-abs of each call (a fresh tensor: kept, unread, in case the step goes bad)."""
    return values.view(n, 2).abs().amax(dim=1) if n else None


def _first_bad(values: Tensor | None, calls: Sequence[int]) -> int | None:
    if values is None:
        return None
    finite = np.isfinite(values.detach().cpu().numpy())  # a non-finite step: a read is allowed
    bad = np.flatnonzero(~finite)
    return calls[int(bad[0])] if bad.size else None
