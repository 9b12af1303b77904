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
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from gradwatch._optional import require
from gradwatch.config import check_int
from gradwatch.errors import ConfigError
from gradwatch.layers import layer_of
from gradwatch.report.runlog_arrays import RunLog

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

_RED = "#d62728"
_ORANGE = "#ff7f0e"
_PURPLE = "#9467bd"
_GOLD = "#bcbd22"
_ZERO = "black"
_ABSENT = "#e6e6e6"
_LOSS = "#333333"
_LR = "#8c564b"


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

    data = _Reduced(log, layer_depth, max_columns)
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

    _draw_loss(loss, log, data)
    _draw_global(top, log, data)
    _draw_heatmap(heat, colorbar_axis, fig, log, data, layer_depth)
    fig.suptitle(_title(log, data, int(width * 12)), x=0.01, ha="left", fontsize=11)
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
        data = _Reduced(log, None, max_columns)
        shown = _loss_series(
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
        _line(norm_ax, data, data.global_max, color=colour, lw=width_i, label=label)
        norms.append(data.global_max[np.isfinite(data.global_max)])
        spikes = [e for e in log.events if e.kind == "spike"]
        if spikes:
            sx = [e.step for e in spikes]
            sy = [_number(e.data.get("global_norm")) for e in spikes]
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
        nonfinite = np.union1d(_event_steps(log, "nonfinite"), log.step[log.nonfinite])
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
        _scale(loss_ax, np.concatenate(losses), margin=(1.5, 2.5))
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
    _scale(norm_ax, finite[finite > 0], margin=(3.0, 6.0))
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
    _legend_above(loss_ax, handles + marks, names + [m.get_label() for m in marks])
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


class _Reduced:
    """The log's series reduced to at most ``max_columns`` columns (maxima and flags kept)."""

    def __init__(self, log: RunLog, depth: int | None, max_columns: int) -> None:
        n = len(log)
        step = log.step.astype(np.float64)
        first = step - log.window_steps + 1
        if n > 1 and not np.all(np.diff(step) > 0):  # defensive: steps out of order
            step = np.arange(n, dtype=np.float64)
            first = step
        starts = (
            np.arange(n)
            if n <= max_columns
            else np.unique(np.linspace(0, n, max_columns, endpoint=False).astype(np.intp))
        )
        self.starts = starts
        self.edges = np.append(first[starts] - 0.5, step[-1] + 0.5)
        self.centers = (self.edges[:-1] + self.edges[1:]) / 2
        self.binned = n > max_columns
        self.windowed = self.binned or log.every > 1  # a value stands for a span of steps
        self.window_name = "per column" if self.binned else "of each window"

        self.global_max = _fmax(log.peak_global_norm, starts)
        self.global_min = _fmin(log.global_norm, starts)
        clipped = np.where(log.clip_coef < 1.0, log.clipped_norm, np.nan)
        self.clipped_max = _fmax(clipped, starts)
        self.threshold = _fmax(log.spike_threshold, starts)
        self.any_clipped = bool(np.any(log.clip_coef < 1.0))
        self.loss_max = _fmax(log.loss, starts)
        self.loss_min = _fmin(log.loss, starts)
        self.lr = _fmax(log.lr, starts)

        self.layers = log.layer_names(depth)
        sampled = log.layer_norms(depth)
        present = log.layer_present(depth)
        peaks = log.layer_norms(depth, peak=True) if log.every > 1 else sampled
        nonfinite = present & ~np.isfinite(sampled)
        index = {name: i for i, name in enumerate(self.layers)}
        for event in log.events:  # exact even when steps were sampled
            if event.kind == "nonfinite":
                row = min(int(np.searchsorted(log.step, event.step)), n - 1)
                for name in event.params:
                    layer = index.get(layer_of(name, depth))
                    if layer is not None:
                        nonfinite[row, layer] = True
        absent = ~present & np.isnan(peaks)
        values = np.where(np.isfinite(peaks), peaks, np.nan)
        self.values = _fmax(values, starts)
        self.nonfinite = np.logical_or.reduceat(nonfinite, starts, axis=0)
        self.absent = np.logical_and.reduceat(absent, starts, axis=0)


def _fmax(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Largest finite value of each column group (NaN if none)."""
    finite = np.where(np.isfinite(values), values, np.nan)
    with np.errstate(invalid="ignore"):
        return np.fmax.reduceat(finite, starts, axis=0)


def _fmin(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    finite = np.where(np.isfinite(values), values, np.nan)
    with np.errstate(invalid="ignore"):
        return np.fmin.reduceat(finite, starts, axis=0)


def _event_steps(log: RunLog, kind: str) -> np.ndarray:
    return np.array(sorted({e.step for e in log.events if e.kind == kind}), dtype=np.float64)


def _runs(steps: np.ndarray, gap: float) -> list[tuple[float, float]]:
    """Merge sorted steps closer than ``gap`` into ``(first, last)`` runs."""
    if not len(steps):
        return []
    breaks = np.flatnonzero(np.diff(steps) > gap)
    firsts = np.concatenate(([steps[0]], steps[breaks + 1]))
    lasts = np.concatenate((steps[breaks], [steps[-1]]))
    return list(zip(firsts.tolist(), lasts.tolist()))


def _shade_nonfinite(ax: Any, log: RunLog, data: _Reduced, *, label: bool) -> None:
    """Red bands over the steps whose gradients held NaN/Inf (merged when close)."""
    nonfinite = _event_steps(log, "nonfinite")
    if not len(nonfinite):
        nonfinite = log.step[log.nonfinite].astype(np.float64)
    span = data.edges[-1] - data.edges[0]
    for i, (a, b) in enumerate(_runs(nonfinite, max(1.0, span / 400))):
        count = f"{len(nonfinite)} step{'s' if len(nonfinite) > 1 else ''}"
        name = f"NaN/Inf gradient ({count})" if i == 0 and label else None
        ax.axvspan(a - 0.5, b + 0.5, color=_RED, alpha=0.18, lw=0, label=name)


def _draw_loss(ax: Any, log: RunLog, data: _Reduced) -> None:
    """The loss (log scale when it spans decades), loss spikes on it, the LR on a twin axis."""
    _shade_nonfinite(ax, log, data, label=False)
    shown = _loss_series(ax, log, data, colour=_LOSS, spike_colour=_GOLD, name="loss")
    if shown is None:
        ax.text(0.5, 0.5, "loss not recorded", transform=ax.transAxes, ha="center", va="center")
        ax.set_yticks([])
    else:
        _scale(ax, shown, margin=(1.5, 2.5))
    ax.set_ylabel("loss")
    ax.grid(True, which="major", alpha=0.3)
    ax.tick_params(labelbottom=False)
    handles, labels = ax.get_legend_handles_labels()
    if np.isfinite(data.lr).any():
        twin = ax.twinx()
        _line(twin, data, data.lr, color=_LR, lw=1.1, ls="--", label="learning rate (right axis)")
        _scale(twin, data.lr[np.isfinite(data.lr)], margin=(1.3, 1.3))
        twin.set_ylabel("learning rate", color=_LR)
        twin.tick_params(axis="y", colors=_LR, labelsize=8)
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    else:  # said in the legend row, where it can hide no data
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], ls="none"))
        labels.append("learning rate not recorded")
    legend = _legend_above(ax, handles, labels)
    if legend is not None and labels[-1] == "learning rate not recorded":
        legend.get_texts()[-1].set_color("0.35")


def _loss_series(
    ax: Any,
    log: RunLog,
    data: _Reduced,
    *,
    colour: str,
    spike_colour: str,
    name: str,
    counted: bool = True,
    nan_height: float = 0.93,
    width: float = 1.4,
) -> np.ndarray | None:
    """Draw one run's loss, its loss spikes on the curve and its NaN/Inf losses along the top.

    Returns:
        The finite values drawn (for the axis limits), or None if the run recorded no loss.
    """
    bad = np.isinf(log.loss) | (np.isnan(log.loss) & log.nonfinite)
    bad_steps = log.step[bad].astype(np.float64) if np.isfinite(log.loss).any() else bad[:0]
    spikes = [(e.step, _number(e.data.get("loss"))) for e in log.events if e.kind == "loss_spike"]
    if not np.isfinite(data.loss_max).any() and not len(bad_steps):
        return None
    if data.binned:
        ax.fill_between(
            data.centers, data.loss_min, data.loss_max, step="mid", color=colour, alpha=0.2, lw=0
        )
        ax.stairs(
            data.loss_max, data.edges, color=colour, lw=width, label=f"{name} (max per column)"
        )
    else:  # the loss is known at the recorded steps, and at each loss spike (its event)
        known = dict(zip(log.step.tolist(), log.loss.tolist()))
        known.update((step, y) for step, y in spikes if np.isfinite(y))
        lx = np.array(sorted(known), dtype=np.float64)
        if log.every > 1 and counted:
            name += " (recorded steps and loss spikes)"
        ax.plot(lx, [known[k] for k in lx.tolist()], color=colour, lw=width, label=name)
    if spikes:
        sx, sy = np.array(spikes, dtype=np.float64).T
        ax.scatter(
            sx,
            sy,
            marker="D",
            s=36 * width / 1.4,
            color=spike_colour,
            edgecolor="black",
            lw=0.5,
            zorder=5,
            label=f"loss spike ({len(spikes)})" if counted else None,
        )
    if len(bad_steps):
        ax.scatter(
            bad_steps,
            np.full(len(bad_steps), nan_height),
            transform=ax.get_xaxis_transform(),
            marker="x",
            s=30,
            color=_RED if counted else colour,
            lw=1.5,
            zorder=5,
            label=f"loss NaN/Inf ({len(bad_steps)})" if counted else None,
        )
    shown = np.concatenate((data.loss_max, data.loss_min, [y for _, y in spikes]))
    return shown[np.isfinite(shown)]


def _line(ax: Any, data: _Reduced, values: np.ndarray, **style: Any) -> None:
    """A series over steps: flat over each window when a value stands for several steps."""
    if data.windowed:
        ax.stairs(values, data.edges, baseline=None, **style)
    else:
        ax.plot(data.centers, values, **style)


def _legend_above(ax: Any, handles: list[Any], labels: list[str]) -> Any:
    """The legend in one row above the panel, where it hides no data (None if no entry)."""
    if not handles:
        return None
    return ax.legend(
        handles,
        labels,
        loc="lower left",
        bbox_to_anchor=(0, 1),
        ncols=min(len(handles), 8),
        fontsize=8,
        frameon=False,
        borderaxespad=0.2,
        handlelength=1.8,
        columnspacing=1.2,
    )


def _scale(ax: Any, values: np.ndarray, *, margin: tuple[float, float]) -> None:
    """A log y axis when ``values`` are all positive and span 30x or more, else linear."""
    if not len(values):
        return
    low, high = float(values.min()), float(values.max())
    if low > 0 and high / low >= 30:
        ax.set_yscale("log")
        ax.set_ylim(low / margin[0], high * margin[1])


def _draw_global(ax: Any, log: RunLog, data: _Reduced) -> None:
    x = data.centers
    positive = data.global_max[np.isfinite(data.global_max) & (data.global_max > 0)]
    if data.binned:
        ax.fill_between(
            x, data.global_min, data.global_max, step="mid", color="#1f77b4", alpha=0.2, lw=0
        )
    label = "global gradient norm" + (f" (max {data.window_name})" if data.windowed else "")
    _line(ax, data, data.global_max, color="#1f77b4", lw=1.4, label=label)
    max_norm = None
    if data.any_clipped:
        _line(ax, data, data.clipped_max, color="#2ca02c", lw=1.0, ls="--", label="after clipping")
        clip = log.header.config.get("clip")
        max_norm = clip.get("max_norm") if isinstance(clip, dict) else None
        if isinstance(max_norm, int | float):
            ax.axhline(max_norm, color="#2ca02c", lw=0.8, ls=":", label=f"max_norm {max_norm:g}")
    if np.isfinite(data.threshold).any():
        _line(ax, data, data.threshold, color="0.45", lw=0.9, ls=":", label="spike threshold")

    _shade_nonfinite(ax, log, data, label=True)

    spikes = [e for e in log.events if e.kind == "spike"]
    if spikes:
        sx = np.array([e.step for e in spikes], dtype=np.float64)
        sy = np.array([_number(e.data.get("global_norm")) for e in spikes])
        ax.scatter(
            sx,
            sy,
            marker="^",
            s=46,
            color=_ORANGE,
            edgecolor="black",
            lw=0.5,
            zorder=5,
            label=f"spike ({len(spikes)})",
        )

    bottom = ax.get_xaxis_transform()
    skipped = np.union1d(_event_steps(log, "skip"), log.step[log.skipped].astype(np.float64))
    if len(skipped):
        ax.scatter(
            skipped,
            np.full(len(skipped), 0.04),
            transform=bottom,
            marker="v",
            s=22,
            color=_PURPLE,
            lw=0,
            zorder=5,
            label=f"optimizer step skipped ({len(skipped)})",
        )

    limits = [positive]
    if data.any_clipped:
        limits.append(data.clipped_max[np.isfinite(data.clipped_max) & (data.clipped_max > 0)])
    if isinstance(max_norm, int | float) and max_norm > 0:
        limits.append(np.array([float(max_norm)]))
    shown = np.concatenate(limits)
    if len(shown):
        ax.set_yscale("log")
        low, high = shown.min(), shown.max()
        ax.set_ylim(low / 3, high * 6)
    else:
        ax.text(
            0.5,
            0.5,
            "no finite gradient norm recorded",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color=_RED,
        )
        ax.set_yticks([])
    ax.set_ylabel("global grad norm")
    ax.grid(True, which="major", alpha=0.3)
    ax.tick_params(labelbottom=False)
    _legend_above(ax, *ax.get_legend_handles_labels())


def _draw_heatmap(
    ax: Any, cax: Any, fig: Any, log: RunLog, data: _Reduced, depth: int | None
) -> None:
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter

    values = data.values.T  # layers x columns
    positive = values[np.isfinite(values) & (values > 0)]
    cmap = _colormap()
    n_layers = len(data.layers)
    y_edges = np.arange(n_layers + 1) - 0.5
    if len(positive):
        low, high = _colour_range(positive, data.global_max)
        norm = LogNorm(vmin=low, vmax=high)
        mesh = ax.pcolormesh(
            data.edges,
            y_edges,
            np.ma.masked_where(~(values > 0), values),
            cmap=cmap,
            norm=norm,
            shading="flat",
            rasterized=True,
        )
        below = bool(positive.min() < low)
        above = bool(positive.max() > high)
        extend = {(False, False): "neither", (True, False): "min", (False, True): "max"}
        bar = fig.colorbar(mesh, cax=cax, extend=extend.get((below, above), "both"))
        bar.set_label("layer gradient norm", fontsize=9)
        if high / low < 100:  # under two decades: label 2x and 5x too, not every minor tick
            bar.ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            bar.ax.yaxis.set_minor_formatter(
                LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(np.inf, np.inf))
            )
        else:
            bar.ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        cax.set_axis_off()
    for mask, colour in ((values == 0, _ZERO), (data.nonfinite.T, _RED)):
        if mask.any():
            cells = np.ma.masked_where(~mask, np.ones_like(values))
            ax.pcolormesh(
                data.edges,
                y_edges,
                cells,
                cmap=ListedColormap([colour]),
                shading="flat",
                rasterized=True,
            )
    ax.set_facecolor(_ABSENT)  # no gradient at all: background shows through

    ax.set_ylim(n_layers - 0.5, -0.5)  # first layer on top
    every = max(1, int(np.ceil(n_layers / 40)))
    ticks = np.arange(0, n_layers, every)
    names = [_short(data.layers[i]) for i in ticks]  # the full names are in the table
    ax.set_yticks(ticks, names, fontsize=8 if n_layers <= 24 else 6)
    ax.set_xlim(data.edges[0], data.edges[-1])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer (model order)" if n_layers >= 8 else "layer")

    handles = []
    if data.nonfinite.any():
        handles.append(Patch(color=_RED, label="NaN/Inf"))
    if data.absent.any():
        handles.append(Patch(color=_ABSENT, label="no gradient"))
    if (values == 0).any():
        handles.append(Patch(color=_ZERO, label="zero gradient"))
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0, -0.09 if n_layers < 8 else -0.05),
        ncols=3,
        fontsize=8,
        frameon=False,
    )

    first = next((e for e in log.events if e.kind == "nonfinite" and e.params), None)
    if first is not None:
        name = first.params[0]
        layer = (
            data.layers.index(layer_of(name, depth)) if layer_of(name, depth) in data.layers else 0
        )
        right = first.step > (data.edges[0] + data.edges[-1]) / 2
        ax.annotate(
            f"NaN/Inf starts: {_short(name, 48)}, step {first.step}",
            xy=(first.step, layer),
            xytext=(-28 if right else 28, 16 if layer >= n_layers / 2 else -16),
            textcoords="offset points",
            ha="right" if right else "left",
            va="bottom" if layer >= n_layers / 2 else "top",
            fontsize=8.5,
            bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": _RED, "lw": 0.8},
            arrowprops={"arrowstyle": "->", "color": "black", "lw": 0.9},
        )


def _colour_range(positive: np.ndarray, global_max: np.ndarray) -> tuple[float, float]:
    """Log colour limits that show the run's build-up, not only its most extreme cells.

    A layer's norm never exceeds the global norm of the same step, except at steps where the
    global norm itself overflowed; those cells (often 10^30 times the rest) would turn everything
    before them into one colour. So the top of the scale is the largest finite global norm (the
    top panel's range), the bottom the 1st percentile of layer norms; cells beyond take the end
    colours and the colour bar's arrows say so.
    """
    low = float(10 ** np.percentile(np.log10(positive), 1))
    finite = global_max[np.isfinite(global_max) & (global_max > 0)]
    high = float(finite.max()) if len(finite) else float(positive.max())
    high = min(high, float(positive.max()))
    if high < low * 10:  # a nearly flat run: still show a decade
        middle = np.sqrt(low * high)
        low, high = middle / np.sqrt(10), middle * np.sqrt(10)
    return low, high


def _colormap() -> Any:
    from matplotlib import colormaps

    viridis = colormaps["viridis"]
    return viridis.with_extremes(under=viridis(0.0), bad=_ABSENT)


def _title(log: RunLog, data: _Reduced, chars: int) -> str:
    """The figure's title, wrapped between its parts to lines of at most ``chars``."""
    steps = int(log.window_steps.sum())
    parts = [f"{log.path.name}: {steps} steps, {len(data.layers)} layers"]
    first = next((e for e in log.events if e.kind == "nonfinite" and e.params), None)
    if first is not None:
        parts.append(f"NaN/Inf from step {first.step} (first in {_short(first.params[0], 48)})")
    spikes = sum(e.kind == "spike" for e in log.events)
    if spikes:
        parts.append(f"{spikes} spike{'s' * (spikes > 1)}")
    if data.any_clipped:
        clipped = int((log.clip_coef < 1.0).sum())
        parts.append(f"clipped {clipped}/{len(log)} recorded steps")
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 3 + len(part) > chars:
            lines.append(part)
        else:
            lines[-1] += f" · {part}"
    return "\n".join(lines)


def _short(name: str, limit: int = 28) -> str:
    """A long layer name cut in the middle (``encoder_blo…ut.weight``), keeping both ends."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 2
    return f"{name[: limit - 1 - tail]}…{name[-tail:]}"


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
