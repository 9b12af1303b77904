"""Reading a JSONL run log back: :func:`read_run` returns a :class:`RunLog` of numpy arrays.

The reader is the other half of :class:`~gradwatch.report.jsonl.JsonlSink`. It is built for logs
of long runs (100k steps parse in seconds: one ``json.loads`` per line, columns built with numpy)
and for logs of runs that died: a truncated last line, or a half-written line left in the middle
by a killed run that was later appended to, is skipped and counted, never fatal.

This module turns the file into columns; :class:`RunLog` itself, and the questions asked of it
(layer norms, a summary of a run that never closed), live in
:mod:`gradwatch.report.runlog_arrays` and are re-exported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.errors import GradWatchError
from gradwatch.records import Event, ParamInfo, RunStart, RunSummary
from gradwatch.report.jsonl import (
    FORMAT,
    FORMAT_VERSION,
    decode_event,
    decode_float,
    decode_summary,
)
from gradwatch.report.runlog_arrays import RunLog

__all__ = ["RunLog", "RunLogError", "RunLogNotFoundError", "read_run"]


class RunLogError(GradWatchError, ValueError):
    """A file cannot be read as a gradwatch run log (not one, empty, or damaged beyond repair)."""


class RunLogNotFoundError(RunLogError, FileNotFoundError):
    """The run log does not exist."""


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
_STEP_EXTRAS = ("nonfinite", "spike_params", "nonfinite_ranks", "window")  # sparse step keys


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
        self.nonfinite_ranks: list[tuple[int, tuple[int, ...]]] = []
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
        row, step = len(self.steps), int(record["step"])  # a bad step raises before any append
        if any(key in record for key in _STEP_EXTRAS):
            self._extras(row, record)
        self.steps.append(step)
        if b"null" in norms:
            self.absent.append((row, [v != b"null" for v in norms.split(b",")]))
        self.heads.append(record)
        self.rows.append(norms)
        if len(self.rows) >= self._CHUNK:
            self._flush_rows()

    def _extras(self, row: int, record: dict[str, Any]) -> None:
        """A step's sparse fields, all parsed before any is kept: a bad one leaves no trace."""
        nonfinite = record.get("nonfinite")
        first = int(nonfinite[0]) if nonfinite else None
        columns = tuple(int(c) for c in record.get("spike_params") or ())
        ranks = tuple(int(r) for r in record.get("nonfinite_ranks") or ())
        window = record.get("window")
        if first is not None:
            self.first_nonfinite[row] = first
        if record.get("spike_params"):
            self.spike_columns.append((row, tuple(c for c in columns if 0 <= c < self.n_params)))
        if ranks:
            self.nonfinite_ranks.append((row, ranks))
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
            nonfinite_ranks=tuple(self.nonfinite_ranks),
        )
