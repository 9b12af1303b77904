"""The run figure's series: steps reduced to columns, and the loss and gradient-norm panels.

:class:`Reduced` brings a log's series down to at most ``max_columns`` columns, keeping each
column's largest finite norm and whether any step in it was non-finite, so no spike or NaN
disappears; :func:`draw_loss` and :func:`draw_global` draw the two line panels of
:mod:`gradwatch.report.plots` from it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch.layers import layer_of
from gradwatch.report.runlog_arrays import RunLog

RED = "#d62728"
ORANGE = "#ff7f0e"
PURPLE = "#9467bd"
GOLD = "#bcbd22"
ZERO = "black"
ABSENT = "#e6e6e6"
LOSS = "#333333"
LR = "#8c564b"


class Reduced:
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

        self.global_max = fmax(log.peak_global_norm, starts)
        self.global_min = fmin(log.global_norm, starts)
        clipped = np.where(log.clip_coef < 1.0, log.clipped_norm, np.nan)
        self.clipped_max = fmax(clipped, starts)
        self.threshold = fmax(log.spike_threshold, starts)
        self.any_clipped = bool(np.any(log.clip_coef < 1.0))
        self.loss_max = fmax(log.loss, starts)
        self.loss_min = fmin(log.loss, starts)
        self.lr = fmax(log.lr, starts)

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
        self.values = fmax(values, starts)
        self.nonfinite = np.logical_or.reduceat(nonfinite, starts, axis=0)
        self.absent = np.logical_and.reduceat(absent, starts, axis=0)


def fmax(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Largest finite value of each column group (NaN if none)."""
    finite = np.where(np.isfinite(values), values, np.nan)
    with np.errstate(invalid="ignore"):
        return np.fmax.reduceat(finite, starts, axis=0)


def fmin(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    finite = np.where(np.isfinite(values), values, np.nan)
    with np.errstate(invalid="ignore"):
        return np.fmin.reduceat(finite, starts, axis=0)


def event_steps(log: RunLog, kind: str) -> np.ndarray:
    return np.array(sorted({e.step for e in log.events if e.kind == kind}), dtype=np.float64)


def runs(steps: np.ndarray, gap: float) -> list[tuple[float, float]]:
    """Merge sorted steps closer than ``gap`` into ``(first, last)`` runs."""
    if not len(steps):
        return []
    breaks = np.flatnonzero(np.diff(steps) > gap)
    firsts = np.concatenate(([steps[0]], steps[breaks + 1]))
    lasts = np.concatenate((steps[breaks], [steps[-1]]))
    return list(zip(firsts.tolist(), lasts.tolist()))


def shade_nonfinite(ax: Any, log: RunLog, data: Reduced, *, label: bool) -> None:
    """Red bands over the steps whose gradients held NaN/Inf (merged when close)."""
    nonfinite = event_steps(log, "nonfinite")
    if not len(nonfinite):
        nonfinite = log.step[log.nonfinite].astype(np.float64)
    span = data.edges[-1] - data.edges[0]
    for i, (a, b) in enumerate(runs(nonfinite, max(1.0, span / 400))):
        count = f"{len(nonfinite)} step{'s' if len(nonfinite) > 1 else ''}"
        name = f"NaN/Inf gradient ({count})" if i == 0 and label else None
        ax.axvspan(a - 0.5, b + 0.5, color=RED, alpha=0.18, lw=0, label=name)


def draw_loss(ax: Any, log: RunLog, data: Reduced) -> None:
    """The loss (log scale when it spans decades), loss spikes on it, the LR on a twin axis."""
    shade_nonfinite(ax, log, data, label=False)
    shown = loss_series(ax, log, data, colour=LOSS, spike_colour=GOLD, name="loss")
    if shown is None:
        ax.text(0.5, 0.5, "loss not recorded", transform=ax.transAxes, ha="center", va="center")
        ax.set_yticks([])
    else:
        scale(ax, shown, margin=(1.5, 2.5))
    ax.set_ylabel("loss")
    ax.grid(True, which="major", alpha=0.3)
    ax.tick_params(labelbottom=False)
    handles, labels = ax.get_legend_handles_labels()
    if np.isfinite(data.lr).any():
        twin = ax.twinx()
        line(twin, data, data.lr, color=LR, lw=1.1, ls="--", label="learning rate (right axis)")
        scale(twin, data.lr[np.isfinite(data.lr)], margin=(1.3, 1.3))
        twin.set_ylabel("learning rate", color=LR)
        twin.tick_params(axis="y", colors=LR, labelsize=8)
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    else:  # said in the legend row, where it can hide no data
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], ls="none"))
        labels.append("learning rate not recorded")
    legend = legend_above(ax, handles, labels)
    if legend is not None and labels[-1] == "learning rate not recorded":
        legend.get_texts()[-1].set_color("0.35")


def loss_series(
    ax: Any,
    log: RunLog,
    data: Reduced,
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
    spikes = [(e.step, number(e.data.get("loss"))) for e in log.events if e.kind == "loss_spike"]
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
            color=RED if counted else colour,
            lw=1.5,
            zorder=5,
            label=f"loss NaN/Inf ({len(bad_steps)})" if counted else None,
        )
    shown = np.concatenate((data.loss_max, data.loss_min, [y for _, y in spikes]))
    return shown[np.isfinite(shown)]


def line(ax: Any, data: Reduced, values: np.ndarray, **style: Any) -> None:
    """A series over steps: flat over each window when a value stands for several steps."""
    if data.windowed:
        ax.stairs(values, data.edges, baseline=None, **style)
    else:
        ax.plot(data.centers, values, **style)


def legend_above(ax: Any, handles: list[Any], labels: list[str]) -> Any:
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


def scale(ax: Any, values: np.ndarray, *, margin: tuple[float, float]) -> None:
    """A log y axis when ``values`` are all positive and span 30x or more, else linear."""
    if not len(values):
        return
    low, high = float(values.min()), float(values.max())
    if low > 0 and high / low >= 30:
        ax.set_yscale("log")
        ax.set_ylim(low / margin[0], high * margin[1])


def draw_global(ax: Any, log: RunLog, data: Reduced) -> None:
    x = data.centers
    positive = data.global_max[np.isfinite(data.global_max) & (data.global_max > 0)]
    if data.binned:
        ax.fill_between(
            x, data.global_min, data.global_max, step="mid", color="#1f77b4", alpha=0.2, lw=0
        )
    label = "global gradient norm" + (f" (max {data.window_name})" if data.windowed else "")
    line(ax, data, data.global_max, color="#1f77b4", lw=1.4, label=label)
    max_norm = None
    if data.any_clipped:
        line(ax, data, data.clipped_max, color="#2ca02c", lw=1.0, ls="--", label="after clipping")
        clip = log.header.config.get("clip")
        max_norm = clip.get("max_norm") if isinstance(clip, dict) else None
        if isinstance(max_norm, int | float):
            ax.axhline(max_norm, color="#2ca02c", lw=0.8, ls=":", label=f"max_norm {max_norm:g}")
    if np.isfinite(data.threshold).any():
        line(ax, data, data.threshold, color="0.45", lw=0.9, ls=":", label="spike threshold")

    shade_nonfinite(ax, log, data, label=True)

    spikes = [e for e in log.events if e.kind == "spike"]
    if spikes:
        sx = np.array([e.step for e in spikes], dtype=np.float64)
        sy = np.array([number(e.data.get("global_norm")) for e in spikes])
        ax.scatter(
            sx,
            sy,
            marker="^",
            s=46,
            color=ORANGE,
            edgecolor="black",
            lw=0.5,
            zorder=5,
            label=f"spike ({len(spikes)})",
        )

    bottom = ax.get_xaxis_transform()
    skipped = np.union1d(event_steps(log, "skip"), log.step[log.skipped].astype(np.float64))
    if len(skipped):
        ax.scatter(
            skipped,
            np.full(len(skipped), 0.04),
            transform=bottom,
            marker="v",
            s=22,
            color=PURPLE,
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
            color=RED,
        )
        ax.set_yticks([])
    ax.set_ylabel("global grad norm")
    ax.grid(True, which="major", alpha=0.3)
    ax.tick_params(labelbottom=False)
    legend_above(ax, *ax.get_legend_handles_labels())


def title(log: RunLog, data: Reduced, chars: int) -> str:
    """The figure's title, wrapped between its parts to lines of at most ``chars``."""
    steps = int(log.window_steps.sum())
    parts = [f"{log.path.name}: {steps} steps, {len(data.layers)} layers"]
    first = next((e for e in log.events if e.kind == "nonfinite" and e.params), None)
    if first is not None:
        parts.append(f"NaN/Inf from step {first.step} (first in {short(first.params[0], 48)})")
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


def short(name: str, limit: int = 28) -> str:
    """A long layer name cut in the middle (``encoder_blo…ut.weight``), keeping both ends."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 2
    return f"{name[: limit - 1 - tail]}…{name[-tail:]}"


def number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
