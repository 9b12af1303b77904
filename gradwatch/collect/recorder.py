"""The recorder behind forensics: each module call's output and output gradient, in order.

:class:`CallRecorder` gets every module call from the gates of :mod:`gradwatch.collect.calls`,
records the min and max of its output (forward order) into one :class:`~gradwatch.collect.calls.
CallBuffer` and, through a pre-hook on the output's ``grad_fn``, of the output's gradient (backward
order) into another; :meth:`CallRecorder.take` hands a step's records to
:class:`~gradwatch.collect.activations.ActivationProbe`, which reduces them on the device. The
aliasing and relabelling rules are described in :mod:`gradwatch.collect.activations`.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradwatch.collect.calls import CallBuffer

__all__ = ["CallRecorder", "Taken"]


class Taken(NamedTuple):
    """One step's records, handed over by :meth:`_Recorder.take`."""

    forward: Tensor
    forward_calls: list[int]
    inputs: frozenset[int]
    aliases: list[tuple[int, int]]
    derived: dict[int, int]
    backward: Tensor
    backward_calls: list[int]


class CallRecorder:
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
        self.forward = CallBuffer(device, dtype, 2 * (k + 1))
        self.backward = CallBuffer(device, dtype, 2 * (k + 1))
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

    def take(self) -> Taken:
        """This step's records (views, to reduce before the next record); start the next step."""
        forward, forward_calls = self.forward.take()
        backward, backward_calls = self.backward.take()
        taken = Taken(
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


@functools.cache
def _relu_node_type() -> type:
    """The class of the autograd node ``torch.relu`` makes (``ReluBackward0``)."""
    return type(torch.relu(torch.ones(1, requires_grad=True)).grad_fn)


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, Tensor):
                return item
    return None
