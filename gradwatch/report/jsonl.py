"""JSONL run log: one JSON object per line, written as the run goes, readable after a crash.

A log is a header record (versions, watched parameters, configuration), then step and event records
in the order they happened, then a summary record when the watcher closes. Every record is flushed
as soon as it is written, so a killed process leaves a log whose only damage is its last line, and
:func:`gradwatch.report.runlog.read_run` skips that line.

Format (``"format": "gradwatch.jsonl"``, version 1), one object per line, told apart by ``"type"``:

* ``header``: ``gradwatch_version``, ``torch_version``, ``time``, ``every``, ``params`` (a list of
  ``{"name", "shape", "dtype"}``) and ``config``.
* ``step``: the fields of a :class:`~gradwatch.records.StepReport`. ``norms`` lists the
  per-parameter gradient norms *in header order* (``null`` where a parameter had no gradient) and
  is always the last key, so a reader can parse it in bulk; ``nonfinite`` and ``spike_params`` are
  positions in that order, so a step costs one short line. ``nonfinite_ranks`` lists the DDP
  ranks a NaN/Inf came from (``rank_blame=True``). Keys whose value is empty or None
  (``skip_reason``, ``nonfinite``, ``spike_params``, ``spike_threshold``, ``scale``,
  ``lr``, ``micro_batch_norms``, ``nonfinite_ranks``) are left out.
  With ``every=N`` (N > 1) each written step also carries ``window``: statistics of the N steps
  it closes (first step, count, largest and mean finite global norm, clipped/spike/NaN/skipped
  counts, and ``norms_max``, each parameter's largest finite norm), so nothing that happened
  between two written steps is lost.
* ``event``: ``step``, ``kind``, ``message``, ``params`` (names) and ``data``. Always written.
* ``summary``: the :class:`~gradwatch.records.RunSummary`, with per-layer statistics.

Non-finite numbers are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``, so
any standard JSON reader (``json``, ``jq``, pandas) accepts the file; the reader turns them back
into floats (:mod:`gradwatch.report.logformat`). In an event's ``data`` they stay strings when
read back, since there a string such as ``"NaN"`` can also be a label: a non-finite event's
``{"what": "NaN"}`` (``"NaN"`` or ``"Inf"``; older logs call it ``"value"``, which is read back
as ``"what"``).
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from gradwatch.errors import GradWatchError
from gradwatch.records import (
    Event,
    ParamInfo,
    Record,
    RunStart,
    RunSummary,
    StepReport,
)
from gradwatch.report.logformat import FORMAT, FORMAT_VERSION, encode_value
from gradwatch.report.stats import LayerGroups
from gradwatch.report.windowed import StepWindow, WindowedSink
from gradwatch.validation import check_choice

__all__ = ["JsonlSink", "RunLogExistsError"]


class RunLogExistsError(GradWatchError, FileExistsError):
    """A :class:`JsonlSink` was pointed at a file that already exists, with ``mode="x"``."""


class JsonlSink(WindowedSink):
    """Writes the run to a JSON Lines file: a header, steps, events and the final summary.

    The file is opened when the sink is created, so a bad path fails before training starts;
    missing parent folders are created (as TensorBoard's ``SummaryWriter`` does). An existing file
    is never overwritten or truncated: with ``mode="x"`` (default) the sink refuses it; with
    ``mode="a"`` it appends, starting a new run in the same file (the reader reads the last run by
    default). Each record is flushed to the operating system as it is written, so the log survives
    a killed process (not a power cut: there is no fsync per line).

    Args:
        path: File to write, conventionally ending in ``.jsonl``.
        every: Write one step record every ``every`` steps (1: all). Events are always written,
            and each written step carries the statistics of the steps since the previous one.
        mode: ``"x"`` to create a new file and refuse an existing one, ``"a"`` to append.

    Raises:
        RunLogExistsError: ``mode="x"`` and ``path`` exists, or ``mode="a"`` and ``path`` holds
            something other than a gradwatch run log.
        ValueError, TypeError: ``every`` or ``mode`` is invalid.
        IsADirectoryError: ``path`` is a folder.
        OSError: The file or its folder cannot be created (permissions, a parent that is a file);
            the message names ``path``.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, every: int = 1, mode: Literal["x", "a"] = "x"
    ) -> None:
        super().__init__(every=every)
        self.mode = check_choice("mode", mode, ("x", "a"))
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(
                errno.EISDIR,
                "JsonlSink path is a directory; give a file such as 'DIR/run.jsonl'",
                str(self.path),
            )
        needs_newline = False
        if self.mode == "a" and self.path.is_file() and self.path.stat().st_size:
            needs_newline = _check_appendable(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # as TensorBoard and W&B do
            self._file: IO[str] | None = open(  # noqa: SIM115 (closed in close())
                self.path, self.mode, encoding="utf-8", newline="\n"
            )
        except FileExistsError as err:
            if err.filename is not None and Path(err.filename) != self.path:
                raise _cannot_open(self.path, err) from None  # mkdir met a file, not the log
            raise RunLogExistsError(
                f"run log {str(self.path)!r} already exists; gradwatch never overwrites a log. "
                'Pass mode="a" to append a new run to it, or choose a new path'
            ) from None
        except OSError as err:
            raise _cannot_open(self.path, err) from None
        if needs_newline:
            self._write_line("")
        self._names: tuple[str, ...] | None = None
        self._position: dict[str, int] = {}

    # ------------------------------------------------------------------------------ records

    def next_due(self, step: int) -> int:
        """Every step at once, so a killed process loses no completed step (else each window's)."""
        return super().next_due(step)

    def write(self, record: Record) -> None:
        if isinstance(record, StepReport) and self._names is None:  # fed without a RunStart
            params = tuple(ParamInfo(n, (), "unknown") for n in record.param_norms.names)
            super().write(RunStart("unknown", "unknown", params, {}, time.time()))
        super().write(record)

    def layer_groups(self, names: Sequence[str], depth: int | None) -> LayerGroups:
        """One group per parameter: a window record keeps each parameter's largest norm."""
        return LayerGroups(names, each=True)

    def render_start(self, start: RunStart) -> None:
        self._header(start)

    def render_window(self, window: StepWindow) -> None:
        self._write_step(window.last, self._full_norms(window.last), window)

    def render_event(self, event: Event) -> None:
        data = {
            "type": "event",
            "step": event.step,
            "kind": event.kind,
            "message": event.message,
            "params": list(event.params),
            "data": encode_value(event.data),
        }
        if event.cause is not None:
            data["cause"] = event.cause
        self._write_line(_dumps(data))

    def render_summary(self, summary: RunSummary) -> None:
        self._write_line(_dumps({"type": "summary", **encode_value(asdict(summary))}))

    def finish(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    # ------------------------------------------------------------------------------ writing

    def _header(self, start: RunStart) -> None:
        self._names = tuple(p.name for p in start.params)
        self._position = {n: i for i, n in enumerate(self._names)}
        data = {
            "type": "header",
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "gradwatch_version": start.gradwatch_version,
            "torch_version": start.torch_version,
            "time": encode_value(start.time),
            "every": self.every,
            "params": [
                {"name": p.name, "shape": list(p.shape), "dtype": p.dtype} for p in start.params
            ],
            "config": encode_value(start.config),
        }
        self._write_line(_dumps(data))

    def _write_step(self, report: StepReport, values: np.ndarray, window: StepWindow) -> None:
        single = values.dtype == np.float32
        num = _fmt32 if single else _fmt64
        parts = [
            f'{{"type":"step","step":{report.step}',
            f',"global_norm":{num(report.global_norm)}',
            f',"clipped_norm":{num(report.clipped_norm)}',
            f',"clip_coef":{num(report.clip_coef)}',
            f',"loss":{"null" if report.loss is None else num(report.loss)}',
            f',"spike":{_BOOL[report.spike]},"loss_spike":{_BOOL[report.loss_spike]}',
            f',"skipped":{_BOOL[report.skipped]}',
        ]
        if report.skip_reason is not None:
            parts.append(f',"skip_reason":{json.dumps(report.skip_reason)}')
        if report.nonfinite:
            parts.append(f',"nonfinite":{self._positions(report.nonfinite)}')
        if report.spike_params:
            parts.append(f',"spike_params":{self._positions(report.spike_params)}')
        if report.spike_threshold is not None:
            parts.append(f',"spike_threshold":{num(report.spike_threshold)}')
        if report.scale is not None:
            parts.append(f',"scale":{num(report.scale)}')
        if report.lr is not None:
            parts.append(f',"lr":{_fmt64(report.lr)}')
        if report.micro_batch_norms:
            parts.append(f',"micro_batch_norms":[{",".join(map(num, report.micro_batch_norms))}]')
        if report.nonfinite_ranks:
            ranks = ",".join(str(int(r)) for r in report.nonfinite_ranks)
            parts.append(f',"nonfinite_ranks":[{ranks}]')
        if self.every > 1:
            parts.append(f',"window":{_window_json(window, num, single)}')
        parts.append(f',"norms":[{_float_list(values, single)}]}}')  # last: the reader relies on it
        self._write_line("".join(parts))

    def _full_norms(self, report: StepReport) -> np.ndarray:
        """The step's norms in header order; parameters without a gradient hold ``_ABSENT``."""
        norms = report.param_norms
        names = self._names or ()
        if norms.names is names or norms.names == names:
            return norms.values
        dtype = norms.values.dtype if norms.values.dtype.kind == "f" else np.float64
        out = np.full(len(names), _ABSENT, dtype=dtype)
        index = [self._position[n] for n in norms.names if n in self._position]
        kept = [i for i, n in enumerate(norms.names) if n in self._position]
        out[index] = norms.values[kept]
        return out

    def _positions(self, names: tuple[str, ...]) -> str:
        return "[" + ",".join(str(self._position.get(n, -1)) for n in names) + "]"

    def _write_line(self, line: str) -> None:
        if self._file is None:
            raise ValueError(f"JsonlSink({str(self.path)!r}) is closed")
        self._file.write(line + "\n")
        self._file.flush()


def _cannot_open(path: Path, err: OSError) -> OSError:
    """``err`` as an error naming the ``path`` argument and what is in the way."""
    message = f"JsonlSink cannot create its log (path={str(path)!r})"
    if isinstance(err, FileExistsError | NotADirectoryError):  # a parent folder is a file
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        return NotADirectoryError(
            errno.ENOTDIR, f"{message}: {str(blocker)!r} is a file, not a folder"
        )
    return type(err)(err.errno, f"{message}: {err.strerror or err}")


def _check_appendable(path: Path) -> bool:
    """Refuse to append to a file that is not a gradwatch run log; True if it lacks a last newline.

    Raises:
        RunLogExistsError: The file's first line is not a gradwatch header.
    """
    with open(path, "rb") as existing:
        first = existing.readline(65536)
        existing.seek(-1, os.SEEK_END)
        needs_newline = existing.read(1) != b"\n"  # a killed writer left half a line
    if b'"format":"' + FORMAT.encode() + b'"' not in first.replace(b" ", b""):
        raise RunLogExistsError(
            f'{str(path)!r} exists and is not a gradwatch run log; mode="a" only appends runs '
            "to a log JsonlSink wrote. Choose a new path"
        )
    return needs_newline


# --------------------------------------------------------------------------- number formatting

_BOOL = {False: "false", True: "true"}
_ABSENT = -1.0
"""Marks a parameter without a gradient in a step's norm vector (a norm is never negative)."""

_TEMPLATES: dict[tuple[int, bool], str] = {}


def _fmt32(value: float) -> str:
    """A float32-derived number with 9 significant digits: enough to read back the same float32."""
    if math.isfinite(value):
        return f"{value:.9g}"
    return _nonfinite_token(value)


def _fmt64(value: float) -> str:
    if math.isfinite(value):
        return repr(float(value))
    return _nonfinite_token(value)


def _nonfinite_token(value: float) -> str:
    return '"NaN"' if math.isnan(value) else ('"Infinity"' if value > 0 else '"-Infinity"')


def _float_list(values: np.ndarray, single: bool) -> str:
    """Comma-separated norms: one C-level %-format for the usual all-finite, all-present case."""
    if np.isfinite(values).all() and not (values < 0).any():
        key = (len(values), single)
        template = _TEMPLATES.get(key)
        if template is None:
            template = _TEMPLATES[key] = ",".join(["%.9g" if single else "%.17g"] * len(values))
        return template % tuple(values.tolist())
    num = _fmt32 if single else _fmt64
    return ",".join("null" if v == _ABSENT else num(v) for v in values.tolist())


def _dumps(data: Mapping[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _window_json(window: StepWindow, num: Any, single: bool) -> str:
    """The ``window`` of a step record: the statistics of the steps since the previous one."""
    s = window.totals
    maxima = np.where(np.isnan(window.layer_max), _ABSENT, window.layer_max)
    return (
        f'{{"first":{s.first_step},"steps":{s.steps}'
        f',"global_max":{num(s.global_max) if math.isfinite(s.global_max) else "null"}'
        f',"global_mean":{num(s.global_mean) if math.isfinite(s.global_mean) else "null"}'
        f',"clipped":{s.clipped_steps},"spikes":{s.spikes}'
        f',"loss_spikes":{s.loss_spikes},"nonfinite":{s.nonfinite_steps}'
        f',"skipped":{s.skipped_steps},"norms_max":[{_float_list(maxima, single)}]}}'
    )
