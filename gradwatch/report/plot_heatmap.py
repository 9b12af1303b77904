"""The run figure's layer x step heatmap: where in the model the gradients went wrong.

One row per layer in model order, colour = gradient norm on a log scale, NaN/Inf cells in red,
and an arrow at the first NaN/Inf with the parameter it started in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch.layers import layer_of
from gradwatch.report.plot_series import (
    ABSENT,
    RED,
    ZERO,
    Reduced,
    short,
)
from gradwatch.report.runlog_arrays import RunLog


def draw_heatmap(
    ax: Any, cax: Any, fig: Any, log: RunLog, data: Reduced, depth: int | None
) -> None:
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, NullFormatter

    values = data.values.T  # layers x columns
    positive = values[np.isfinite(values) & (values > 0)]
    cmap = colormap()
    n_layers = len(data.layers)
    y_edges = np.arange(n_layers + 1) - 0.5
    if len(positive):
        low, high = colour_range(positive, data.global_max)
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
    for mask, colour in ((values == 0, ZERO), (data.nonfinite.T, RED)):
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
    ax.set_facecolor(ABSENT)  # no gradient at all: background shows through

    ax.set_ylim(n_layers - 0.5, -0.5)  # first layer on top
    every = max(1, int(np.ceil(n_layers / 40)))
    ticks = np.arange(0, n_layers, every)
    names = [short(data.layers[i]) for i in ticks]  # the full names are in the table
    ax.set_yticks(ticks, names, fontsize=8 if n_layers <= 24 else 6)
    ax.set_xlim(data.edges[0], data.edges[-1])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer (model order)" if n_layers >= 8 else "layer")

    handles = []
    if data.nonfinite.any():
        handles.append(Patch(color=RED, label="NaN/Inf"))
    if data.absent.any():
        handles.append(Patch(color=ABSENT, label="no gradient"))
    if (values == 0).any():
        handles.append(Patch(color=ZERO, label="zero gradient"))
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
            f"NaN/Inf starts: {short(name, 48)}, step {first.step}",
            xy=(first.step, layer),
            xytext=(-28 if right else 28, 16 if layer >= n_layers / 2 else -16),
            textcoords="offset points",
            ha="right" if right else "left",
            va="bottom" if layer >= n_layers / 2 else "top",
            fontsize=8.5,
            bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": RED, "lw": 0.8},
            arrowprops={"arrowstyle": "->", "color": "black", "lw": 0.9},
        )


def colour_range(positive: np.ndarray, global_max: np.ndarray) -> tuple[float, float]:
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


def colormap() -> Any:
    from matplotlib import colormaps

    viridis = colormaps["viridis"]
    return viridis.with_extremes(under=viridis(0.0), bad=ABSENT)
