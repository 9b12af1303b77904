"""Run statistics, computed once: layers of parameters, and steps aggregated into a summary.

:class:`LayerGroups` groups parameters into layers and combines a matrix of parameter norms into
layer norms. :class:`StepAggregator` accumulates steps into a :class:`~gradwatch.records.RunSummary`
(global and per-layer minimum, mean, maximum, counts): the watcher's run summary, every windowed
sink's window, the JSONL log's window records and the summary of a run read back from its log
(:meth:`~gradwatch.report.runlog_arrays.RunLog.summarize`) all come from it. Steps arrive either
as reports (:meth:`StepAggregator.update`, absorbed in vectorised batches) or as columns of
arrays (:meth:`StepAggregator.add_steps`, a run read back from its log).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.layers import layer_of
from gradwatch.records import LayerSummary, RunSummary, StepReport

__all__ = ["COUNTS", "LayerGroups", "StepAggregator", "StepColumns"]

COUNTS = ("clipped", "spikes", "loss_spikes", "nonfinite", "skipped")
"""The step counts a window or a run keeps, by the names of the JSONL window record."""

_COUNT_FIELDS = ("clipped_steps", "spikes", "loss_spikes", "nonfinite_steps", "skipped_steps")
"""The :class:`RunSummary` fields of :data:`COUNTS`, in the same order."""


class LayerGroups:
    """Parameters grouped into layers, and layer norms from parameter norms.

    Args:
        names: Parameter names, in the watcher's order.
        depth: Group by the first ``depth`` name parts (None: by owning module), as
            :func:`~gradwatch.layers.layer_of` does.
        each: Every parameter is a layer of its own (per-parameter statistics).

    Attributes:
        names: The parameter names.
        layers: Layer names, in model order.
        of_param: The layer of each parameter (an index into ``layers``).
        position: Parameter name -> its index in ``names``.
    """

    def __init__(self, names: Sequence[str], depth: int | None = None, *, each: bool = False):
        self.names = tuple(names)
        self.position = {n: i for i, n in enumerate(self.names)}
        keys = self.names if each else [layer_of(n, depth) for n in self.names]
        layers: dict[str, int] = {}
        self.of_param = np.array([layers.setdefault(k, len(layers)) for k in keys], dtype=np.intp)
        self.layers = tuple(layers)
        self._each = each
        # Columns sorted by layer, and where each layer starts: per-layer sums of squares are one
        # np.add.reduceat over the permuted columns.
        self._perm = np.argsort(self.of_param, kind="stable")
        self._starts = np.searchsorted(self.of_param[self._perm], np.arange(len(layers)))

    def matrix(
        self, values: np.ndarray, present: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer L2 norms of a ``(steps, params)`` matrix of parameter norms.

        Args:
            values: Parameter norms, columns in :attr:`names` order.
            present: Which parameters had a gradient at each step (None: all of them).

        Returns:
            Layer norms ``(steps, layers)`` (NaN where no parameter of the layer had a gradient,
            NaN/inf where one was non-finite) and whether each layer had any gradient.
        """
        if values.size == 0 or not self.layers:
            empty = np.full((len(values), len(self.layers)), np.nan)
            return empty, np.zeros(empty.shape, dtype=np.bool_)
        if self._each:  # a layer per parameter: its norm, exactly
            norms = values.astype(np.float64)
            if present is None:
                return norms, np.ones(norms.shape, dtype=np.bool_)
            norms[~present] = np.nan
            return norms, present.copy()
        squares = np.square(values, dtype=np.float64)
        if present is not None:
            squares = np.where(present, squares, 0.0)
        with np.errstate(invalid="ignore"):
            norms = np.sqrt(np.add.reduceat(squares[:, self._perm], self._starts, axis=1))
        if present is None:
            return norms, np.ones(norms.shape, dtype=np.bool_)
        has = np.add.reduceat(present[:, self._perm].astype(np.int32), self._starts, axis=1) > 0
        norms[~has] = np.nan
        return norms, has

    def of_report(self, report: StepReport) -> tuple[np.ndarray, np.ndarray]:
        """Layer norms at one step, and which layers had a gradient (see :meth:`matrix`)."""
        norms = report.param_norms
        if norms.names is self.names or norms.names == self.names:
            layer, has = self.matrix(norms.values[None, :])
            return layer[0], has[0]
        values = np.zeros(len(self.names))
        present = np.zeros(len(self.names), dtype=np.bool_)
        index = [self.position[n] for n in norms.names]
        values[index], present[index] = norms.values, True
        layer, has = self.matrix(values[None, :], present[None, :])
        return layer[0], has[0]


@dataclass(frozen=True)
class StepColumns:
    """Steps as arrays, one row per step (or per recorded step of a sampled log).

    Attributes:
        step: Step index of each row.
        global_norm, clip_coef: Per row.
        spike, loss_spike, skipped, nonfinite: Flags per row.
        layer_norms, layer_present: ``(rows, layers)``, as :meth:`LayerGroups.matrix` returns.
        origins: ``(step, parameter)`` where NaN/Inf started.
        culprits: Parameter positions blamed for spikes, one entry per blame.
        window_steps: Steps each row stands for (None: one each).
        peak_global, peak_layers: Largest norms over each row's window (None: the row's own).
        totals: Counts over every step (keys of :data:`COUNTS`), replacing those of the flags.
    """

    step: np.ndarray
    global_norm: np.ndarray
    clip_coef: np.ndarray
    spike: np.ndarray
    loss_spike: np.ndarray
    skipped: np.ndarray
    nonfinite: np.ndarray
    layer_norms: np.ndarray
    layer_present: np.ndarray
    origins: Sequence[tuple[int, str]] = ()
    culprits: Sequence[int] = ()
    window_steps: np.ndarray | None = None
    peak_global: np.ndarray | None = None
    peak_layers: np.ndarray | None = None
    totals: Mapping[str, int] | None = None

    def counts(self) -> tuple[int, ...]:
        """The :data:`COUNTS` of these rows."""
        flags = (self.clip_coef < 1.0, self.spike, self.loss_spike, self.nonfinite, self.skipped)
        totals = self.totals or {}
        return tuple(int(totals.get(k, f.sum())) for k, f in zip(COUNTS, flags))


class StepAggregator:
    """Accumulates steps into a :class:`RunSummary`: global and per-layer statistics.

    Read the statistics through :meth:`summary`; ``steps``, ``first_step`` and ``last_step`` are
    always current, the rest is kept privately and brought up to date by :meth:`summary`.

    ``update`` only queues a report; queued reports are absorbed in vectorised batches (per-layer
    norms of a batch are one matrix reduction), so the cost per step does not grow with
    Python-level work per parameter. Non-finite values never enter a statistic.

    Args:
        names: Parameter names in the watcher's order.
        depth: Group parameters into layers by their first ``depth`` name parts (None: by owning
            module).
        max_origins: How many ``(step, parameter)`` NaN origins to keep.
        each: Every parameter is a layer of its own (the JSONL log's per-parameter maxima).
    """

    BATCH = 64

    def __init__(
        self,
        names: Sequence[str],
        *,
        depth: int | None = None,
        max_origins: int = 100,
        each: bool = False,
    ) -> None:
        self._setup(LayerGroups(names, depth, each=each), max_origins)

    @classmethod
    def of(cls, groups: LayerGroups, *, max_origins: int = 100) -> StepAggregator:
        """An empty aggregator over layers already grouped (cheap: one per window)."""
        aggregator = cls.__new__(cls)
        aggregator._setup(groups, max_origins)
        return aggregator

    def _setup(self, groups: LayerGroups, max_origins: int) -> None:
        self.groups = groups
        self.names = groups.names
        self.layer_names = groups.layers
        self.max_origins = max_origins
        self.reset()

    def reset(self) -> None:
        """Forget everything: start a new window."""
        self._queue: list[StepReport] = []
        self.steps = 0
        self.first_step: int | None = None
        self.last_step: int | None = None
        self._g_min, self._g_max, self._g_sum, self._g_count = math.inf, -math.inf, 0.0, 0
        self._g_last = math.nan
        self._clip_min = math.inf
        self._counts = [0] * len(COUNTS)
        self._origins: list[tuple[int, str]] = []
        self._layers_ready = False  # per-layer arrays are made when first needed

    def _layer_arrays(self) -> None:
        n_layers = len(self.layer_names)
        self._l_min = np.full(n_layers, np.inf)
        self._l_max = np.full(n_layers, -np.inf)
        self._l_sum = np.zeros(n_layers)
        self._l_count = np.zeros(n_layers, dtype=np.int64)
        self._l_last = np.full(n_layers, np.nan)
        self._l_nonfinite = np.zeros(n_layers, dtype=np.int64)
        self._l_culprit = np.zeros(n_layers, dtype=np.int64)
        self._layers_ready = True

    def update(self, report: StepReport) -> None:
        """Add one step (absorbed with the next batch)."""
        self.steps += 1
        if self.first_step is None:
            self.first_step = report.step
        self.last_step = report.step
        self._queue.append(report)
        if len(self._queue) >= self.BATCH:
            self._absorb()

    def add_steps(self, columns: StepColumns) -> None:
        """Add steps given as arrays (e.g. a run read back from its log), after those queued."""
        self._absorb()
        rows = len(columns.step)
        if not rows:
            return
        spans = columns.window_steps
        self.steps += int(spans.sum()) if spans is not None else rows
        if self.first_step is None:
            self.first_step = int(columns.step[0]) - (int(spans[0]) - 1 if spans is not None else 0)
        self.last_step = int(columns.step[-1])
        self._add(columns)

    def layer_norms(self, report: StepReport) -> tuple[np.ndarray, np.ndarray]:
        """L2 norm of each layer's gradient at one step, and which layers had a gradient."""
        return self.groups.of_report(report)

    def layer_max(self) -> np.ndarray:
        """Each layer's largest finite norm so far (NaN where none was finite)."""
        self._absorb()
        if not self._layers_ready:
            self._layer_arrays()
        return np.where(self._l_max > -np.inf, self._l_max, np.nan)

    def clip_min(self) -> float:
        """The smallest finite clip coefficient so far (the hardest clip), NaN if none."""
        self._absorb()
        return self._clip_min if self._clip_min < math.inf else math.nan

    def _absorb(self) -> None:
        queue, self._queue = self._queue, []
        if not queue:
            return
        names = self.names
        if all(r.param_norms.names is names or r.param_norms.names == names for r in queue):
            layer, present = self.groups.matrix(np.stack([r.param_norms.values for r in queue]))
        else:
            pairs = [self.groups.of_report(r) for r in queue]
            layer, present = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        position = self.groups.position
        self._add(
            StepColumns(
                step=np.array([r.step for r in queue]),
                global_norm=np.array([r.global_norm for r in queue], dtype=np.float64),
                clip_coef=np.array([r.clip_coef for r in queue], dtype=np.float64),
                spike=np.array([r.spike for r in queue], dtype=np.bool_),
                loss_spike=np.array([r.loss_spike for r in queue], dtype=np.bool_),
                skipped=np.array([r.skipped for r in queue], dtype=np.bool_),
                nonfinite=np.array([bool(r.nonfinite) for r in queue], dtype=np.bool_),
                layer_norms=layer,
                layer_present=present,
                origins=[(r.step, r.nonfinite[0]) for r in queue if r.nonfinite],
                culprits=[position[n] for r in queue for n in r.spike_params],
            )
        )

    def _add(self, c: StepColumns) -> None:
        if not self._layers_ready:
            self._layer_arrays()
        g = c.global_norm
        finite_g = np.isfinite(g)
        peak_g = g if c.peak_global is None else c.peak_global
        finite_peak = np.isfinite(peak_g)
        if finite_g.any():
            self._g_min = min(self._g_min, float(g[finite_g].min()))
            self._g_sum += float(g[finite_g].sum())
            self._g_count += int(finite_g.sum())
        if finite_peak.any():
            self._g_max = max(self._g_max, float(peak_g[finite_peak].max()))
        self._g_last = float(g[-1])
        coef = c.clip_coef[np.isfinite(c.clip_coef)]
        if len(coef):
            self._clip_min = min(self._clip_min, float(coef.min()))
        self._counts = [a + b for a, b in zip(self._counts, c.counts())]
        room = self.max_origins - len(self._origins)
        self._origins.extend(list(c.origins)[: max(room, 0)])
        if len(c.culprits):
            np.add.at(self._l_culprit, self.groups.of_param[np.asarray(c.culprits)], 1)

        layer, present = c.layer_norms, c.layer_present
        finite = np.isfinite(layer)
        peak = layer if c.peak_layers is None else c.peak_layers
        self._l_last = layer[-1]
        self._l_nonfinite += (present & ~finite).sum(axis=0)
        self._l_min = np.fmin(self._l_min, np.where(finite, layer, np.inf).min(axis=0))
        self._l_max = np.fmax(self._l_max, np.where(np.isfinite(peak), peak, -np.inf).max(axis=0))
        self._l_sum += np.where(finite, layer, 0.0).sum(axis=0)
        self._l_count += finite.sum(axis=0)

    def summary(self, *, layers: bool = True) -> RunSummary:
        """The statistics so far as a record (``layers=False``: without the per-layer ones)."""
        self._absorb()
        if not self._layers_ready:
            self._layer_arrays()
        count = np.maximum(self._l_count, 1)
        rows = tuple(
            LayerSummary(
                name=name,
                min=float(self._l_min[i]) if self._l_count[i] else math.nan,
                mean=float(self._l_sum[i] / count[i]) if self._l_count[i] else math.nan,
                max=float(self._l_max[i]) if self._l_max[i] > -math.inf else math.nan,
                last=float(self._l_last[i]),
                steps=int(self._l_count[i]),
                nonfinite_steps=int(self._l_nonfinite[i]),
                spike_culprit=int(self._l_culprit[i]),
            )
            for i, name in enumerate(self.layer_names if layers else ())
        )
        found = self._g_count > 0
        norms = {
            "global_min": self._g_min if found else math.nan,
            "global_mean": self._g_sum / self._g_count if found else math.nan,
            "global_max": self._g_max if self._g_max > -math.inf else math.nan,
            "global_last": self._g_last,
        }
        counts = dict(zip(_COUNT_FIELDS, (int(n) for n in self._counts)))
        origins = tuple(self._origins)
        return RunSummary(
            self.steps,
            self.first_step,
            self.last_step,
            **norms,
            **counts,
            layers=rows,
            nonfinite_origins=origins,
        )
