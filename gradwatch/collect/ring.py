"""A ring buffer of per-step statistics on the device, mirrored to the host without stalls.

Each optimizer step writes one row on the device (global norm, clip coefficient, loss, loss scale,
one norm per parameter). The host reads rows later, in order:

* On CPU the host view *is* the buffer (a numpy view), so a row is readable as soon as it is
  written, at no cost.
* On an accelerator, each row is copied to pinned host memory with a non-blocking copy and an
  event is recorded; the host reads the row once its event has completed, one step or so later,
  so reading never makes the host wait for the device. Only ``wait`` (used when a policy needs a
  decision now, or at close) blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["COEF", "GLOBAL", "LOSS", "NORMS", "SCALE", "Slot", "StatsRing"]

GLOBAL, COEF, LOSS, SCALE, NORMS = 0, 1, 2, 3, 4
"""Column layout of a row: global norm, clip coefficient, loss, loss scale, then per-param norms
(then, under pipeline parallelism, what the stages shared: ``collect.pipeline.SHARED_NORMS``)."""


class Slot(NamedTuple):
    """Views of one row, made once so the step path creates no tensor views."""

    row: Tensor
    global_norm: Tensor
    coef: Tensor
    loss: Tensor
    scale: Tensor
    norms: Tensor
    shared: Tensor  # what the pipeline stages shared (collect.pipeline.SHARED_NORMS), else empty


class StatsRing:
    """``capacity`` rows of ``NORMS + n_params + n_shared`` statistics on ``device``, with a host
    mirror.

    Args:
        n_params: Number of watched parameters.
        capacity: Rows kept; the host must read a row before it is overwritten, which
            :meth:`slot` enforces by waiting on the oldest unread row when the ring is full.
        device: Device of the statistics (where the gradients are).
        dtype: float32, or float64 when some gradients are float64.
        n_shared: Under pipeline parallelism, how many numbers the stages share at each step
            (:attr:`~gradwatch.collect.pipeline.StageLayout.shared`), else 0.
    """

    def __init__(
        self,
        n_params: int,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
        n_shared: int = 0,
    ) -> None:
        self.capacity = capacity
        self.device = device
        self.n_params = n_params
        width = NORMS + n_params + n_shared
        self.rows = torch.zeros(capacity, width, device=device, dtype=dtype)
        self.rows[:, COEF] = 1.0
        self._shared = device.type == "cpu"
        if self._shared:
            self._host_tensor = self.rows
        else:
            pin = device.type == "cuda" and torch.cuda.is_available()
            self._host_tensor = torch.zeros(self.rows.shape, dtype=dtype, pin_memory=pin)
        self.host = self._host_tensor.numpy()
        self.slots = [
            Slot(
                row,
                row[GLOBAL],
                row[COEF],
                row[LOSS],
                row[SCALE],
                row[NORMS : NORMS + n_params],
                row[NORMS + n_params :],
            )
            for row in self.rows
        ]
        self._events: list[object | None] = [None] * capacity
        self.written = 0  # rows written so far (the next row's number)
        self.read = 0  # rows read by the host so far

    def claim(self) -> tuple[int, Slot]:
        """Claim the next row for writing; returns its number and its views.

        Raises:
            RuntimeError: the ring is full of unread rows (the caller must read first).
        """
        if self.written - self.read >= self.capacity:
            raise RuntimeError("stats ring is full: read rows before claiming more")
        number = self.written
        return number, self.slots[number % self.capacity]

    def commit(self, number: int) -> None:
        """Mark row ``number`` written; start its copy to the host on accelerators."""
        slot = number % self.capacity
        if not self._shared:
            self._host_tensor[slot].copy_(self.rows[slot], non_blocking=True)
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
                self._events[slot] = event
        self.written = number + 1

    def ready(self, number: int) -> bool:
        """True if row ``number`` can be read on the host without waiting."""
        event = self._events[number % self.capacity]
        return event is None or bool(event.query())  # type: ignore[attr-defined]

    def wait(self, number: int) -> None:
        """Block until row ``number`` is on the host (the only blocking call)."""
        event = self._events[number % self.capacity]
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]
            self._events[number % self.capacity] = None

    def value(self, number: int, column: int) -> float:
        """One value of row ``number`` on the host (call after :meth:`ready` or :meth:`wait`)."""
        return float(self.host[number % self.capacity, column])

    def host_view(self, number: int) -> np.ndarray:
        """Row ``number`` on the host, not copied (call after :meth:`ready` or :meth:`wait`)."""
        return self.host[number % self.capacity]

    def host_row(self, number: int) -> np.ndarray:
        """A copy of row ``number`` on the host (call after :meth:`ready` or :meth:`wait`)."""
        self._events[number % self.capacity] = None
        return self.host[number % self.capacity].copy()
