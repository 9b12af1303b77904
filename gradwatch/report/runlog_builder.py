"""A run log's lines read into arrays: the builder behind ``read_run``.

Step lines are split at their ``norms`` key (always last): the short head goes through ``json``,
the norm vectors are parsed in bulk by numpy, a chunk of rows at a time; every field is checked
as it is read (:mod:`gradwatch.report.logformat`), and a line that fails a check is skipped whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.records import Event, ParamInfo, RunStart, RunSummary
from gradwatch.report.logformat import (
    LogFieldError,
    decode_event,
    decode_float,
    decode_summary,
    expect,
    show_value,
)
from gradwatch.report.runlog_arrays import RunLog

__all__ = ["RunBuilder"]


_NORMS_KEY = b',"norms":['
_STEP_FLOATS = (
    "global_norm",
    "clipped_norm",
    "clip_coef",
    "loss",
    "spike_threshold",
    "scale",
    "lr",
)
_STEP_FLAGS = ("spike", "loss_spike", "skipped")
_WINDOW_COUNTS = ("clipped", "spikes", "loss_spikes", "nonfinite", "skipped")
_STEP_EXTRAS = ("nonfinite", "spike_params", "nonfinite_ranks", "window")  # sparse step keys


def _parse_numbers(text: bytes) -> np.ndarray:
    """Comma-separated JSON numbers, ``"NaN"``/``"Infinity"``/``"-Infinity"`` and null.

    Raises:
        ValueError: Something else is in ``text`` (a string such as ``"1.5"``, a list, true).
    """
    if not text:
        return np.empty(0)
    if b'"' in text or b"l" in text:  # numpy reads NaN, Infinity, nan itself; not quotes or null
        for token, number in _TOKENS:
            text = text.replace(token, number)
    return np.array(text.split(b","), dtype=np.float64)


_TOKENS = (
    (b'"NaN"', b"nan"),
    (b'"Infinity"', b"inf"),
    (b'"-Infinity"', b"-inf"),
    (b"null", b"nan"),
)


def _concat(chunks: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)


class RunBuilder:
    """Collects one run's records line by line, then turns them into arrays.

    Step lines are split at their ``norms`` key (always last): the short head goes through
    ``json``, the norm vectors are parsed in bulk by numpy, a chunk of rows at a time. This is
    what keeps a 100k-step log to seconds: per-number parsing in ``json`` dominates otherwise.
    A step is checked field by field as it is read, then held until its chunk is parsed: a row
    whose norms do not parse is dropped whole, so nothing of a bad line is ever kept.
    """

    _CHUNK = 4096

    def __init__(self, header: dict[str, Any]) -> None:
        params = expect(header, "params", "list", items="object") or ()
        self.params = tuple(
            ParamInfo(
                expect(p, "name", "text", required=True, where=f"params[{i}]"),
                tuple(expect(p, "shape", "list", items="int", where=f"params[{i}]") or ()),
                expect(p, "dtype", "text", where=f"params[{i}]") or "",
            )
            for i, p in enumerate(params)
        )
        every = expect(header, "every", "int")
        if every is not None and every < 1:
            raise LogFieldError(f"field 'every' must be an integer >= 1, got {every}")
        self.every = 1 if every is None else every
        self.config = expect(header, "config", "object") or {}
        self.time = decode_float(expect(header, "time", "number"))
        self.versions = tuple(
            expect(header, k, "text") or "" for k in ("gradwatch_version", "torch_version")
        )
        self.n_params = len(self.params)
        self.columns: dict[str, list[np.ndarray]] = {k: [] for k in (*_STEP_FLOATS, *_STEP_FLAGS)}
        self.steps: list[int] = []
        self.first_nonfinite: dict[int, int] = {}
        self.spike_columns: list[tuple[int, tuple[int, ...]]] = []
        self.nonfinite_ranks: list[tuple[int, tuple[int, ...]]] = []
        self.pending: list[tuple[int, dict[str, Any], bytes, tuple[Any, ...] | None]] = []
        self.chunks: list[np.ndarray] = []
        self.absent: list[tuple[int, list[bool]]] = []
        self.windows: dict[int, dict[str, Any]] = {}
        self.events: list[Event] = []
        self.summary: RunSummary | None = None
        self.skipped: list[tuple[int, str]] = []
        self.last_ok = True

    def add(self, line: bytes, number: int) -> str | None:
        """Add line ``number``; if it cannot be used, say why (and keep nothing of it)."""
        kind = None
        try:
            split = line.rfind(_NORMS_KEY)
            head = None
            if split > 0 and line.endswith(b"]}"):
                try:
                    head = json.loads(line[:split] + b"}")
                except ValueError:
                    head = None  # read the whole line below, for its own error
            if isinstance(head, dict) and head.get("type") == "step":
                kind = "step"
                self._step(number, head, line[split + len(_NORMS_KEY) : -2])
            else:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise LogFieldError("not a JSON object")
                kind = expect(record, "type", "text", required=True)
                if kind == "step":
                    self._step(number, record, None)
                elif kind == "event":
                    self.events.append(decode_event(record))
                elif kind == "summary":
                    self.summary = decode_summary(record)
        except LogFieldError as err:
            self.last_ok = False
            return f"{kind} record: {err}" if kind else str(err)
        except ValueError:  # from json: the line is not JSON at all
            self.last_ok = False
            return "not valid JSON (a line cut short by a killed run, or not written by gradwatch)"
        except (KeyError, TypeError, IndexError) as err:  # a shape no check foresaw: still a skip
            self.last_ok = False
            return f"{kind} record: unreadable ({type(err).__name__}: {err})"
        self.last_ok = True
        return None

    def _step(self, number: int, record: dict[str, Any], norms: bytes | None) -> None:
        _check_head(record)
        if norms is None:  # a step written by another tool, norms not last
            values = expect(record, "norms", "list", items="number", required=True)
            norms = json.dumps(values, separators=(",", ":")).encode()[1:-1]
        count = norms.count(b",") + 1 if norms else 0
        if count != self.n_params:
            raise LogFieldError(
                f"field 'norms' must hold one value per parameter of the header "
                f"({self.n_params}), got {count}"
            )
        extras = self._extras(record) if any(k in record for k in _STEP_EXTRAS) else None
        self.pending.append((number, record, norms, extras))
        if len(self.pending) >= self._CHUNK:
            self._flush_rows()

    def _extras(self, record: dict[str, Any]) -> tuple[Any, ...]:
        """A step's sparse fields, all checked before the step is kept."""
        n = self.n_params
        nonfinite = expect(record, "nonfinite", "list", items="int") or ()
        columns = expect(record, "spike_params", "list", items="int") or ()
        ranks = expect(record, "nonfinite_ranks", "list", items="int") or ()
        for key, positions in (("nonfinite", nonfinite), ("spike_params", columns)):
            if any(not -1 <= c < n for c in positions):  # -1: a name not in the header
                raise LogFieldError(
                    f"field {key!r} must hold positions in the header's parameters "
                    f"(-1 to {n - 1}), got {show_value(positions)}"
                )
        window = expect(record, "window", "object")
        if window is not None:
            _check_window(window, n)
        return nonfinite, tuple(c for c in columns if c >= 0), tuple(ranks), window

    def _flush_rows(self) -> None:
        """Parse the held rows' norms in bulk and keep them: one array per field and chunk."""
        pending, n = self.pending, self.n_params
        if not pending:
            return
        try:
            values = _parse_numbers(b",".join(p[2] for p in pending)) if n else np.empty(0)
        except ValueError:  # some row holds something else than numbers: find and drop it
            values, pending = self._parse_each(pending)
        self.chunks.append(values.reshape(len(pending), n))
        for _, record, norms, extras in pending:
            row = len(self.steps)
            self.steps.append(record["step"])
            if b"null" in norms:
                self.absent.append((row, [v != b"null" for v in norms.split(b",")]))
            if extras is not None:
                nonfinite, columns, ranks, window = extras
                if nonfinite:
                    self.first_nonfinite[row] = nonfinite[0]
                if columns:
                    self.spike_columns.append((row, columns))
                if ranks:
                    self.nonfinite_ranks.append((row, ranks))
                if window is not None:
                    self.windows[row] = window
        for key in (*_STEP_FLOATS, *_STEP_FLAGS):
            # np.array turns null into nan and "NaN"/"Infinity"/"-Infinity" into nan/inf/-inf.
            dtype = np.bool_ if key in _STEP_FLAGS else np.float64
            self.columns[key].append(np.array([p[1].get(key) for p in pending], dtype=dtype))
        self.pending = []

    def _parse_each(self, pending: list[Any]) -> tuple[np.ndarray, list[Any]]:
        kept, values = [], []
        for item in pending:
            try:
                values.append(_parse_numbers(item[2]))
                kept.append(item)
            except ValueError:
                text = item[2].decode("utf-8", "replace")
                shown = text if len(text) <= 40 else text[:37] + "..."
                self.skipped.append(
                    (
                        item[0],
                        f"step record: field 'norms' must be a list of numbers or null, "
                        f"got [{shown}]",
                    )
                )
        return (np.concatenate(values) if values else np.empty(0)), kept

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
            for row, w in self.windows.items():  # each checked by _check_window
                peak_norms[row] = np.array(w["norms_max"], dtype=np.float64)
                peak_global[row] = decode_float(w.get("global_max"))
                window_steps[row] = w.get("steps") or 1
            for key in _WINDOW_COUNTS:
                totals[key] = sum(w.get(key) or 0 for w in self.windows.values())
        start = RunStart(*self.versions, self.params, self.config, self.time)
        return RunLog(
            path=path,
            header=start,
            every=self.every,
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
            skipped_lines=tuple(sorted(self.skipped)),
            run_index=index,
            run_count=count,
            window_totals=totals,
            spike_columns=tuple(self.spike_columns),
            nonfinite_ranks=tuple(self.nonfinite_ranks),
        )


def _check_head(record: dict[str, Any]) -> None:
    """A step's fields besides its norms, checked fast (the message comes from ``expect``).

    Raises:
        LogFieldError: ``step`` is missing or not an integer, or another field has another type.
    """
    if type(record.get("step")) is not int:
        expect(record, "step", "int", required=True)
    for key in _STEP_FLOATS:
        value = record.get(key)
        if value is not None and type(value) not in (float, int):
            expect(record, key, "number")
    for key in _STEP_FLAGS:
        value = record.get(key)
        if value is not None and type(value) is not bool:
            expect(record, key, "flag")


def _check_window(window: dict[str, Any], n_params: int) -> None:
    """The ``window`` of a sampled step (``every > 1``).

    Raises:
        LogFieldError: A field is missing or of another type.
    """
    expect(window, "first", "int", where="window")
    steps = expect(window, "steps", "int", where="window")
    if steps is not None and steps < 1:
        raise LogFieldError(f"field 'window.steps' must be an integer >= 1, got {steps}")
    for key in ("global_max", "global_mean"):
        expect(window, key, "number", where="window")
    for key in _WINDOW_COUNTS:
        expect(window, key, "int", where="window")
    maxima = expect(window, "norms_max", "list", items="number", required=True, where="window")
    if len(maxima) != n_params:
        raise LogFieldError(
            f"field 'window.norms_max' must hold one value per parameter of the header "
            f"({n_params}), got {len(maxima)}"
        )
