"""Text for people: numbers, the window line, the per-layer table and the summary notes.

Shared by the console, logging and tracker sinks and the report viewer, so a number reads the
same everywhere. Made for logs that are not a terminal (CI, Slurm output files, 80 columns):

* a number is never cut: number columns are as wide as their widest number;
* a layer name too long for its column breaks between its parts (after ``.``, ``_``, ``-``), not
  inside one, and a long line wraps between its ``|``-separated parts, never inside a number;
* runs of layers whose rows read the same fold into one row (``layers 2-19 (18 alike)``);
* names are quoted in running text (```0` 1.099``), so a numeric layer never reads as a number.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence

import numpy as np
from rich.table import Table
from rich.text import Text

from gradwatch.records import LayerSummary, RunSummary

__all__ = ["fmt", "summary_notes", "summary_table", "window_line", "wrap_notes"]

FOLD_AT = 3
"""Fewest consecutive alike layers folded into one row of the table."""

_NUMBERS = ("min", "mean", "max", "last")
_COUNTS = (("nan steps", "steps"), ("spike culprit", "culprit"))  # header, its longest word
_PARTS = re.compile(r"[^._\- ]*[._\- ]|[^._\- ]+")


def fmt(value: float | None) -> str:
    """A norm for people: 4 significant digits, ``nan``/``inf`` spelled out, ``-`` for None."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def window_line(s: RunSummary, *, top_k: int = 3, width: int | None = None) -> Text:
    """A window of steps in one line: norms, clip rate, counts, the largest layers.

    Args:
        s: The window's statistics (``StepAggregator.summary()``).
        top_k: How many layers to name, largest maximum norm first.
        width: Wrap between the line's parts to fit this many columns: a broken line ends with
            its separator (``|`` or ``,``), the next is indented by two spaces (None: one line,
            as a log record).
    """
    parts: list[tuple[str, str | None, str]] = [  # (text, style, separator before it)
        (f"gradwatch steps {s.first_step}-{s.last_step}", "bold cyan", ""),
        (
            f"norm {fmt(s.global_last)} (mean {fmt(s.global_mean)}, max {fmt(s.global_max)})",
            None,
            " | ",
        ),
        (f"clipped {s.clip_rate:.0%}", None, " | "),
        (f"spikes {s.spikes}", "yellow" if s.spikes else None, " | "),
        (f"nan steps {s.nonfinite_steps}", "red" if s.nonfinite_steps else None, " | "),
        (f"skipped {s.skipped_steps}", "magenta" if s.skipped_steps else None, " | "),
    ]
    if top_k and s.layers:
        maxima = np.array([layer.max for layer in s.layers])
        order = np.argsort(-np.nan_to_num(maxima, nan=-np.inf), kind="stable")[:top_k]
        for n, i in enumerate(order):
            named = f"`{s.layers[i].name}` {fmt(s.layers[i].max)}"
            parts.append((f"top: {named}", None, " | ") if n == 0 else (named, None, ", "))
    text, column = Text(), 0
    for n, (part, style, sep) in enumerate(parts):
        room = 2 if n + 1 < len(parts) else 0  # for the separator ending a broken line
        if n and width is not None and column + len(sep) + len(part) + room > width:
            text.append(sep.rstrip() + "\n  ")  # the separator stays, ending the line
            column = 2
        elif n:
            text.append(sep)
            column += len(sep)
        text.append(part, style=style)
        column += len(part)
    return text


def summary_table(
    s: RunSummary, *, max_rows: int = 40, width: int | None = None, fold: bool = True
) -> Table:
    """The final table: one row per layer, alike neighbours folded (the worst ``max_rows`` if more).

    Totals, NaN origins and findings go below it (:func:`summary_notes`), at the console's full
    width rather than folded into a caption as narrow as the table.

    Args:
        s: The run's summary.
        max_rows: Rows shown; beyond that, the rows with the most NaN steps and the largest
            norms are kept, in model order, and the rest folded into one line.
        width: Fit the table in this many columns: numbers whole, layer names broken between
            their parts (None: rich's own layout).
        fold: Fold runs of :data:`FOLD_AT` or more consecutive layers that read alike.
    """
    rows = _fold(s.layers) if fold else [(layer.name, layer, 1) for layer in s.layers]
    shown = rows
    if len(rows) > max_rows:
        worst = sorted(
            range(len(rows)),
            key=lambda i: (-rows[i][1].nonfinite_steps, -np.nan_to_num(rows[i][1].max, nan=-1)),
        )[:max_rows]
        shown = [rows[i] for i in sorted(worst)]
    cells = [_cells(layer) for _, layer, _ in shown]
    hidden = len(s.layers) - sum(count for _, _, count in shown)
    more = [f"... {hidden} more layers"] if len(shown) < len(rows) else []
    table = Table(title=f"gradwatch summary: {s.steps} steps", show_lines=False)
    widths = _widths(cells, [name for name, _, _ in shown] + more, width)
    table.add_column("layer", justify="left", overflow="fold", width=widths[0])
    headers = [*_NUMBERS, *(header for header, _ in _COUNTS)]
    for header, column_width in zip(headers, widths[1:]):
        table.add_column(header, justify="right", no_wrap=header in _NUMBERS, width=column_width)
    for (name, layer, _), row in zip(shown, cells):
        label = name if widths[0] is None else _break(name, widths[0])
        table.add_row(label, *row, style="red" if layer.nonfinite_steps else None)
    for label in more:
        table.add_row(label if widths[0] is None else _break(label, widths[0]), *[""] * 6)
    return table


def summary_notes(s: RunSummary) -> str:
    """Run totals, where NaN/Inf started, and findings, as lines of plain text."""
    lines = [
        f"global norm: min {fmt(s.global_min)}  mean {fmt(s.global_mean)}  "
        f"max {fmt(s.global_max)}  last {fmt(s.global_last)}",
        f"clipped {s.clipped_steps} steps ({s.clip_rate:.1%})  spikes {s.spikes}  "
        f"loss spikes {s.loss_spikes}  nan/inf steps {s.nonfinite_steps}  "
        f"skipped {s.skipped_steps}",
    ]
    if s.nonfinite_origins:
        shown = ", ".join(f"step {st}: {name}" for st, name in s.nonfinite_origins[:5])
        extra = len(s.nonfinite_origins) - 5
        lines.append(f"NaN/Inf started in: {shown}{f' (+{extra} more)' if extra > 0 else ''}")
    for finding in s.findings:
        lines.append(f"[{finding.kind}] {finding.evidence}")
        lines.extend(f"    -> {remedy}" for remedy in finding.remedies)
    return "\n".join(lines)


def wrap_notes(notes: str, width: int) -> str:
    """:func:`summary_notes` wrapped between words to ``width`` columns, with hanging indents."""
    out = []
    for line in notes.splitlines():
        indent = "       " if line.startswith("    -> ") else "  "
        out.append(
            textwrap.fill(
                line,
                width,
                subsequent_indent=indent,
                break_long_words=False,
                break_on_hyphens=False,
            )
            or line
        )
    return "\n".join(out)


def _cells(layer: LayerSummary) -> list[str]:
    numbers = [fmt(layer.min), fmt(layer.mean), fmt(layer.max), fmt(layer.last)]
    return [*numbers, str(layer.nonfinite_steps), str(layer.spike_culprit)]


def _fold(layers: Sequence[LayerSummary]) -> list[tuple[str, LayerSummary, int]]:
    """Rows ``(label, layer, layers it stands for)``: :data:`FOLD_AT`+ alike neighbours are one."""
    rows: list[tuple[str, LayerSummary, int]] = []
    i = 0
    while i < len(layers):
        j = i + 1
        while j < len(layers) and _cells(layers[j]) == _cells(layers[i]):
            j += 1
        if j - i >= FOLD_AT:
            label = f"layers {layers[i].name}-{layers[j - 1].name} ({j - i} alike)"
            rows.append((label, layers[i], j - i))
        else:
            rows.extend((layer.name, layer, 1) for layer in layers[i:j])
        i = j
    return rows


def _widths(cells: list[list[str]], names: list[str], width: int | None) -> list[int | None]:
    """Column widths fitting ``width`` (layer column first), or all None for rich's layout."""
    if width is None:
        return [None] * 7
    numbers = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(_NUMBERS)]
    counts = [
        max([len(word), *(len(row[4 + i]) for row in cells)]) for i, (_, word) in enumerate(_COUNTS)
    ]
    borders = 3 * 7 + 1  # "│ " + " │" per column, shared
    longest = max([len("layer"), *(len(n) for n in names)])
    free = width - borders - sum(numbers) - sum(counts) - longest
    for i, (header, _) in enumerate(_COUNTS):  # whole headers where room allows
        grow = min(max(free, 0), len(header) - counts[i])
        counts[i] += grow
        free -= grow
    layer = max(8, width - borders - sum(numbers) - sum(counts))
    return [min(layer, longest), *numbers, *counts]


def _break(name: str, width: int) -> str:
    """``name`` on lines of at most ``width``, broken after ``.``, ``_``, ``-`` or a space."""
    if len(name) <= width:
        return name
    lines = [""]
    for part in _PARTS.findall(name):
        while len(part) > width:  # a part longer than the column: cut it where it must be
            room = width - len(lines[-1])
            lines[-1] += part[:room]
            part = part[room:]
            lines.append("")
        if len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(line for line in lines if line)
