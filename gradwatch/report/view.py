"""``gradwatch report RUN.jsonl``: a run log as a terminal summary, a figure and an HTML page.

The terminal part needs nothing beyond gradwatch's own dependencies: what was watched and how,
the same per-layer table the console sink prints at the end of a run, and a timeline of events
with repeats folded (a run that went NaN at step 57 and stayed NaN shows one line, not 10,000).
``--plot`` adds the figure of :mod:`gradwatch.report.plots`; ``--html`` writes the page of
:mod:`gradwatch.report.html`. Several logs are compared by :mod:`gradwatch.report.compare`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gradwatch._optional import MissingExtraError, require
from gradwatch.errors import GradWatchError
from gradwatch.records import Event
from gradwatch.report.runlog import RunLog, RunLogError, read_run
from gradwatch.report.text import fmt, summary_notes, summary_table

__all__ = [
    "OutputError",
    "check_outputs",
    "damage_lines",
    "event_timeline",
    "fail",
    "fold_events",
    "make_folder",
    "read_log",
    "refuse_outputs",
    "render_report",
    "run_report",
]

_KIND_STYLE = {
    "nonfinite": "bold red",
    "spike": "yellow",
    "loss_spike": "yellow",
    "skip": "magenta",
}
_SKIPPED_SHOWN = 5
"""Skipped lines named one by one in the report; the rest are counted."""

_KIND_NAME = {
    "nonfinite": "NaN/Inf",
    "spike": "spike",
    "loss_spike": "loss spike",
    "skip": "skipped",
}


def run_report(
    path: str | os.PathLike[str],
    plot: str | os.PathLike[str] | None = None,
    html: str | os.PathLike[str] | None = None,
    *,
    run: int = -1,
    console: Console | None = None,
) -> int:
    """Summarise the run log at ``path`` in the terminal; optionally write a figure and a page.

    The output paths are checked before the log is read, and their missing folders created
    (as :class:`~gradwatch.report.jsonl.JsonlSink` creates its log's) before anything is
    printed, so a bad ``--plot`` never costs a printed report. Damaged lines of the log are
    skipped and listed in the report (see :mod:`gradwatch.report.runlog`); only an unreadable
    header is an error.

    Args:
        path: A log written by :class:`~gradwatch.report.jsonl.JsonlSink`.
        plot: Where to write the figure (needs ``gradwatch[plot]``), as PNG, SVG or PDF after the
            suffix of the name, or None.
        html: Where to write a self-contained HTML report, or None.
        run: Which run of a log holding several (appended): 0 for the first, -1 for the last.
        console: Where the summary goes (default: a console on stdout).

    Returns:
        The exit code: 0 on success; 2 if an output path is unusable, the log cannot be read or
        has nothing to plot (one line on stderr says why); 1 if ``--plot`` needs matplotlib and
        it is not installed.
    """
    refused = refuse_outputs(plot, html)
    if refused is not None:
        return refused
    try:
        log = read_log(path, run)
    except RunLogError as err:
        return fail(str(err))
    if plot is not None and len(log) == 0:
        return fail(f"cannot plot {str(path)!r}: the run recorded no step")
    try:
        for option, target in (("--plot", plot), ("--html", html)):
            if target is not None:
                make_folder(option, target)
    except OutputError as err:
        return fail(str(err))

    out = console if console is not None else Console()
    for renderable in render_report(log):
        out.print(renderable, soft_wrap=isinstance(renderable, Text))  # lines: never hard-wrap

    if plot is not None:
        from gradwatch.report.plots import plot_format, plot_run

        kind = plot_format(plot)
        try:
            width, height = plot_run(log, plot, format=kind)
        except OSError as err:
            return fail(f"cannot write the figure to {str(plot)!r}: {err.strerror or err}")
        size = f"{width}x{height} px" if kind == "png" else kind.upper()  # vector: no pixels
        out.print(Text(f"figure written to {plot} ({size})"), soft_wrap=True)
    if html is not None:
        from gradwatch.report.html import write_html

        try:
            write_html(log, html)
        except OSError as err:
            return fail(f"cannot write the HTML report to {str(html)!r}: {err.strerror or err}")
        out.print(Text(f"HTML report written to {html}"), soft_wrap=True)
    if plot is None and html is None and len(log):
        out.print(
            Text(f"plot it: gradwatch report {path} --plot run.png", style="dim"), soft_wrap=True
        )
    return 0


class OutputError(GradWatchError, ValueError):
    """An output path of ``gradwatch report`` cannot be written; the message names the option."""


def check_outputs(plot: str | os.PathLike[str] | None, html: str | os.PathLike[str] | None) -> None:
    """Fail before any work on an output that cannot be written.

    Raises:
        OutputError: A suffix ``--plot`` cannot honour, a path that is a folder, or both
            options naming one file.
        MissingExtraError: ``--plot`` is given and matplotlib is not installed.
    """
    if plot is not None:
        from gradwatch.report.plots import plot_format

        try:
            plot_format(plot)
        except ValueError as err:
            raise OutputError(f"--plot: {err}") from None
    for option, target in (("--plot", plot), ("--html", html)):
        if target is not None and Path(target).is_dir():
            raise OutputError(f"{option} {str(target)!r} is a folder; give a file name in it")
    if plot is not None and html is not None and Path(plot).resolve() == Path(html).resolve():
        raise OutputError(f"--plot and --html name the same file {str(plot)!r}")
    if plot is not None:
        require("matplotlib", extra="plot")


def refuse_outputs(
    plot: str | os.PathLike[str] | None, html: str | os.PathLike[str] | None
) -> int | None:
    """The exit code for unusable ``--plot``/``--html`` outputs (the reason on stderr), or None
    when both can be written."""
    try:
        check_outputs(plot, html)
    except OutputError as err:
        return fail(str(err))
    except MissingExtraError as err:
        print(f"gradwatch report: {err}", file=sys.stderr)
        return 1
    return None


def make_folder(option: str, target: str | os.PathLike[str]) -> None:
    folder = Path(target).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocker = next((p for p in (folder, *folder.parents) if p.is_file()), None)
        reason = f"{str(blocker)!r} is a file" if blocker else (err.strerror or str(err))
        raise OutputError(
            f"{option} {str(target)!r}: cannot create the folder {str(folder)!r}: {reason}"
        ) from None
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{option} {str(target)!r}: the folder {str(folder)!r} is not writable")


def render_report(log: RunLog) -> list[Table | Text]:
    """The terminal report, in order: header lines, the per-layer table, the event timeline."""
    parts: list[Table | Text] = _header_lines(log)
    summary = log.summary if log.summary is not None else log.summarize()
    if summary.steps:
        parts += [Text(""), summary_table(summary), Text(summary_notes(summary))]
    parts += [Text(""), event_timeline(log.events)]
    return parts


def event_timeline(events: Sequence[Event]) -> Table | Text:
    """Events in step order, consecutive repeats of one kind folded into a single row.

    A row covers a run of events of the same kind at consecutive steps (a NaN that persists, a
    streak of spikes) and shows its first message. At most 30 rows; the rest are counted.
    """
    if not events:
        return Text("no events: no NaN/Inf, spike, loss spike or skipped step", style="green")
    rows = fold_events(events)
    table = Table(title="events", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("event", no_wrap=True)
    table.add_column("count", justify="right")
    table.add_column("first message", overflow="fold")  # a long parameter name wraps, never cut
    for group in rows[:30]:
        first, last = group[0].step, group[-1].step
        steps = str(first) if first == last else f"{first}-{last}"
        kind = group[0].kind
        table.add_row(
            steps,
            Text(_KIND_NAME.get(kind, kind), style=_KIND_STYLE.get(kind, "")),
            str(len(group)),
            group[0].message,
        )
    if len(rows) > 30:
        hidden = sum(len(group) for group in rows[30:])
        table.add_row("...", "", str(hidden), f"{len(rows) - 30} more runs of events")
    return table


def fold_events(events: Sequence[Event]) -> list[list[Event]]:
    """Events in step order, each run of one kind at consecutive steps folded into one group."""
    rows: list[list[Event]] = []
    open_rows: dict[str, list[Event]] = {}
    for event in events:
        current = open_rows.get(event.kind)
        if current is not None and event.step - current[-1].step <= 1:
            current.append(event)
        else:
            current = [event]
            open_rows[event.kind] = current
            rows.append(current)
    return rows


def read_log(path: str | os.PathLike[str], run: int) -> RunLog:
    """:func:`read_run`, with an out-of-range ``run`` named as the ``--run`` option.

    Raises:
        RunLogError: The log cannot be read, or holds no run ``run``.
    """
    try:
        return read_run(path, run=run)
    except RunLogError:
        if run == -1:
            raise
        count = read_run(path).run_count  # raises the log's own error if it is the trouble
        if -count <= run < count:
            raise
        holds = (
            "1 run (--run 0 or -1)"
            if count == 1
            else (f"{count} runs: use 0 to {count - 1}, or -1 to -{count} counting from the end")
        )
        raise RunLogError(f"--run {run}: {str(path)!r} holds {holds}") from None


def _header_lines(log: RunLog) -> list[Text]:
    start = log.header
    config = start.config
    clip = config.get("clip")
    clip_text = "none"
    if isinstance(clip, dict):
        clip_text = ", ".join(f"{k}={v}" for k, v in clip.items() if k != "name")
        clip_text = f"{clip.get('name', 'clip')}({clip_text})"
    runs = f" (run {log.run_index + 1} of {log.run_count})" if log.run_count > 1 else ""
    lines = [
        Text(f"gradwatch run log {log.path}{runs}", style="bold"),
        Text(
            f"gradwatch {start.gradwatch_version}, torch {start.torch_version}; "
            f"{len(start.params)} parameters in {len(log.layer_names())} layers; "
            f"clip {clip_text}; on_nonfinite={config.get('on_nonfinite', '?')}, "
            f"on_spike={config.get('on_spike', '?')}"
        ),
    ]
    if len(log):
        sampled = f", one record every {log.every} steps" if log.every > 1 else ""
        lines.append(
            Text(
                f"{int(log.window_steps.sum())} steps recorded, {log.step[0]}-{log.step[-1]}"
                f"{sampled}; global norm last {fmt(float(log.global_norm[-1]))}"
            )
        )
    else:
        lines.append(Text("no step recorded (the run stopped before its first check)", "yellow"))
    return lines + damage_lines(log)


def damage_lines(log: RunLog) -> list[Text]:
    """What the reader skipped or had to compute: a cut last line, bad lines, no summary."""
    lines = []
    if log.truncated:
        lines.append(
            Text(
                "the log ends in the middle of a line (the process was killed?); "
                "that incomplete record was skipped",
                style="yellow",
            )
        )
    for number, reason in log.skipped_lines[:_SKIPPED_SHOWN]:
        lines.append(Text(f"{log.path}:{number}: line skipped: {reason}", style="yellow"))
    if log.bad_lines > _SKIPPED_SHOWN:
        more = log.bad_lines - _SKIPPED_SHOWN
        lines.append(Text(f"... and {more} more unreadable line(s) skipped", style="yellow"))
    if log.summary is None and len(log):
        lines.append(
            Text(
                "no final summary (the run did not close): statistics below are computed "
                "from the recorded steps",
                style="yellow",
            )
        )
    return lines


def fail(message: str) -> int:
    print(f"gradwatch report: error: {message}", file=sys.stderr)
    return 2
