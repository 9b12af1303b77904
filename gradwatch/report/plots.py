"""The run figure: global gradient norm over steps with events marked, and a layer × step heatmap.

The top panel answers "when did it go wrong": the global norm (log scale) with the spike
threshold, the clipping limit and the norm after clipping, spikes as triangles, NaN/Inf steps as
red bands and skipped steps as marks along the bottom. The heatmap answers "where": one row per
layer in model order, colour = gradient norm on a log scale, NaN/Inf cells in red, and an arrow
at the first NaN/Inf with the parameter it started in.

Long runs are reduced to at most ``max_columns`` columns before drawing, keeping each column's
largest finite norm and whether any step in it was non-finite, so a 100k-step log draws in about
a second and no spike or NaN disappears. Needs matplotlib (``pip install "gradwatch[plot]"``);
drawing uses the Agg canvas directly and never touches pyplot's global state or backend.

This module lays the figures out; the panels are drawn by :mod:`gradwatch.report.plot_series`
(loss, gradient norm) and :mod:`gradwatch.report.plot_heatmap` (layers x steps).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from gradwatch._optional import require
from gradwatch.errors import ConfigError
from gradwatch.report.plot_heatmap import draw_heatmap
from gradwatch.report.plot_series import (
    Reduced,
    draw_global,
    draw_loss,
    event_steps,
    legend_above,
    line,
    loss_series,
    number,
    scale,
    title,
)
from gradwatch.report.runlog_arrays import RunLog
from gradwatch.validation import check_int

__all__ = [
    "FORMATS",
    "compare_figure",
    "plot_compare",
    "plot_format",
    "plot_run",
    "run_figure",
]

PlotFormat = Literal["png", "svg", "pdf"]

FORMATS: dict[str, PlotFormat] = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
"""File suffixes :func:`plot_run` writes, and the format each one means."""


def plot_run(
    log: RunLog,
    out: str | os.PathLike[str] | IO[bytes],
    *,
    layer_depth: int | None = None,
    max_columns: int = 600,
    width: float = 11.0,
    dpi: int = 100,
    format: PlotFormat | None = None,
) -> tuple[int, int]:
    """Draw ``log`` and save it as a PNG, SVG or PDF.

    Args:
        log: A run read by :func:`~gradwatch.report.runlog.read_run`.
        out: File path or binary file object to write the figure to.
        layer_depth: Group parameters into heatmap rows by their first ``layer_depth`` name parts
            (None: by owning module).
        max_columns: Most step columns drawn; longer runs are reduced (column maxima kept).
        width: Figure width in inches; the height follows the number of layers.
        dpi: Pixels per inch of the PNG (and of the heatmap's image inside an SVG or PDF).
        format: ``"png"``, ``"svg"`` or ``"pdf"``; None: from the suffix of a path (see
            :func:`plot_format`), PNG for a file object.

    Returns:
        The figure's ``(width, height)`` in pixels at ``dpi``.

    Raises:
        MissingExtraError: matplotlib is not installed.
        ValueError: The log has no recorded step, ``out``'s suffix is not one of
            :data:`FORMATS`, or an argument is invalid.
    """
    format = _format(out, format)
    fig = run_figure(log, layer_depth=layer_depth, max_columns=max_columns, width=width, dpi=dpi)
    return _save(fig, out, format, dpi)


def run_figure(
    log: RunLog,
    *,
    layer_depth: int | None = None,
    max_columns: int = 600,
    width: float = 11.0,
    dpi: int = 100,
) -> Any:
    """The figure of :func:`plot_run` as a ``matplotlib.figure.Figure``, not saved.

    Its axes, top to bottom: loss (its twin: learning rate), global gradient norm, heatmap.

    Raises:
        MissingExtraError: matplotlib is not installed.
        ValueError: The log has no recorded step, or an argument is invalid.
    """
    require("matplotlib", extra="plot")
    check_int("max_columns", max_columns, minimum=2)
    check_int("dpi", dpi, minimum=10)
    if len(log) == 0:
        raise ConfigError(f"run log {str(log.path)!r} has no recorded steps to plot")

    data = Reduced(log, layer_depth, max_columns)
    n_layers = len(data.layers)
    rows = max(n_layers, 7) * 0.16  # a few layers still get a readable colour bar
    fig = _new_figure(width, 5.0 + min(rows, 7.7), dpi)
    grid = fig.add_gridspec(3, 2, width_ratios=(60, 1), height_ratios=(1.7, 2.1, rows))
    loss = fig.add_subplot(grid[0, 0])
    top = fig.add_subplot(grid[1, 0], sharex=loss)
    heat = fig.add_subplot(grid[2, 0], sharex=loss)
    for row in (0, 1):
        fig.add_subplot(grid[row, 1]).set_axis_off()
    colorbar_axis = fig.add_subplot(grid[2, 1])

    draw_loss(loss, log, data)
    draw_global(top, log, data)
    draw_heatmap(heat, colorbar_axis, fig, log, data, layer_depth)
    fig.suptitle(title(log, data, int(width * 12)), x=0.01, ha="left", fontsize=11)
    return fig


def plot_compare(
    logs: Sequence[RunLog],
    out: str | os.PathLike[str] | IO[bytes],
    *,
    labels: Sequence[str] | None = None,
    max_columns: int = 600,
    width: float = 11.0,
    dpi: int = 100,
    format: PlotFormat | None = None,
) -> tuple[int, int]:
    """Overlay runs (e.g. before and after a fix): the loss on top, the global norm below.

    Each run has one colour; its gradient-norm spikes (▲) and loss spikes (◆) sit on its curves,
    and its NaN/Inf steps are crosses along the top of the norm panel.

    Args:
        logs: Two or more runs read by :func:`~gradwatch.report.runlog.read_run`.
        out: File path or binary file object to write the figure to.
        labels: One legend label per run (default: each log's file name).
        max_columns, width, dpi, format: As for :func:`plot_run`.

    Returns:
        The figure's ``(width, height)`` in pixels at ``dpi``.

    Raises:
        MissingExtraError: matplotlib is not installed.
        ValueError: A log has no recorded step, ``labels`` does not match ``logs``, or an
            argument is invalid.
    """
    format = _format(out, format)
    fig = compare_figure(logs, labels=labels, max_columns=max_columns, width=width, dpi=dpi)
    return _save(fig, out, format, dpi)


def compare_figure(
    logs: Sequence[RunLog],
    *,
    labels: Sequence[str] | None = None,
    max_columns: int = 600,
    width: float = 11.0,
    dpi: int = 100,
) -> Any:
    """The figure of :func:`plot_compare` as a ``matplotlib.figure.Figure``, not saved.

    Raises:
        MissingExtraError: matplotlib is not installed.
        ValueError: As for :func:`plot_compare`.
    """
    labels = [log.path.name for log in logs] if labels is None else list(labels)
    if len(labels) != len(logs):
        raise ConfigError(f"labels must hold one label per log ({len(logs)}), got {len(labels)}")
    for log in logs:
        if len(log) == 0:
            raise ConfigError(f"run log {str(log.path)!r} has no recorded steps to plot")
    require("matplotlib", extra="plot")
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    check_int("max_columns", max_columns, minimum=2)
    check_int("dpi", dpi, minimum=10)
    fig = _new_figure(width, 6.4, dpi)
    loss_ax, norm_ax = fig.subplots(2, 1, sharex=True, height_ratios=(1.0, 1.25))
    palette = colormaps["tab10"].colors
    losses, norms = [], []
    for i, (log, label) in enumerate(zip(logs, labels)):
        colour = palette[i % len(palette)]
        width_i = max(1.2, 3.4 - 1.8 * i)  # later runs thinner, on top: equal stretches show both
        data = Reduced(log, None, max_columns)
        shown = loss_series(
            loss_ax,
            log,
            data,
            colour=colour,
            spike_colour=colour,
            name=label,
            counted=False,
            nan_height=0.97 - 0.04 * i,
            width=width_i,
        )
        if shown is not None:
            losses.append(shown)
        line(norm_ax, data, data.global_max, color=colour, lw=width_i, label=label)
        norms.append(data.global_max[np.isfinite(data.global_max)])
        spikes = [e for e in log.events if e.kind == "spike"]
        if spikes:
            sx = [e.step for e in spikes]
            sy = [number(e.data.get("global_norm")) for e in spikes]
            norm_ax.scatter(
                sx,
                sy,
                marker="^",
                s=22 * width_i,
                color=colour,
                edgecolor="black",
                lw=0.5,
                zorder=5,
            )
        nonfinite = np.union1d(event_steps(log, "nonfinite"), log.step[log.nonfinite])
        if len(nonfinite):
            norm_ax.scatter(
                nonfinite,
                np.full(len(nonfinite), 0.97 - 0.04 * i),
                marker="x",
                s=30,
                color=colour,
                lw=1.5,
                zorder=5,
                transform=norm_ax.get_xaxis_transform(),
            )
    if losses:
        scale(loss_ax, np.concatenate(losses), margin=(1.5, 2.5))
    else:
        loss_ax.text(
            0.5,
            0.5,
            "no run recorded a loss",
            transform=loss_ax.transAxes,
            ha="center",
            va="center",
        )
        loss_ax.set_yticks([])
    finite = np.concatenate(norms)
    scale(norm_ax, finite[finite > 0], margin=(3.0, 6.0))
    if len(finite) and finite.min() > 0:
        norm_ax.set_yscale("log")  # a norm panel is always log: runs differ by decades
    first = min(float(log.step[0] - log.window_steps[0] + 1) for log in logs)
    norm_ax.set_xlim(first - 0.5, max(float(log.step[-1]) for log in logs) + 0.5)
    loss_ax.set_ylabel("loss")
    norm_ax.set_ylabel("global grad norm")
    norm_ax.set_xlabel("optimizer step")
    for ax in (loss_ax, norm_ax):
        ax.grid(True, which="major", alpha=0.3)
    marks = [
        Line2D([], [], color="0.3", marker="^", ls="", markeredgecolor="black", label="spike"),
        Line2D([], [], color="0.3", marker="D", ls="", markeredgecolor="black", label="loss spike"),
        Line2D([], [], color="0.3", marker="x", ls="", label="NaN/Inf step"),
    ]
    handles, names = norm_ax.get_legend_handles_labels()
    legend_above(loss_ax, handles + marks, names + [m.get_label() for m in marks])
    title = " vs ".join(
        f"{label} ({int(log.window_steps.sum())} steps)" for log, label in zip(logs, labels)
    )
    fig.suptitle(f"compare: {title}", x=0.01, ha="left", fontsize=11)
    return fig


def _format(out: str | os.PathLike[str] | IO[bytes], format: PlotFormat | None) -> PlotFormat:
    if format is None:
        return "png" if hasattr(out, "write") else plot_format(out)  # type: ignore[arg-type]
    if format not in FORMATS.values():
        raise ConfigError(f"format must be one of 'png', 'svg', 'pdf', got {format!r}")
    return format


def _new_figure(width: float, height: float, dpi: int) -> Any:
    """A figure on its own Agg canvas: pyplot's global state and backend are never touched."""
    require("matplotlib", extra="plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(
    fig: Any, out: str | os.PathLike[str] | IO[bytes], format: str, dpi: int
) -> tuple[int, int]:
    fig.savefig(out, format=format, dpi=dpi)
    w, h = fig.canvas.get_width_height()
    return int(w), int(h)


def plot_format(path: str | os.PathLike[str]) -> PlotFormat:
    """The figure format a file name asks for, from its suffix (any case): png, svg or pdf.

    Raises:
        ConfigError: The suffix is missing or not one of :data:`FORMATS`.
    """
    suffix = Path(path).suffix
    found = FORMATS.get(suffix.lower())
    if found is None:
        what = f"suffix {suffix!r}" if suffix else "no suffix"
        raise ConfigError(
            f"cannot tell the figure format of {str(path)!r} ({what}); "
            f"end the name in {', '.join(FORMATS)}"
        )
    return found
