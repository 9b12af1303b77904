"""What the diagnosis needs beyond gradient norms, collected on the device without host reads.

At every check :class:`StepProbe` takes a :class:`Probe` of the step:

* the attached optimizer's learning rates (host floats already; no device work);
* every ``WEIGHT_EVERY`` checks, the norm of every watched weight (one fused kernel per
  device/dtype group), written to a small device buffer mirrored to the host like the stats ring;
* with forensics on, an :class:`~gradwatch.collect.activations.ActivationProbe` sample: the
  largest activation (max-abs of the output) of each module call in forward order and the largest
  backpropagated signal (max-abs of the gradient of the output) of each call in backward order,
  reduced on the device to one row per step (per module), the per-call values kept aside on the
  device.

Nothing here reads a device value on the host during a step. Rows are read when the watcher emits
the step (from a host mirror, as the stats ring does); the per-call values, which locate the first
non-finite module, are only read when the step's gradients turned out non-finite.

The max-abs (infinity) norm is used for activations and signals because it is NaN- and
Inf-propagating and cannot overflow: a value is non-finite exactly when one element is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradwatch.collect.activations import ActivationProbe, ActivationRow, Probe
from gradwatch.collect.distributed import is_dtensor
from gradwatch.collect.kernels import foreach_norms
from gradwatch.collect.meshes import full_l2_norms
from gradwatch.collect.norms import group_key
from gradwatch.collect.params import WatchedParams
from gradwatch.collect.ring import StatsRing

__all__ = ["ActivationProbe", "ActivationRow", "Probe", "StepProbe"]

WEIGHT_EVERY = 256
"""Checks between two samples of the weights' norms (they change slowly)."""


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
            layout.setdefault(group_key(p), []).append(i)
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


def _norms(tensors: list[Tensor]) -> Tensor:
    """Norm of each (full) tensor of one group; FSDP2 shards: one all-reduce for the group.

    Every rank samples on the same schedule (every ``WEIGHT_EVERY`` checks), so the collectives
    line up.
    """
    if is_dtensor(tensors[0]):
        return full_l2_norms(tensors)
    return torch.stack(foreach_norms(tensors[0].device, tensors, 2.0))
