"""The run's trajectory over time: global norm, loss and learning rate, in bounded memory.

An expert reading a failed run looks first at the curves: steady then one outlier (a bad batch),
geometric growth over several steps (a learning rate too high), huge from the first step (the
initialisation). :class:`Trajectory` keeps what those readings need, fed one step at a time with
host floats, in memory that does not grow with the run:

* the first :data:`EARLY` steps exactly (a blow-up in the first steps, a warm-up);
* the last :data:`RECENT` steps exactly, and a frozen copy of them at the first incident of each
  kind (the run-up to the first NaN, the first spike, the first non-finite loss);
* the whole run in at most :data:`BLOCKS` blocks of consecutive steps (mean log10 norm, mean loss,
  largest log10 norm): a block doubles in length whenever the blocks would exceed the bound.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, NamedTuple

import numpy as np

__all__ = ["BLOCKS", "EARLY", "RECENT", "Series", "Trajectory"]

EARLY = 64
"""Steps kept exactly from the start of the run."""
RECENT = 64
"""Steps kept exactly before the latest one (and frozen at a run's first incidents)."""
BLOCKS = 256
"""Most blocks summarising the whole run."""


class Series(NamedTuple):
    """Consecutive steps as arrays (NaN where a value was non-finite or absent).

    Attributes:
        steps: Step numbers.
        norms: Global gradient norms (non-finite kept as NaN/Inf as seen).
        losses: Losses (NaN where none was given).
        lrs: Largest learning rate of the attached optimizer (NaN when none).
    """

    steps: np.ndarray
    norms: np.ndarray
    losses: np.ndarray
    lrs: np.ndarray

    @classmethod
    def of(cls, rows: Any) -> Series:
        array = np.asarray(list(rows), dtype=np.float64).reshape(-1, 4)
        return cls(array[:, 0].astype(np.int64), array[:, 1], array[:, 2], array[:, 3])

    def __len__(self) -> int:
        return len(self.steps)


class Trajectory:
    """Global norm, loss and learning rate of a run over time (see the module docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.early: list[tuple[float, float, float, float]] = []
        self.recent: deque[tuple[float, float, float, float]] = deque(maxlen=RECENT)
        self.run_ups: dict[str, list[tuple[float, float, float, float]]] = {}
        self.block_size = 1
        # per block: first step, steps, sum log10 norm, finite norms, sum loss, losses, max log10
        # (preallocated: memory is flat from the first step)
        self.blocks = np.zeros((BLOCKS + 1, 7))
        self.n_blocks = 0

    def update(self, step: int, norm: float, loss: float | None, lr: float | None) -> None:
        """Feed one step (host floats)."""
        row = (
            float(step),
            norm,
            math.nan if loss is None else loss,
            math.nan if lr is None else lr,
        )
        if len(self.early) < EARLY:
            self.early.append(row)
        self.recent.append(row)
        if self.n_blocks == 0 or self.blocks[self.n_blocks - 1, 1] >= self.block_size:
            if self.n_blocks == BLOCKS:
                self._merge()
            self.blocks[self.n_blocks] = (step, 0.0, 0.0, 0.0, 0.0, 0.0, -math.inf)
            self.n_blocks += 1
        block = self.blocks[self.n_blocks - 1]
        block[1] += 1
        if math.isfinite(norm) and norm > 0:
            log = math.log10(norm)
            block[2] += log
            block[3] += 1
            block[6] = max(block[6], log)
        if loss is not None and math.isfinite(loss):
            block[4] += loss
            block[5] += 1

    def freeze(self, kind: str) -> None:
        """Keep the recent steps (the latest one included) as the run-up to the first ``kind``."""
        if kind not in self.run_ups:
            self.run_ups[kind] = list(self.recent)

    def _merge(self) -> None:
        """Halve the number of blocks: each pair becomes one block twice as long."""
        n = self.n_blocks // 2
        a, b = self.blocks[0 : 2 * n : 2], self.blocks[1 : 2 * n : 2]
        merged = a + b
        merged[:, 0] = a[:, 0]
        merged[:, 6] = np.maximum(a[:, 6], b[:, 6])
        self.blocks[:n] = merged
        self.blocks[n:] = 0.0
        self.n_blocks = n
        self.block_size *= 2

    # ---------------------------------------------------------------------------- reading

    def early_series(self) -> Series:
        return Series.of(self.early)

    def run_up(self, kind: str) -> Series | None:
        rows = self.run_ups.get(kind)
        return None if rows is None else Series.of(rows)

    def overview(self) -> Series:
        """The whole run, one row per block: first step, mean norm (geometric), mean loss."""
        rows = []
        for first, _, log_sum, n_log, loss_sum, n_loss, _ in self.blocks[: self.n_blocks]:
            norm = 10 ** (log_sum / n_log) if n_log else math.nan
            rows.append((first, norm, loss_sum / n_loss if n_loss else math.nan, math.nan))
        return Series.of(rows)

    # ---------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "trajectory_early": [list(r) for r in self.early],
            "trajectory_recent": [list(r) for r in self.recent],
            "trajectory_run_ups": {k: [list(r) for r in v] for k, v in self.run_ups.items()},
            "trajectory_block_size": self.block_size,
            "trajectory_blocks": self.blocks[: self.n_blocks].tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (an older state without it: start empty)."""
        self.reset()
        self.early = [_row(r) for r in state.get("trajectory_early", ())]
        self.recent.extend(_row(r) for r in state.get("trajectory_recent", ()))
        self.run_ups = {
            k: [_row(r) for r in v] for k, v in state.get("trajectory_run_ups", {}).items()
        }
        self.block_size = int(state.get("trajectory_block_size", 1))
        blocks = np.asarray(state.get("trajectory_blocks", ()), dtype=np.float64).reshape(-1, 7)
        self.n_blocks = len(blocks)
        self.blocks[: self.n_blocks] = blocks


def _row(values: Any) -> tuple[float, float, float, float]:
    a, b, c, d = (float(v) for v in values)
    return a, b, c, d
