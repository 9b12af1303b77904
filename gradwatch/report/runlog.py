"""Reading a JSONL run log back: :func:`read_run` returns a :class:`RunLog` of numpy arrays.

The reader is the other half of :class:`~gradwatch.report.jsonl.JsonlSink`. It is built for logs
of long runs (100k steps parse in seconds: one ``json.loads`` per line, columns built with numpy)
and for logs of runs that died: a truncated last line, or a half-written line left in the middle
by a killed run that was later appended to, is skipped and counted, never fatal.

What the reader does with a line it cannot use:

* The header (first line of a run) must be right: without it nothing can be read, so a missing
  or mistyped header field raises :class:`RunLogError` naming the file, the line and the field.
* Any other line is skipped, and :attr:`RunLog.skipped_lines` says which and why: a line that is
  not JSON (cut short by a killed process), or a record with a missing or mistyped field (a line
  edited by hand or written by another tool, e.g. ``"step": "x"``). A record is kept whole or
  not at all; a value is never guessed (``"spike": "maybe"`` is not read as true). One bad line
  in a long run costs that line, not the report; ``gradwatch report`` lists the skipped lines.

This module turns the file into columns; :class:`RunLog` itself, and the questions asked of it
(layer norms, a summary of a run that never closed), live in
:mod:`gradwatch.report.runlog_arrays` and are re-exported here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gradwatch.errors import GradWatchError
from gradwatch.report.logformat import (
    FORMAT,
    FORMAT_VERSION,
    LogFieldError,
)
from gradwatch.report.runlog_arrays import RunLog
from gradwatch.report.runlog_builder import RunBuilder

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
    try:
        builder = RunBuilder(header)
    except LogFieldError as err:
        raise RunLogError(f"{str(path)!r} line {start + 1}: unreadable run header: {err}") from None
    last = len(lines) - 1
    for i in range(start + 1, stop):
        line = lines[i]
        if line.strip():
            reason = builder.add(line, i + 1)
            if reason is not None and (complete or i != last):  # a cut last line: `truncated`
                builder.skipped.append((i + 1, reason))
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
