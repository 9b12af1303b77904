"""A run read back from its JSONL log, as numpy arrays, and the questions asked of it.

:class:`RunLog` holds one column per step field and a ``(steps, params)`` matrix of norms; its
methods group parameters into layers and recompute a :class:`~gradwatch.records.RunSummary` for
runs that never closed, with the watcher's own aggregator (:mod:`gradwatch.report.stats`).
:func:`gradwatch.report.runlog.read_run` builds it from a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradwatch.records import Event, RunStart, RunSummary
from gradwatch.report.stats import LayerGroups, StepAggregator, StepColumns

__all__ = ["RunLog"]


@dataclass(frozen=True, eq=False)
class RunLog:
    """One run read from a JSONL log, as arrays with one row per recorded step.

    Arrays of per-step values have shape ``(steps,)``; per-parameter norms ``(steps, params)`` with
    columns in :attr:`names` order. Non-finite values are NaN/inf; a parameter without a gradient
    at a step is NaN in :attr:`norms` and False in :attr:`present`.

    Attributes:
        path: The file read.
        header: The run's :class:`~gradwatch.records.RunStart` (parameters and configuration).
        every: The sink's ``every``: 1 if every step was recorded.
        step: Step index of each recorded step.
        global_norm: Global gradient norm before clipping.
        clipped_norm: Global norm after clipping.
        clip_coef: Factor the gradients were scaled by.
        loss: Loss, NaN where none was given.
        spike_threshold: The spike detector's threshold, NaN during warm-up.
        scale: GradScaler loss scale, NaN where none.
        lr: Learning rate of the attached optimizer's first param group, NaN where unknown.
        spike, loss_spike, skipped: Flags of each recorded step.
        nonfinite: The step had a NaN/Inf gradient.
        first_nonfinite: Column of the first parameter (in backward order) with a NaN/Inf
            gradient, -1 where all were finite.
        norms: Per-parameter gradient norms.
        present: Which parameters had a gradient.
        window_steps: Steps each record stands for (1, or up to ``every``).
        peak_global_norm: Largest finite global norm over each record's window (with ``every=1``,
            the global norm itself), so plots of sampled logs still show every spike.
        peak_norms: Largest finite norm of each parameter over each record's window (with
            ``every=1``, :attr:`norms`).
        events: Every event of the run, in order (non-finite numbers in their ``data`` read back
            as the strings ``"NaN"``/``"Infinity"``, see :mod:`gradwatch.report.jsonl`).
        summary: The final summary, or None if the run did not close (killed, still running).
        truncated: The last line was incomplete (the writer was killed mid-line) and was skipped.
        skipped_lines: ``(line number, reason)`` of every other line the reader skipped: not
            JSON, or a record with a missing or mistyped field (``"step record: field 'step'
            must be an integer, got \"x\""``). Line numbers count from 1.
        run_index: Which run of the file this is (a file appended to holds several).
        run_count: Number of runs in the file.
        window_totals: With ``every > 1``, event counts summed over all windows.
        spike_columns: ``(row, columns)`` of the parameters blamed for each spike.
        nonfinite_ranks: ``(row, ranks)`` of the DDP ranks a NaN/Inf came from, for the rows
            that name any (``GradWatch(rank_blame=True)``); empty otherwise.
    """

    path: Path
    header: RunStart
    every: int
    step: np.ndarray
    global_norm: np.ndarray
    clipped_norm: np.ndarray
    clip_coef: np.ndarray
    loss: np.ndarray
    spike_threshold: np.ndarray
    scale: np.ndarray
    lr: np.ndarray
    spike: np.ndarray
    loss_spike: np.ndarray
    skipped: np.ndarray
    nonfinite: np.ndarray
    first_nonfinite: np.ndarray
    norms: np.ndarray
    present: np.ndarray
    window_steps: np.ndarray
    peak_global_norm: np.ndarray
    peak_norms: np.ndarray
    events: tuple[Event, ...]
    summary: RunSummary | None
    truncated: bool
    skipped_lines: tuple[tuple[int, str], ...]
    run_index: int
    run_count: int
    window_totals: Mapping[str, int] = field(default_factory=dict, repr=False)
    spike_columns: tuple[tuple[int, tuple[int, ...]], ...] = field(default=(), repr=False)
    nonfinite_ranks: tuple[tuple[int, tuple[int, ...]], ...] = field(default=(), repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names, in column order."""
        return tuple(p.name for p in self.header.params)

    @property
    def bad_lines(self) -> int:
        """Number of lines skipped, besides a truncated last line (see :attr:`skipped_lines`)."""
        return len(self.skipped_lines)

    def __len__(self) -> int:
        return len(self.step)

    def layer_names(self, depth: int | None = None) -> tuple[str, ...]:
        """Layers in model order, grouped as :func:`~gradwatch.layers.layer_of` does."""
        return LayerGroups(self.names, depth).layers

    def layer_norms(self, depth: int | None = None, *, peak: bool = False) -> np.ndarray:
        """Each layer's gradient norm at each recorded step, shape ``(steps, layers)``.

        A layer's norm is the L2 norm of its parameters' gradients together; NaN where none of its
        parameters had a gradient, NaN/inf where one was non-finite.

        Args:
            depth: Group parameters by their first ``depth`` name parts (None: owning module).
            peak: Combine :attr:`peak_norms` instead of :attr:`norms` (for sampled logs this is an
                upper bound of the layer's largest norm in each window).
        """
        return self._layers(LayerGroups(self.names, depth), peak)[0]

    def layer_present(self, depth: int | None = None) -> np.ndarray:
        """Whether each layer had any gradient at each recorded step, shape ``(steps, layers)``."""
        return self._layers(LayerGroups(self.names, depth), peak=False)[1]

    def _layers(self, groups: LayerGroups, peak: bool) -> tuple[np.ndarray, np.ndarray]:
        """Layer norms and whether each layer had any gradient, shape ``(steps, layers)``."""
        if peak:
            return groups.matrix(self.peak_norms, ~np.isnan(self.peak_norms))
        return groups.matrix(self.norms, self.present)

    def summarize(self, depth: int | None = None) -> RunSummary:
        """A :class:`~gradwatch.records.RunSummary` computed from the recorded steps.

        For runs that did not close (no summary record). The same aggregator as the watcher's
        computes it; with ``every > 1``, counts and maxima cover every step (from the windows),
        minima and means the recorded steps only.
        """
        groups = LayerGroups(self.names, depth)
        norms, has = self._layers(groups, peak=False)
        aggregator = StepAggregator.of(groups)
        fields = ("step", "global_norm", "clip_coef", "spike", "loss_spike", "skipped", "nonfinite")
        steps = {name: getattr(self, name) for name in fields}
        windows = {
            "window_steps": self.window_steps,
            "peak_global": self.peak_global_norm,
            "peak_layers": self._layers(groups, peak=True)[0],
            "totals": self.window_totals,
        }
        origins = [(e.step, e.params[0]) for e in self.events if e.kind == "nonfinite" and e.params]
        culprits = [column for _, columns in self.spike_columns for column in columns]
        aggregator.add_steps(
            StepColumns(
                **steps,
                layer_norms=norms,
                layer_present=has,
                origins=origins,
                culprits=culprits,
                **windows,
            )
        )
        return aggregator.summary()
