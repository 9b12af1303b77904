"""The order in which gradients arrive during backward, recorded at almost no cost.

Each watched parameter gets a post-accumulate-grad hook that is the bound ``append`` of one bounded
deque: the autograd engine calls straight into C, no Python frame runs per parameter. The order
points at where a NaN/Inf started (the first poisoned gradient to arrive is nearest its origin).
"""

from __future__ import annotations

from collections import deque

import torch

from gradwatch.collect.norms import sparse_values

__all__ = ["ArrivalOrder", "MicroBatchNorms"]


class ArrivalOrder:
    """Records which parameters received their gradient, in order, since the last :meth:`clear`.

    Args:
        params: Parameters to hook (leaf tensors).
        position: ``id(param) -> position`` in the watcher's list.
    """

    def __init__(self, params: list[torch.Tensor], position: dict[int, int]) -> None:
        self._position = position
        # Bounded: one backward's worth of arrivals; older ones fall off if nobody clears it.
        self._arrived: deque[torch.Tensor] = deque(maxlen=len(params))
        self._handles = [p.register_post_accumulate_grad_hook(self._arrived.append) for p in params]

    def clear(self) -> None:
        """Start recording a new backward pass."""
        self._arrived.clear()

    def snapshot(self) -> tuple[torch.Tensor, ...]:
        """The arrivals so far (cheap: references only); convert with :meth:`positions`."""
        return tuple(self._arrived)

    def positions(self, snapshot: tuple[torch.Tensor, ...]) -> list[int]:
        """Watcher positions of a snapshot's parameters, first arrival first, without repeats."""
        seen: dict[int, None] = {}
        for p in snapshot:
            seen.setdefault(self._position[id(p)], None)
        return list(seen)

    def remove(self) -> None:
        """Remove every hook from the parameters (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._arrived.clear()


class MicroBatchNorms:
    """Norm of each micro-batch's gradient contribution, for gradient accumulation.

    A tensor hook on each parameter sees the gradient flowing into it *before* it is added to
    ``.grad``, i.e. exactly this backward pass's contribution. Each hook call computes that
    tensor's norm on the device; :meth:`end` combines them into the micro-batch's global L2 norm.
    Opt-in: it costs one Python call and one small kernel per parameter per backward.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self._current: list[torch.Tensor] = []
        self._done: list[torch.Tensor] = []
        self._handles = [p.register_hook(self._record) for p in params]

    def _record(self, grad: torch.Tensor) -> None:
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        self._current.append(torch.linalg.vector_norm(sparse_values(local), dtype=torch.float32))

    def begin(self) -> None:
        """Open a micro-batch: forget anything an interrupted backward left behind."""
        self._current = []

    def end(self) -> None:
        """Close the current micro-batch (call after its backward)."""
        if self._current:
            self._done.append(torch.linalg.vector_norm(torch.stack(self._current)))
            self._current = []

    def take(self) -> list[torch.Tensor]:
        """The micro-batch norms since the last call (device tensors), oldest first."""
        self.end()
        done, self._done = self._done, []
        return done

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
