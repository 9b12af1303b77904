"""``gradwatch report a.jsonl b.jsonl``: runs compared, their totals side by side.

:func:`run_totals` gives the numbers a reader compares first (the HTML page's cards use them too);
:func:`run_compare` prints them in one table, a column per run, and with ``--plot`` overlays the
runs' loss and gradient norm (:func:`~gradwatch.report.plots.plot_compare`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gradwatch.report.runlog import RunLog, RunLogError
from gradwatch.report.text import fmt
from gradwatch.report.view import (
    OutputError,
    damage_lines,
    fail,
    make_folder,
    read_log,
    refuse_outputs,
)

__all__ = ["RunTotals", "compare_table", "run_compare", "run_totals"]


@dataclass(frozen=True)
class RunTotals:
    """The numbers a reader compares first, from the run's summary (or its recorded steps).

    Attributes:
        steps: Steps checked.
        first_step, last_step: Steps covered (None without a recorded step).
        clipped, spikes, loss_spikes, nonfinite, skipped: Step counts.
        clip_rate: ``clipped / steps``.
        final_norm: Global norm of the last recorded step.
        median_norm: Median finite global norm of the recorded steps (NaN if none).
        final_loss: Loss of the last recorded step that has one (NaN/inf included), None if the
            run recorded no loss.
        final_lr: Learning rate of the last recorded step that has one, None if none.
    """

    steps: int
    first_step: int | None
    last_step: int | None
    clipped: int
    clip_rate: float
    spikes: int
    loss_spikes: int
    nonfinite: int
    skipped: int
    final_norm: float
    median_norm: float
    final_loss: float | None
    final_lr: float | None


def run_totals(log: RunLog) -> RunTotals:
    """The :class:`RunTotals` of ``log``: the summary's counts, the median and final values."""
    import numpy as np

    s = log.summary if log.summary is not None else log.summarize()
    finite = log.global_norm[np.isfinite(log.global_norm)]
    # a loss was given at a step when it is finite, inf, or NaN at a step with NaN gradients
    given = np.flatnonzero(~np.isnan(log.loss) | (log.nonfinite & np.isfinite(log.loss).any()))
    known_lr = np.flatnonzero(np.isfinite(log.lr))
    return RunTotals(
        steps=s.steps,
        first_step=s.first_step,
        last_step=s.last_step,
        clipped=s.clipped_steps,
        clip_rate=s.clip_rate,
        spikes=s.spikes,
        loss_spikes=s.loss_spikes,
        nonfinite=s.nonfinite_steps,
        skipped=s.skipped_steps,
        final_norm=s.global_last,
        median_norm=float(np.median(finite)) if len(finite) else math.nan,
        final_loss=float(log.loss[given[-1]]) if len(given) else None,
        final_lr=float(log.lr[known_lr[-1]]) if len(known_lr) else None,
    )


def run_compare(
    paths: Sequence[str | os.PathLike[str]],
    plot: str | os.PathLike[str] | None = None,
    *,
    run: int = -1,
    labels: Sequence[str] | None = None,
    console: Console | None = None,
) -> int:
    """Compare run logs: their totals side by side; ``plot`` overlays their loss and norm.

    Args:
        paths: Two or more logs written by :class:`~gradwatch.report.jsonl.JsonlSink`.
        plot: Where to write the overlay (needs ``gradwatch[plot]``), or None.
        run: Which run of each log, when a log holds several (0 first, -1 last).
        labels: One name per log for the table and the legend (default: the file names).
        console: Where the comparison goes (default: a console on stdout).

    Returns:
        The exit code, as for :func:`run_report`.
    """
    if labels is not None and len(labels) != len(paths):
        return fail(
            f"--label given {len(labels)} time(s) for {len(paths)} run logs; "
            "give one label per log, in the order of the logs"
        )
    refused = refuse_outputs(plot, None)
    if refused is not None:
        return refused
    try:
        logs = [read_log(path, run) for path in paths]
    except RunLogError as err:
        return fail(str(err))
    if plot is not None:
        empty = next((log for log in logs if len(log) == 0), None)
        if empty is not None:
            return fail(f"cannot plot {str(empty.path)!r}: the run recorded no step")
        try:
            make_folder("--plot", plot)
        except OutputError as err:
            return fail(str(err))
    names = list(labels) if labels is not None else _names(logs)
    out = console if console is not None else Console()
    out.print(Text(f"comparing {len(logs)} run logs", style="bold"), soft_wrap=True)
    for name, log in zip(names, logs):
        runs = f" (run {log.run_index + 1} of {log.run_count})" if log.run_count > 1 else ""
        out.print(Text(f"  {name}: {log.path}{runs}"), soft_wrap=True)
        for note in damage_lines(log):
            note.pad_left(4)
            out.print(note, soft_wrap=True)
    out.print(Text(""))
    out.print(compare_table(names, [run_totals(log) for log in logs]))
    if plot is not None:
        from gradwatch.report.plots import plot_compare, plot_format

        kind = plot_format(plot)
        try:
            width, height = plot_compare(logs, plot, labels=names, format=kind)
        except OSError as err:
            return fail(f"cannot write the figure to {str(plot)!r}: {err.strerror or err}")
        size = f"{width}x{height} px" if kind == "png" else kind.upper()
        out.print(Text(f"figure written to {plot} ({size})"), soft_wrap=True)
    else:
        shown = " ".join(str(p) for p in paths)
        out.print(
            Text(f"overlay them: gradwatch report {shown} --plot compare.png", style="dim"),
            soft_wrap=True,
        )
    return 0


def compare_table(names: Sequence[str], totals: Sequence[RunTotals]) -> Table:
    """Runs side by side, one column each: counts, final and median norm, final loss."""
    table = Table(show_edge=False, pad_edge=False, title_justify="left")
    table.add_column("", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    rows = (
        ("steps", lambda t: f"{t.steps}" + (f" ({t.first_step}-{t.last_step})" if t.steps else "")),
        ("clipped", lambda t: f"{t.clipped} ({t.clip_rate:.0%})"),
        ("spikes", lambda t: str(t.spikes)),
        ("loss spikes", lambda t: str(t.loss_spikes)),
        ("NaN/Inf steps", lambda t: str(t.nonfinite)),
        ("skipped", lambda t: str(t.skipped)),
        ("final norm", lambda t: fmt(t.final_norm)),
        ("median norm", lambda t: fmt(t.median_norm)),
        ("final loss", lambda t: fmt(t.final_loss)),
    )
    for name, cell in rows:
        table.add_row(name, *(cell(t) for t in totals))
    return table


def _names(logs: Sequence[RunLog]) -> list[str]:
    """Each log's file name, or its path (and run) where names alone would be ambiguous."""
    names = [log.path.name for log in logs]
    if len(set(names)) < len(names):
        names = [str(log.path) for log in logs]
    if len(set(names)) < len(names):
        names = [f"{name} run {log.run_index}" for name, log in zip(names, logs)]
    return names
