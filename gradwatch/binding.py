"""Everything that holds the watched tensors, their device or their dtype, built and removed as one.

A watcher binds once at creation, and again when the model's parameters were replaced or moved
(``load_state_dict(assign=True)``, ``model.half()``): :class:`Binding` is what gets rebuilt then,
so nothing tied to the old tensors survives (hooks, ring buffers, grouped layouts).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from gradwatch.act.skip import SkipHold
from gradwatch.collect.forensics import ActivationProbe, StepProbe
from gradwatch.collect.hooks import ArrivalOrder, MicroBatchNorms
from gradwatch.collect.norms import GradCollector
from gradwatch.collect.params import WatchedParams
from gradwatch.collect.pipeline import StageLayout
from gradwatch.collect.ring import StatsRing

__all__ = ["Binding"]

RING_CAPACITY = 64
"""Steps the device stats ring holds before the oldest must have reached the host."""


class Binding:
    """The per-tensor parts of a watcher: collector, stats ring, hooks and probes.

    Args:
        watched: The watched parameters.
        settings: The watcher's :class:`~gradwatch.settings.WatchSettings`.
        module: The model (for forensics), or None when given bare parameters.
        stages: Every pipeline stage's parameters (pipeline parallel), else None.

    Attributes:
        watched, collector, ring, arrivals, probe: Always present.
        hold: Skips without an optimizer (a skip policy is set), else None.
        micro: Per-micro-batch norms (``track_micro_batches``), else None.
    """

    def __init__(
        self,
        watched: WatchedParams,
        settings: Any,
        module: torch.nn.Module | None,
        stages: StageLayout | None = None,
    ) -> None:
        params = watched.params
        device = params[0].device
        dtype = GradCollector.statistics_dtype(params)
        self.watched = watched
        if settings.clip is not None:
            settings.clip.bind(zip(watched.names, params))
        self.collector = GradCollector(
            params,
            device,
            dtype,
            norm_type=settings.norm_type,
            grad_attr=settings.grad_attr,
            pipeline=stages,
        )
        shared = 0 if stages is None else stages.shared
        self.ring = StatsRing(len(watched), RING_CAPACITY, device, dtype, n_shared=shared)
        self.arrivals = ArrivalOrder(params, watched.position)
        self.hold: SkipHold | None = None
        if settings.skips:
            arrivals = self.arrivals
            self.hold = SkipHold(params, lambda: bool(arrivals.snapshot()))
        self.micro = MicroBatchNorms(params) if settings.track_micro_batches else None
        activations = None
        if settings.forensics:
            activations = ActivationProbe(module, watched, device, dtype)
        self.probe = StepProbe(watched, device, dtype, activations)
        # Hooks and probes go with the binding even if it is dropped without remove().
        self._finalizer = weakref.finalize(self, Binding._remove, self._parts())

    def _parts(self) -> list[Any]:
        return [p for p in (self.arrivals, self.probe, self.hold, self.micro) if p is not None]

    def remove(self) -> None:
        """Remove every hook and probe (idempotent)."""
        self._finalizer()

    @staticmethod
    def _remove(parts: list[Any]) -> None:
        for part in parts:
            part.remove()
