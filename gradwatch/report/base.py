"""The sink interface, safe fan-out to sinks, and aggregation of steps into summaries.

A sink receives every record (:class:`~gradwatch.records.RunStart`, each
:class:`~gradwatch.records.StepReport`, each :class:`~gradwatch.records.Event`, and the final
:class:`~gradwatch.records.RunSummary`) through one method, ``write``. Sinks that report every N
steps aggregate the steps in between with :class:`StepAggregator`, so a window's max, mean and
counts cover every step, not only the last one.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from gradwatch.errors import GradWatchWarning
from gradwatch.layers import layer_of
from gradwatch.records import LayerSummary, Record, RunSummary, StepReport

__all__ = ["NEVER", "Sink", "SinkGroup", "StepAggregator", "layer_of", "window_due"]


class Sink:
    """Base class of every sink. Subclass it and implement :meth:`write`.

    Example, a sink that forwards window summaries to an experiment tracker::

        class TrackerSink(gradwatch.Sink):
            def __init__(self, run, every=50):
                self.run, self.every = run, every
            def write(self, record):
                if isinstance(record, gradwatch.StepReport) and record.step % self.every == 0:
                    self.run.log({"grad_norm/global": record.global_norm}, step=record.step)
    """

    def write(self, record: Record) -> None:
        """Receive one record. Called on the training thread: keep it cheap."""
        raise NotImplementedError

    def next_due(self, step: int) -> int:
        """The first step after ``step`` that this sink needs as soon as it is computed.

        Records always arrive in order and events (NaN/Inf, spikes, skipped steps) always at
        once; the steps in between may reach a sink in batches of up to 32, which makes
        monitoring cheaper. A sink that shows or stores something every N steps returns the step
        its next output covers; one that wants every step at once (the default, e.g. to lose
        nothing if the process is killed) returns ``step + 1``; one that never needs a step
        early (a background writer) returns :data:`NEVER`.

        Args:
            step: The last step this sink has received.
        """
        return step + 1

    def close(self) -> None:
        """Release resources (files, writers). Called once, after the final summary."""


NEVER = sys.maxsize
"""What :meth:`Sink.next_due` returns for a sink that never needs a step early."""


def window_due(step: int, every: int, filled: int) -> int:
    """:meth:`Sink.next_due` of a sink writing one line per window of ``every`` steps.

    Args:
        step: The last step the sink has received.
        every: Steps per window (0: the sink writes no periodic line, so never).
        filled: Steps already in the current window.
    """
    return NEVER if not every else step + every - filled


class SinkGroup:
    """Fans records out to sinks; a sink that raises is disabled with one warning, never fatal.

    A diagnostics tool must not kill the run it is diagnosing: if a sink fails (disk full, broken
    pipe, a tracker's network error), the others go on and training continues. ``SystemExit``
    from a sink counts as a failure too (rich's console raises it on a broken pipe). A
    ``KeyboardInterrupt`` is the user's: the record still reaches the other sinks, then it
    propagates. A disabled sink is closed at once (errors ignored) to release its file.
    """

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks: list[Sink] = list(sinks)
        self.disabled: list[tuple[Sink, BaseException]] = []

    def write(self, record: Record) -> None:
        self._each(lambda sink: sink.write(record), close_failed=True)

    def next_due(self, step: int) -> int:
        """The earliest :meth:`Sink.next_due` over the sinks (:data:`NEVER` without sinks)."""
        dues = [NEVER]

        def ask(sink: Sink) -> None:
            next_due = getattr(sink, "next_due", None)  # duck-typed sinks: every step
            dues.append(step + 1 if next_due is None else int(next_due(step)))

        self._each(ask, close_failed=True)
        return min(dues)

    def close(self) -> None:
        self._each(lambda sink: getattr(sink, "close", _nothing)(), close_failed=False)

    def _each(self, call: Callable[[Sink], object], *, close_failed: bool) -> None:
        interrupt: KeyboardInterrupt | None = None
        for sink in tuple(self.sinks):
            try:
                call(sink)
            except (Exception, SystemExit) as err:
                self._disable(sink, err)
                if close_failed:
                    with contextlib.suppress(Exception, SystemExit):
                        getattr(sink, "close", _nothing)()
            except KeyboardInterrupt as err:
                interrupt = interrupt or err
        if interrupt is not None:
            raise interrupt

    def _disable(self, sink: Sink, err: BaseException) -> None:
        self.sinks.remove(sink)
        self.disabled.append((sink, err))
        cause = f"{type(err).__name__}: {err}"
        if isinstance(err, SystemExit) and err.__context__ is not None:  # e.g. rich on EPIPE
            cause += f" after {type(err.__context__).__name__}: {err.__context__}"
        warnings.warn(
            f"gradwatch: sink {type(sink).__name__} failed and was disabled "
            f"({cause}); training and the other sinks continue",
            GradWatchWarning,
            stacklevel=_outside_gradwatch(),
        )


_TORCH_OPTIM = f"{os.sep}torch{os.sep}optim{os.sep}"


def _outside_gradwatch() -> int:
    """``stacklevel`` of the nearest caller outside gradwatch, for the caller of ``_disable``.

    Frames of torch's optimizers are skipped too: an attached watcher checks from their step
    hook, and the warning belongs to the loop that called ``optimizer.step()``.
    """
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1  # level 1 is _disable itself
    while frame is not None and (
        frame.f_code.co_filename.startswith(package) or _TORCH_OPTIM in frame.f_code.co_filename
    ):
        frame, level = frame.f_back, level + 1
    return level


def _nothing() -> None:
    """Stands in for the ``close`` of a sink that has none."""


class StepAggregator:
    """Accumulates step reports into a :class:`RunSummary`: global and per-layer statistics.

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
    """

    BATCH = 64

    def __init__(
        self, names: Sequence[str], *, depth: int | None = None, max_origins: int = 100
    ) -> None:
        self.names = tuple(names)
        self._position = {n: i for i, n in enumerate(self.names)}
        layers: dict[str, int] = {}
        self._layer_of_param = np.array(
            [layers.setdefault(layer_of(n, depth), len(layers)) for n in self.names], dtype=np.intp
        )
        self.layer_names = tuple(layers)
        # Columns sorted by layer, and where each layer starts: a batch's per-layer sums of squares
        # are one np.add.reduceat over the permuted columns.
        self._perm = np.argsort(self._layer_of_param, kind="stable")
        self._starts = np.searchsorted(self._layer_of_param[self._perm], np.arange(len(layers)))
        self.max_origins = max_origins
        self.reset()

    def reset(self) -> None:
        """Forget everything: start a new window."""
        n_layers = len(self.layer_names)
        self._queue: list[StepReport] = []
        self.steps = 0
        self.first_step: int | None = None
        self.last_step: int | None = None
        self._g_min, self._g_max, self._g_sum, self._g_count = math.inf, -math.inf, 0.0, 0
        self._g_last = math.nan
        self._clipped = self._spikes = self._loss_spikes = self._nonfinite = self._skipped = 0
        self._origins: list[tuple[int, str]] = []
        self._l_min = np.full(n_layers, np.inf)
        self._l_max = np.full(n_layers, -np.inf)
        self._l_sum = np.zeros(n_layers)
        self._l_count = np.zeros(n_layers, dtype=np.int64)
        self._l_last = np.full(n_layers, np.nan)
        self._l_nonfinite = np.zeros(n_layers, dtype=np.int64)
        self._l_culprit = np.zeros(n_layers, dtype=np.int64)

    def update(self, report: StepReport) -> None:
        """Add one step (absorbed with the next batch)."""
        self.steps += 1
        if self.first_step is None:
            self.first_step = report.step
        self.last_step = report.step
        self._queue.append(report)
        if len(self._queue) >= self.BATCH:
            self._absorb()

    def layer_norms(self, report: StepReport) -> tuple[np.ndarray, np.ndarray]:
        """L2 norm of each layer's gradient at one step, and which layers had a gradient.

        Layers without any gradient at that step get NaN in the first array and False in the second.
        """
        norms = report.param_norms
        if self._is_full(norms.names):
            return self._layer_matrix(norms.values[None, :])[0], np.ones(
                len(self.layer_names), bool
            )
        index = self._layer_of_param[[self._position[n] for n in norms.names]]
        n_layers = len(self.layer_names)
        squares = np.bincount(
            index, weights=np.square(norms.values, dtype=np.float64), minlength=n_layers
        )
        present = np.bincount(index, minlength=n_layers) > 0
        with np.errstate(invalid="ignore"):
            out = np.sqrt(squares)
        out[~present] = np.nan
        return out, present

    def _is_full(self, names: tuple[str, ...]) -> bool:
        """True if ``names`` are all the parameters, in order (cheap when it is the same tuple)."""
        return names is self.names or names == self.names

    def _layer_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Per-layer L2 norms of a (steps, params) matrix of parameter norms."""
        squares = np.square(matrix[:, self._perm], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.add.reduceat(squares, self._starts, axis=1))

    def _absorb(self) -> None:
        queue, self._queue = self._queue, []
        if not queue:
            return
        g = np.array([r.global_norm for r in queue], dtype=np.float64)
        finite_g = np.isfinite(g)
        if finite_g.any():
            self._g_min = min(self._g_min, float(g[finite_g].min()))
            self._g_max = max(self._g_max, float(g[finite_g].max()))
            self._g_sum += float(g[finite_g].sum())
            self._g_count += int(finite_g.sum())
        self._g_last = float(g[-1])
        for r in queue:
            self._clipped += r.clip_coef < 1.0
            self._spikes += r.spike
            self._loss_spikes += r.loss_spike
            self._skipped += r.skipped
            if r.nonfinite:
                self._nonfinite += 1
                if len(self._origins) < self.max_origins:
                    self._origins.append((r.step, r.nonfinite[0]))
            for name in r.spike_params:
                self._l_culprit[self._layer_of_param[self._position[name]]] += 1

        full = [r.param_norms.values for r in queue if self._is_full(r.param_norms.names)]
        if len(full) == len(queue):
            layer = self._layer_matrix(np.stack(full))
            present = np.ones_like(layer, dtype=bool)
        else:
            pairs = [self.layer_norms(r) for r in queue]
            layer = np.stack([p[0] for p in pairs])
            present = np.stack([p[1] for p in pairs])
        finite = np.isfinite(layer)
        self._l_last = layer[-1]
        self._l_nonfinite += (present & ~finite).sum(axis=0)
        self._l_min = np.fmin(self._l_min, np.where(finite, layer, np.inf).min(axis=0))
        self._l_max = np.fmax(self._l_max, np.where(finite, layer, -np.inf).max(axis=0))
        self._l_sum += np.where(finite, layer, 0.0).sum(axis=0)
        self._l_count += finite.sum(axis=0)

    def summary(self) -> RunSummary:
        """The statistics so far as a record."""
        self._absorb()
        count = np.maximum(self._l_count, 1)
        layers = tuple(
            LayerSummary(
                name=name,
                min=float(self._l_min[i]) if self._l_count[i] else math.nan,
                mean=float(self._l_sum[i] / count[i]) if self._l_count[i] else math.nan,
                max=float(self._l_max[i]) if self._l_count[i] else math.nan,
                last=float(self._l_last[i]),
                steps=int(self._l_count[i]),
                nonfinite_steps=int(self._l_nonfinite[i]),
                spike_culprit=int(self._l_culprit[i]),
            )
            for i, name in enumerate(self.layer_names)
        )
        found = self._g_count > 0
        return RunSummary(
            steps=self.steps,
            first_step=self.first_step,
            last_step=self.last_step,
            global_min=self._g_min if found else math.nan,
            global_mean=self._g_sum / self._g_count if found else math.nan,
            global_max=self._g_max if found else math.nan,
            global_last=self._g_last,
            clipped_steps=int(self._clipped),
            spikes=int(self._spikes),
            loss_spikes=int(self._loss_spikes),
            nonfinite_steps=int(self._nonfinite),
            skipped_steps=int(self._skipped),
            layers=layers,
            nonfinite_origins=tuple(self._origins),
        )
