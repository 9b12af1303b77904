"""Which parameters hold NaN/Inf, and which one it started in.

A NaN or Inf produced in backward propagates towards the input: every gradient computed after it
is poisoned too. The parameter whose gradient arrived *first* in backward order among the poisoned
ones is therefore the closest to where it started. The arrival order is recorded by the hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["nonfinite_in_backward_order"]


def nonfinite_in_backward_order(
    norms: np.ndarray, present: Sequence[int] | None, arrival: Sequence[int]
) -> list[int]:
    """Positions of parameters whose gradient norm is NaN/Inf, first-arrived first.

    Args:
        norms: One gradient norm per watched parameter (a NaN/Inf gradient has a NaN/Inf norm).
        present: Positions of parameters that had a gradient (None: all).
        arrival: Positions in the order their gradients arrived during backward (may be empty or
            partial when no backward was seen by the hooks).

    Returns:
        Positions of non-finite parameters: those seen by the hooks in arrival order, then the rest
        in the watcher's order.
    """
    bad = np.flatnonzero(~np.isfinite(norms))
    if present is not None:
        bad = np.intersect1d(bad, np.asarray(present, dtype=np.intp))
    if bad.size == 0:
        return []
    bad_set = set(bad.tolist())
    ordered: list[int] = []
    for position in arrival:
        if position in bad_set:
            ordered.append(position)
            bad_set.discard(position)
    ordered.extend(sorted(bad_set))
    return ordered
