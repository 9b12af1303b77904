"""The step policy: skip, raise or clip at the spike threshold, decided at the step it concerns.

Everything else in gradwatch looks at a step after the fact; a policy set to ``"skip"`` or
``"raise"`` must decide before the optimizer steps, so this is the one place the host waits for
the device (one read of the global norm). ``on_spike="clip"`` rescales on the device and waits only
for the detector to have seen every earlier step.

:func:`verdict` is the decision itself, over plain numbers; :class:`StepPolicy` applies it to a
step: reads the norm, agrees across ranks, rescales.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from gradwatch.act.clip import EPS, scale_
from gradwatch.collect.distributed import any_rank, is_distributed

__all__ = ["StepPolicy", "verdict"]

Decision = tuple[str | None, str | None]
"""``(skip reason, action)``: ``(None, None)`` to go on, else ``"skipped"`` or ``"raise"``."""


def verdict(
    global_norm: float, threshold: float | None, on_nonfinite: str, on_spike: str
) -> Decision:
    """What a step with this global norm must do under these policies.

    Args:
        global_norm: The step's global gradient norm.
        threshold: The spike detector's threshold for this step (None during its first step).
        on_nonfinite, on_spike: The watcher's policies.
    """
    if not math.isfinite(global_norm) and on_nonfinite != "warn":
        return "non-finite gradient", "raise" if on_nonfinite == "raise" else "skipped"
    if on_spike in ("skip", "raise") and threshold is not None and global_norm > threshold:
        return "gradient norm spike", "raise" if on_spike == "raise" else "skipped"
    return None, None


class StepPolicy:
    """Applies ``on_nonfinite`` and ``on_spike`` to each step.

    Args:
        on_nonfinite: ``"warn"``, ``"skip"`` or ``"raise"``.
        on_spike: ``"warn"``, ``"clip"``, ``"skip"`` or ``"raise"``.
        threshold: Returns the spike detector's threshold once it has seen every earlier step
            (called only by a spike policy that needs it).
    """

    def __init__(
        self, on_nonfinite: str, on_spike: str, threshold: Callable[[], float | None]
    ) -> None:
        self.on_nonfinite = on_nonfinite
        self.on_spike = on_spike
        self._threshold = threshold
        self._spike_decides = on_spike in ("skip", "raise")
        self.decides = on_nonfinite != "warn" or self._spike_decides
        self.raises = "raise" in (on_nonfinite, on_spike)

    def decide(self, global_norm: Tensor) -> Decision:
        """This step's decision; in a distributed run every rank gets the same one.

        A rank that decided nothing itself skips (or raises) when another rank decided to.
        """
        if not self.decides:
            return None, None
        norm = float(global_norm)  # sync: a policy must decide now
        threshold = self._threshold() if self._spike_decides else None
        reason, action = verdict(norm, threshold, self.on_nonfinite, self.on_spike)
        if is_distributed() and any_rank(reason is not None, global_norm.device) and not reason:
            reason, action = "decided on another rank", "raise" if self.raises else "skipped"
        return reason, action

    def clip_to_threshold_(self, batch: Any, global_norm: Tensor, coef: Tensor) -> None:
        """With ``on_spike="clip"``, rescale the gradients to the spike threshold, on the device.

        Args:
            batch: The step's gradients (a :class:`~gradwatch.collect.norms.GradBatch`).
            global_norm: The norm before any clipping.
            coef: The factor a clipper already applied (1.0 if none), multiplied in place.
        """
        threshold = self._threshold()
        if threshold is None:
            return
        current = global_norm * coef
        factor = (current + EPS).reciprocal_().mul_(threshold).clamp_(max=1.0)
        scale_(batch, factor)
        coef.mul_(factor)
