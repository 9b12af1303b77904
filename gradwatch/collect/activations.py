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

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from gradwatch.collect.params import WatchedParams
from gradwatch.collect.ring import StatsRing
from gradwatch.errors import ConfigTypeError

__all__ = ["ActivationProbe", "ActivationRow", "Probe"]

_MAX_CALLS = 1 << 16
"""Module calls recorded per step at most (bounds memory if nobody checks)."""

_SLOT = "_compiled_call_impl"
"""The per-instance call slot of ``nn.Module`` that pickling leaves out."""

_Plan = tuple[Tensor | None, ...]
"""Index tensors of one pattern of calls (see :meth:`ActivationProbe._plan`)."""

_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled
_compiling = torch.compiler.is_compiling
_aminmax = torch.aminmax


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
        self._recorder = _Recorder(_parents(modules), relus, device, dtype)
        # The routes hold the recorder only: a dropped probe is collected and unroutes.
        self._finalizer = weakref.finalize(self, _unroute, _route(modules, self._recorder.record))

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

    def _plan(self, taken: _Taken) -> _Plan:
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


class _Taken(NamedTuple):
    """One step's records, handed over by :meth:`_Recorder.take`."""

    forward: Tensor
    forward_calls: list[int]
    inputs: frozenset[int]
    aliases: list[tuple[int, int]]
    derived: dict[int, int]
    backward: Tensor
    backward_calls: list[int]


class _Recorder:
    """Records the calls of one model's modules, by module index.

    Holds no reference to the probe or the model, so the routes to it keep neither alive.

    Args:
        parents: Each module's parent index; the root's parent is ``k``, the number of modules
            (which also stands for the model's input).
        relus: Whether each module is an ``nn.ReLU``, whose output's min and max are the relu of
            its input's: derived at the end of the step instead of reduced by a kernel.
        device: Device of the buffers.
        dtype: Their dtype.
    """

    def __init__(
        self, parents: list[int], relus: list[bool], device: torch.device, dtype: Any
    ) -> None:
        k = len(parents)
        self.parents = parents
        self.k = k
        self.relus = relus
        self._relu_node = _relu_node_type()
        self.forward = _CallBuffer(device, dtype, 2 * (k + 1))
        self.backward = _CallBuffer(device, dtype, 2 * (k + 1))
        self._reset()
        # One hook per (module, output number), made once: none is allocated per call.
        self._signals = [_signal_hook(self.backward.record, j, 0) for j in range(k)]
        self._other_signals: dict[tuple[int, int], Any] = {}

    def _reset(self) -> None:
        # id(tensor) -> (weak reference, version, position): what this step recorded.
        self.seen: dict[int, tuple[weakref.ReferenceType[Tensor], int, int]] = {}
        self.inputs: set[int] = set()  # positions of inputs recorded for a parent
        self.pending: dict[int, list[int]] = {}  # parent -> positions of such inputs
        self.aliases: list[tuple[int, int]] = []  # (module, position it returned)
        self.derived: dict[int, int] = {}  # position of a ReLU output -> of its input's record

    def record(self, j: int, args: Any, output: Any) -> None:
        """Module ``j`` was called on ``args`` and returned ``output`` (gradient mode on)."""
        # The hot path (every module call): a few attribute reads, one kernel, one hook.
        out = output if type(output) is Tensor else _first_tensor(output)
        x = args[0] if args and type(args[0]) is Tensor else _first_tensor(args)
        seen, pending = self.seen, self.pending
        if pending and j in pending:
            self._relabel(j, args)
        if x is not None:
            known = seen.get(id(x))
            if known is None or known[0]() is not x:  # made by the parent's code, or the input
                if x.is_floating_point():
                    self._record_input(j, x)  # (an nn.Identity then aliases this record)
            elif known[1] != x._version and x is not out:  # the parent changed it in place
                self._record_input(j, x)
        if len(args) > 1:  # an RNN's hidden state, a mask: the same rule as the first
            self._record_more_inputs(j, args[1:])
        if out is None:
            return
        known = seen.get(id(out))
        version = out._version
        if known is not None and known[0]() is out and known[1] == version:
            self.aliases.append((j, known[2]))  # returns a recorded tensor: same value
            return
        if not out.is_floating_point():
            return
        node = out.grad_fn
        position = -1
        if self.relus[j] and x is not None and type(node) is self._relu_node:
            position = self._derive(j, x, out, node)
        if position < 0:
            position = self.forward.record(j, out)
            if position < 0:
                return
        seen[id(out)] = (weakref.ref(out), version, position)
        if node is not None:
            # A pre-hook on the node that made the output receives the output's gradient; it is
            # ~2.5x cheaper to register than Tensor.register_hook (no Python bookkeeping).
            index = out.output_nr
            node.register_prehook(self._signals[j] if index == 0 else self._signal(j, index))

    def _derive(self, j: int, x: Tensor, out: Tensor, node: Any) -> int:
        """Record ReLU ``j``'s output as the relu of its input's record, where it provably is.

        It is when ``node`` (a relu) made ``out`` from ``x`` as recorded: ``x`` unchanged since
        its record, or changed by this relu alone (in place). A hook that replaced the input or
        the output fails the test. Returns the position, or -1 (a kernel records it then).
        """
        known = self.seen.get(id(x))
        if known is None or known[0]() is not x:
            return -1
        if out is x:
            exact = x._version == known[1] + 1
        else:
            exact = out._version == 0 and node.next_functions[0] == (x.grad_fn, x.output_nr)
        if not exact:
            return -1
        position = self.forward.skip(j)
        if position >= 0:
            source = known[2]
            self.derived[position] = self.derived.get(source, source)  # relu is idempotent
        return position

    def _record_input(self, j: int, x: Tensor) -> None:
        """Record ``x``, which no recorded call returned, on behalf of ``j``'s parent."""
        parent = self.parents[j]
        position = self.forward.record(parent, x)
        if position < 0:
            return
        self.seen[id(x)] = (weakref.ref(x), x._version, position)
        self.inputs.add(position)
        if parent < self.k:
            self.pending.setdefault(parent, []).append(position)

    def _record_more_inputs(self, j: int, args: Sequence[Any]) -> None:
        """Call ``j``'s other tensor arguments that no recorded call returned, on behalf of its
        parent (at the root: the model's input)."""
        for arg in args:
            items = arg if isinstance(arg, (tuple, list)) else (arg,)
            for t in items:
                if type(t) is Tensor and t.is_floating_point() and id(t) not in self.seen:
                    self._record_input(j, t)

    def _relabel(self, j: int, args: Sequence[Any]) -> None:
        """Module ``j`` returned: inputs recorded for it that were its own arguments came from
        above."""
        positions = self.pending.pop(j, None)
        if not positions:
            return
        own = set()
        for arg in args:
            for t in arg if isinstance(arg, (tuple, list)) else (arg,):
                seen = self.seen.get(id(t)) if type(t) is Tensor else None
                if seen is not None and seen[0]() is t:
                    own.add(seen[2])
        parent, calls = self.parents[j], self.forward.calls
        for position in positions:
            if position in own:
                calls[position] = parent
                if parent < self.k:
                    self.pending.setdefault(parent, []).append(position)

    def _signal(self, j: int, index: int) -> Any:
        hook = self._other_signals.get((j, index))
        if hook is None:
            hook = self._other_signals[(j, index)] = _signal_hook(self.backward.record, j, index)
        return hook

    def take(self) -> _Taken:
        """This step's records (views, to reduce before the next record); start the next step."""
        forward, forward_calls = self.forward.take()
        backward, backward_calls = self.backward.take()
        taken = _Taken(
            forward,
            forward_calls,
            frozenset(self.inputs),
            self.aliases,
            self.derived,
            backward,
            backward_calls,
        )
        self._reset()
        return taken


def _signal_hook(record: Callable[[int, Tensor], int], j: int, index: int) -> Any:
    """A ``grad_fn`` pre-hook recording the gradient of output ``index`` for module ``j``."""

    def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
        grad = grad_outputs[index]
        if grad is not None:
            record(j, grad)
        # returning None: a pre-hook returning a value would replace the gradient

    return hook


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
        # Tensor.get_device() of a tensor on ``device`` (an int compare, no device object).
        self._index = -1 if device.type == "cpu" else (device.index or 0)
        self.calls: list[int] = []
        self._allocate(calls)

    def _allocate(self, calls: int) -> None:
        self.capacity = calls
        self.buffer = torch.zeros(2 * calls, device=self.device, dtype=self.dtype)
        self._pairs = [(self.buffer[2 * i], self.buffer[2 * i + 1]) for i in range(calls)]

    def _grow(self) -> bool:
        if self.capacity >= _MAX_CALLS:
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
        if ``_MAX_CALLS`` calls are recorded already."""
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


# ----------------------------------------------------------------- routing module calls

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


def _route(modules: list[tuple[str, nn.Module]], record: Callable[[int, Any, Any], None]) -> Any:
    """Hand every eager call of ``modules[j]`` to ``record(j, args, output)``; returns what
    :func:`_unroute` takes to undo it."""
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


def _unroute(routes: Any) -> None:
    """Undo :func:`_route` (idempotent); a slot the user set since (``compile()``) is kept."""
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


@functools.cache
def _relu_node_type() -> type:
    """The class of the autograd node ``torch.relu`` makes (``ReluBackward0``)."""
    return type(torch.relu(torch.ones(1, requires_grad=True)).grad_fn)


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


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, Tensor):
                return item
    return None
