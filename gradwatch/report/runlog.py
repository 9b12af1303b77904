"""Reading a JSONL run log back: :func:`read_run` returns a :class:`RunLog` of numpy arrays.

The reader is the other half of :class:`~gradwatch.report.jsonl.JsonlSink`. It is built for logs
of long runs (100k steps parse in seconds: one ``json.loads`` per line, columns built with numpy)
and for logs of runs that died: a truncated last line, or a half-written line left in the middle
by a killed run that was later appended to, is skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.errors import GradWatchError
from gradwatch.records import (
    Event,
    LayerSummary,
    ParamInfo,
    RunStart,
    RunSummary,
)
from gradwatch.report.base import layer_of
from gradwatch.report.jsonl import (
    FORMAT,
    FORMAT_VERSION,
    decode_event,
    decode_float,
    decode_summary,
)

__all__ = ["RunLog", "RunLogError", "RunLogNotFoundError", "read_run"]


class RunLogError(GradWatchError, ValueError):
    """A file cannot be read as a gradwatch run log (not one, empty, or damaged beyond repair)."""


class RunLogNotFoundError(RunLogError, FileNotFoundError):
    """The run log does not exist."""


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
        bad_lines: Unreadable lines skipped, besides a truncated last line.
        run_index: Which run of the file this is (a file appended to holds several).
        run_count: Number of runs in the file.
        window_totals: With ``every > 1``, event counts summed over all windows.
        spike_columns: ``(row, columns)`` of the parameters blamed for each spike.
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
    bad_lines: int
    run_index: int
    run_count: int
    window_totals: Mapping[str, int] = field(default_factory=dict, repr=False)
    spike_columns: tuple[tuple[int, tuple[int, ...]], ...] = field(default=(), repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names, in column order."""
        return tuple(p.name for p in self.header.params)

    def __len__(self) -> int:
        return len(self.step)

    def layer_names(self, depth: int | None = None) -> tuple[str, ...]:
        """Layers in model order, grouped as :func:`~gradwatch.report.base.layer_of` does."""
        return tuple(dict.fromkeys(layer_of(n, depth) for n in self.names))

    def layer_norms(self, depth: int | None = None, *, peak: bool = False) -> np.ndarray:
        """Each layer's gradient norm at each recorded step, shape ``(steps, layers)``.

        A layer's norm is the L2 norm of its parameters' gradients together; NaN where none of its
        parameters had a gradient, NaN/inf where one was non-finite.

        Args:
            depth: Group parameters by their first ``depth`` name parts (None: owning module).
            peak: Combine :attr:`peak_norms` instead of :attr:`norms` (for sampled logs this is an
                upper bound of the layer's largest norm in each window).
        """
        return self._layers(depth, peak)[0]

    def layer_present(self, depth: int | None = None) -> np.ndarray:
        """Whether each layer had any gradient at each recorded step, shape ``(steps, layers)``."""
        return self._layers(depth, peak=False)[1]

    def _layers(self, depth: int | None, peak: bool) -> tuple[np.ndarray, np.ndarray]:
        """Layer norms and whether each layer had any gradient, shape ``(steps, layers)``."""
        values = self.peak_norms if peak else self.norms
        present = ~np.isnan(values) if peak else self.present
        layers = self.layer_names(depth)
        index = {name: i for i, name in enumerate(layers)}
        column_layer = np.array([index[layer_of(n, depth)] for n in self.names], dtype=np.intp)
        if values.size == 0:
            empty = np.full((len(values), len(layers)), np.nan)
            return empty, np.zeros(empty.shape, dtype=np.bool_)
        order = np.argsort(column_layer, kind="stable")
        starts = np.searchsorted(column_layer[order], np.arange(len(layers)))
        squares = np.where(present, np.square(values), 0.0)[:, order]
        with np.errstate(invalid="ignore"):
            norms = np.sqrt(np.add.reduceat(squares, starts, axis=1))
        has = np.add.reduceat(present[:, order].astype(np.int32), starts, axis=1) > 0
        norms[~has] = np.nan
        return norms, has

    def summarize(self, depth: int | None = None) -> RunSummary:
        """A :class:`~gradwatch.records.RunSummary` computed from the recorded steps.

        For runs that did not close (no summary record). With ``every > 1``, counts and maxima
        cover every step (from the windows), minima and means the recorded steps only.
        """
        g = self.global_norm[np.isfinite(self.global_norm)]
        peak = self.peak_global_norm[np.isfinite(self.peak_global_norm)]
        layers = self.layer_names(depth)
        norms, has = self._layers(depth, peak=False)
        peaks, _ = self._layers(depth, peak=True)
        index = {name: i for i, name in enumerate(layers)}
        culprit = np.zeros(len(layers), dtype=np.int64)
        for _, columns in self.spike_columns:
            for column in columns:
                culprit[index[layer_of(self.names[column], depth)]] += 1
        summaries = []
        for i, name in enumerate(layers):
            column = norms[:, i]
            ok = np.isfinite(column)
            top = peaks[:, i][np.isfinite(peaks[:, i])]
            summaries.append(
                LayerSummary(
                    name=name,
                    min=float(column[ok].min()) if ok.any() else math.nan,
                    mean=float(column[ok].mean()) if ok.any() else math.nan,
                    max=float(top.max()) if len(top) else math.nan,
                    last=float(column[-1]) if len(column) else math.nan,
                    steps=int(ok.sum()),
                    nonfinite_steps=int((has[:, i] & ~ok).sum()),
                    spike_culprit=int(culprit[i]),
                )
            )
        origins = tuple(
            (e.step, e.params[0]) for e in self.events if e.kind == "nonfinite" and e.params
        )[:100]
        totals = self.window_totals
        n = len(self)
        return RunSummary(
            steps=int(self.window_steps.sum()),
            first_step=int(self.step[0] - self.window_steps[0] + 1) if n else None,
            last_step=int(self.step[-1]) if n else None,
            global_min=float(g.min()) if len(g) else math.nan,
            global_mean=float(g.mean()) if len(g) else math.nan,
            global_max=float(peak.max()) if len(peak) else math.nan,
            global_last=float(self.global_norm[-1]) if n else math.nan,
            clipped_steps=int(totals.get("clipped", (self.clip_coef < 1.0).sum())),
            spikes=int(totals.get("spikes", self.spike.sum())),
            loss_spikes=int(totals.get("loss_spikes", self.loss_spike.sum())),
            nonfinite_steps=int(totals.get("nonfinite", self.nonfinite.sum())),
            skipped_steps=int(totals.get("skipped", self.skipped.sum())),
            layers=tuple(summaries),
            nonfinite_origins=origins,
        )


def read_run(path: str | os.PathLike[str], *, run: int = -1) -> RunLog:
    """Read one run of a JSONL run log written by :class:`~gradwatch.report.jsonl.JsonlSink`.

    Args:
        path: The log file.
        run: Which run, when the file holds several (appended with ``mode="a"``): 0 for the first,
            -1 (default) for the last.

    Returns:
        The run as arrays, its events and its summary (None if the run never closed).

    Raises:
        RunLogNotFoundError: ``path`` does not exist.
        RunLogError: ``path`` is empty, not a gradwatch run log, cut off before its header was
            complete, written in a newer format, or ``run`` is out of range.
    """
    path = Path(path)
    data = _read_bytes(path)
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    if complete:
        lines.pop()  # the empty string after the final newline
    headers = _headers(path, lines, complete)
    count = len(headers)
    if not isinstance(run, int) or isinstance(run, bool):
        raise RunLogError(f"run must be an int (0 = first run, -1 = last), got {run!r}")
    if not -count <= run < count:
        raise RunLogError(f"run must be in [{-count}, {count - 1}] for {str(path)!r}, got {run}")
    index = run % count
    start, header = headers[index]
    stop = headers[index + 1][0] if index + 1 < count else len(lines)
    builder = _Builder(header)
    for i in range(start + 1, stop):
        line = lines[i]
        if line.strip() and not builder.add(line) and (complete or i != len(lines) - 1):
            builder.bad += 1
    truncated = not complete and stop == len(lines) and not builder.last_ok
    return builder.build(path, truncated, index, count)


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RunLogNotFoundError(f"run log {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise RunLogError(f"{str(path)!r} is a directory, not a run log file") from None
    except OSError as err:
        raise RunLogError(f"cannot read run log {str(path)!r}: {err.strerror or err}") from None
    if not data.strip():
        raise RunLogError(
            f"run log {str(path)!r} is empty: the run wrote nothing (it stopped before "
            "GradWatch was created, or the sink was not passed to GradWatch(sinks=[...]))"
        )
    return data


def _headers(path: Path, lines: list[bytes], complete: bool) -> list[tuple[int, dict[str, Any]]]:
    """``(line index, header)`` of every run in the file; the first line must be a header."""
    first = next(i for i, line in enumerate(lines) if line.strip())
    headers = []
    for i, line in enumerate(lines):
        if i != first and b'"header"' not in line[:64]:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
            if i == first and not complete and i == len(lines) - 1 and b'"header"' in line[:64]:
                raise RunLogError(
                    f"run log {str(path)!r} ends inside its header (the run was killed while "
                    "starting); there is nothing to report"
                ) from None
        header = record if isinstance(record, dict) and record.get("type") == "header" else None
        if i == first and (header is None or header.get("format") != FORMAT):
            raise RunLogError(
                f"{str(path)!r} is not a gradwatch run log: its first line is not a gradwatch "
                f'header (a JSON object with "format": "{FORMAT}", as written by JsonlSink)'
            )
        if header is None:
            continue
        version = header.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise RunLogError(
                f"run log {str(path)!r} uses format version {version}, newer than this "
                f"gradwatch reads ({FORMAT_VERSION}); upgrade gradwatch"
            )
        headers.append((i, header))
    return headers


_NORMS_KEY = b',"norms":['
_STEP_FLOATS = ("global_norm", "clipped_norm", "clip_coef", "loss", "spike_threshold", "scale")
_STEP_FLAGS = ("spike", "loss_spike", "skipped")
_WINDOW_COUNTS = ("clipped", "spikes", "loss_spikes", "nonfinite", "skipped")


def _parse_numbers(text: bytes) -> np.ndarray:
    """Comma-separated JSON numbers, ``"NaN"``/``"Infinity"``/``"-Infinity"`` and null."""
    if not text:
        return np.empty(0)
    if b'"' in text or b"l" in text:  # numpy reads NaN, Infinity, nan itself; not quotes or null
        text = text.replace(b'"', b"").replace(b"null", b"nan")
    return np.array(text.split(b","), dtype=np.float64)


def _concat(chunks: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)


class _Builder:
    """Collects one run's records line by line, then turns them into arrays.

    Step lines are split at their ``norms`` key (always last): the short head goes through
    ``json``, the norm vectors are parsed in bulk by numpy, a chunk of rows at a time. This is
    what keeps a 100k-step log to seconds: per-number parsing in ``json`` dominates otherwise.
    """

    _CHUNK = 4096

    def __init__(self, header: dict[str, Any]) -> None:
        self.header = header
        self.params = tuple(
            ParamInfo(str(p["name"]), tuple(p.get("shape") or ()), str(p.get("dtype", "")))
            for p in header.get("params", ())
        )
        self.n_params = len(self.params)
        self.columns: dict[str, list[np.ndarray]] = {k: [] for k in (*_STEP_FLOATS, *_STEP_FLAGS)}
        self.steps: list[int] = []
        self.heads: list[dict[str, Any]] = []
        self.first_nonfinite: dict[int, int] = {}
        self.spike_columns: list[tuple[int, tuple[int, ...]]] = []
        self.rows: list[bytes] = []
        self.chunks: list[np.ndarray] = []
        self.absent: list[tuple[int, list[bool]]] = []
        self.windows: dict[int, dict[str, Any]] = {}
        self.events: list[Event] = []
        self.summary: RunSummary | None = None
        self.bad = 0
        self.last_ok = True

    def add(self, line: bytes) -> bool:
        """Add one line; False if it cannot be read."""
        try:
            split = line.rfind(_NORMS_KEY)
            if split > 0 and line.endswith(b"]}"):
                self._step(json.loads(line[:split] + b"}"), line[split + len(_NORMS_KEY) : -2])
            else:
                record = json.loads(line)
                kind = record["type"]
                if kind == "step":
                    self._step(record, None)
                elif kind == "event":
                    self.events.append(decode_event(record))
                elif kind == "summary":
                    self.summary = decode_summary(record)
        except (ValueError, KeyError, TypeError, IndexError):
            self.last_ok = False
            return False
        self.last_ok = True
        return True

    def _step(self, record: dict[str, Any], norms: bytes | None) -> None:
        if record.get("type") != "step":
            raise ValueError("not a step record")
        if norms is None:  # a step written by another tool, norms not last
            norms = json.dumps(record["norms"]).encode()[1:-1]
        expected = self.n_params - 1
        if (norms.count(b",") != expected) if self.n_params else norms.strip():
            raise ValueError("norm vector does not match the header's parameters")
        row = len(self.steps)
        self.steps.append(int(record["step"]))  # first: a bad step raises before any append
        if "nonfinite" in record or "spike_params" in record or "window" in record:
            self._extras(row, record)
        if b"null" in norms:
            self.absent.append((row, [v != b"null" for v in norms.split(b",")]))
        self.heads.append(record)
        self.rows.append(norms)
        if len(self.rows) >= self._CHUNK:
            self._flush_rows()

    def _extras(self, row: int, record: dict[str, Any]) -> None:
        nonfinite = record.get("nonfinite")
        if nonfinite:
            self.first_nonfinite[row] = int(nonfinite[0])
        if record.get("spike_params"):
            columns = (int(c) for c in record["spike_params"])
            self.spike_columns.append((row, tuple(c for c in columns if 0 <= c < self.n_params)))
        window = record.get("window")
        if window is not None:
            self.windows[row] = window

    def _flush_rows(self) -> None:
        """Turn the buffered rows into arrays: norms parsed in bulk, one column per field."""
        if not self.rows:
            return
        try:
            values = _parse_numbers(b",".join(self.rows))
        except ValueError:  # a damaged row: parse row by row, blank the ones that fail
            values = np.concatenate([self._parse_row(row) for row in self.rows])
        self.chunks.append(values.reshape(len(self.rows), self.n_params))
        heads = self.heads
        for key in (*_STEP_FLOATS, *_STEP_FLAGS):
            # np.array turns null into nan and "NaN"/"Infinity"/"-Infinity" into nan/inf/-inf.
            dtype = np.bool_ if key in _STEP_FLAGS else np.float64
            self.columns[key].append(np.array([h.get(key) for h in heads], dtype=dtype))
        self.rows, self.heads = [], []

    def _parse_row(self, row: bytes) -> np.ndarray:
        try:
            return _parse_numbers(row)
        except ValueError:
            self.bad += 1
            return np.full(self.n_params, np.nan)

    def build(self, path: Path, truncated: bool, index: int, count: int) -> RunLog:
        self._flush_rows()
        n, n_params = len(self.steps), self.n_params
        floats = {k: _concat(self.columns[k], np.float64) for k in _STEP_FLOATS}
        flags = {k: _concat(self.columns[k], np.bool_) for k in _STEP_FLAGS}
        first_nonfinite = np.full(n, -1, dtype=np.int64)
        nonfinite = np.zeros(n, dtype=np.bool_)
        for row, column in self.first_nonfinite.items():
            first_nonfinite[row] = column
            nonfinite[row] = True
        norms = np.concatenate(self.chunks) if self.chunks else np.empty((0, n_params))
        present = np.ones((n, n_params), dtype=np.bool_)
        for row, mask in self.absent:
            present[row] = mask
        peak_norms, peak_global = norms, floats["global_norm"]
        window_steps = np.ones(n, dtype=np.int64)
        totals: dict[str, int] = {}
        if self.windows:
            peak_norms, peak_global = norms.copy(), peak_global.copy()
            for row, w in self.windows.items():
                peak_norms[row] = np.array(w["norms_max"], dtype=np.float64)
                peak_global[row] = decode_float(w.get("global_max"))
                window_steps[row] = int(w.get("steps", 1))
            for key in _WINDOW_COUNTS:
                totals[key] = sum(int(w.get(key, 0)) for w in self.windows.values())
        header = self.header
        start = RunStart(
            str(header.get("gradwatch_version", "")),
            str(header.get("torch_version", "")),
            self.params,
            header.get("config") or {},
            decode_float(header.get("time")),
        )
        return RunLog(
            path=path,
            header=start,
            every=int(header.get("every", 1)),
            step=np.array(self.steps, dtype=np.int64),
            **floats,
            **flags,
            nonfinite=nonfinite,
            first_nonfinite=first_nonfinite,
            norms=norms,
            present=present,
            window_steps=window_steps,
            peak_global_norm=peak_global,
            peak_norms=peak_norms,
            events=tuple(self.events),
            summary=self.summary,
            truncated=truncated,
            bad_lines=self.bad,
            run_index=index,
            run_count=count,
            window_totals=totals,
            spike_columns=tuple(self.spike_columns),
        )
