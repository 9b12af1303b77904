"""Console sink: one-line alerts, a compact periodic summary, and a final table, through rich.

Output is at most one alert line per event and one summary line every ``every`` steps, so a long
run's log stays readable. It shares the terminal with progress bars:

* By default it prints to rich's global console, the one ``rich.progress`` uses by default, so
  lines appear above a running ``Progress`` bar. For a ``Progress`` with its own console, pass
  ``ConsoleSink(console=progress.console)``.
* When a ``tqdm`` bar is active, lines go through ``tqdm.write``, which clears the bar, prints
  the line and redraws the bar, instead of writing into the middle of it.

When the output is not a terminal (CI logs, files) rich drops colour and cursor codes, and where
the output encoding cannot show ``⚠`` or box-drawing characters, plain ASCII is used instead.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import rich
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from gradwatch.config import check_int
from gradwatch.errors import ConfigTypeError
from gradwatch.records import Event, Record, RunStart, RunSummary, StepReport
from gradwatch.report.base import Sink, StepAggregator, window_due

__all__ = ["ConsoleSink", "fmt", "summary_notes", "summary_table", "window_line"]

_STYLE = {
    "nonfinite": "bold red",
    "spike": "bold yellow",
    "loss_spike": "yellow",
    "skip": "magenta",
}


def fmt(value: float | None) -> str:
    """A norm for people: 4 significant digits, ``nan``/``inf`` spelled out, ``-`` for None."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def window_line(s: RunSummary, *, top_k: int = 3) -> Text:
    """One line summarising a window of steps: norms, clip rate, counts, the largest layers.

    Args:
        s: The window's statistics (``StepAggregator.summary()``).
        top_k: How many layers to name, largest maximum norm first.
    """
    text = Text()
    text.append(f"gradwatch steps {s.first_step}-{s.last_step}", style="bold cyan")
    text.append(f" | norm {fmt(s.global_last)} (mean {fmt(s.global_mean)}, ")
    text.append(f"max {fmt(s.global_max)})")
    text.append(f" | clipped {s.clip_rate:.0%}")
    text.append(f" | spikes {s.spikes}", style="yellow" if s.spikes else None)
    text.append(f" | nan steps {s.nonfinite_steps}", style="red" if s.nonfinite_steps else None)
    text.append(f" | skipped {s.skipped_steps}", style="magenta" if s.skipped_steps else None)
    if top_k and s.layers:
        maxima = np.array([layer.max for layer in s.layers])
        order = np.argsort(-np.nan_to_num(maxima, nan=-np.inf), kind="stable")[:top_k]
        top = ", ".join(f"{s.layers[i].name} {fmt(s.layers[i].max)}" for i in order)
        text.append(f" | top: {top}")
    return text


def summary_table(s: RunSummary, *, max_rows: int = 40) -> Table:
    """The final table: one row per layer (the worst ``max_rows`` if more).

    Totals, NaN origins and findings go below it (:func:`summary_notes`), at the console's full
    width rather than folded into a caption as narrow as the table.

    Args:
        s: The run's summary.
        max_rows: Layers shown; beyond that, the layers with the most NaN steps and the largest
            norms are kept, in model order, and the rest folded into one line.
    """
    table = Table(title=f"gradwatch summary: {s.steps} steps", show_lines=False)
    # A long layer name wraps inside its cell rather than being cut ("…"): in an 80-column CI
    # log the whole name stays readable.
    table.add_column("layer", justify="left", overflow="fold")
    for column in ("min", "mean", "max", "last", "nan steps", "spike culprit"):
        table.add_column(column, justify="right")
    layers = list(s.layers)
    shown = layers
    if len(layers) > max_rows:
        worst = sorted(
            range(len(layers)),
            key=lambda i: (-layers[i].nonfinite_steps, -np.nan_to_num(layers[i].max, nan=-1)),
        )[:max_rows]
        shown = [layers[i] for i in sorted(worst)]
    for layer in shown:
        table.add_row(
            layer.name,
            fmt(layer.min),
            fmt(layer.mean),
            fmt(layer.max),
            fmt(layer.last),
            str(layer.nonfinite_steps),
            str(layer.spike_culprit),
            style="red" if layer.nonfinite_steps else None,
        )
    if len(shown) < len(layers):
        table.add_row(f"... {len(layers) - len(shown)} more layers", *[""] * 6)
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


class ConsoleSink(Sink):
    """Prints alerts as they happen, a summary line every ``every`` steps, a table at the end.

    Args:
        every: Steps per periodic summary line (0 disables the periodic line).
        top_k: Layers named in the periodic line (largest max norm in the window).
        max_rows: Layers shown in the final table; the rest are folded into one line.
        console: A ``rich.console.Console`` to print to. Default: rich's global console (stdout),
            which a default ``rich.progress.Progress`` also uses. Pass ``progress.console`` to
            share a progress display that has its own console.
        alerts: Print one line per NaN/spike/skip event as it happens.
        layer_depth: Group parameters into layers by their first ``layer_depth`` name parts in
            the periodic line (None: the watcher's ``layer_depth``, else by owning module).

    Raises:
        TypeError, ValueError: An argument is invalid (the message names it).
    """

    def __init__(
        self,
        every: int = 100,
        *,
        top_k: int = 3,
        max_rows: int = 40,
        console: Console | None = None,
        alerts: bool = True,
        layer_depth: int | None = None,
    ) -> None:
        self.every = check_int("every", every, minimum=0)
        self.top_k = check_int("top_k", top_k, minimum=0)
        self.max_rows = check_int("max_rows", max_rows)
        if layer_depth is not None:
            check_int("layer_depth", layer_depth)
        if console is not None and not isinstance(console, Console):
            raise ConfigTypeError(
                f"console must be a rich.console.Console or None, got {type(console).__name__}"
            )
        self.console = console if console is not None else rich.get_console()
        self.alerts = alerts
        self.layer_depth = layer_depth
        self._window: StepAggregator | None = None

    # ------------------------------------------------------------------------------ records

    def next_due(self, step: int) -> int:
        """The step completing the current window, so its line prints on time (never if every=0)."""
        return window_due(step, self.every, self._window.steps if self._window is not None else 0)

    def write(self, record: Record) -> None:
        if isinstance(record, StepReport):
            self._step(record)
        elif isinstance(record, Event):
            if self.alerts:
                mark = "⚠" if self._unicode else "!"
                self._print(
                    Text(f"gradwatch {mark} {record.message}", style=_STYLE.get(record.kind))
                )
        elif isinstance(record, RunStart):
            depth = self.layer_depth
            if depth is None:
                depth = record.config.get("layer_depth")
            self._window = StepAggregator([p.name for p in record.params], depth=depth)
        elif isinstance(record, RunSummary):
            self._print(self.render_summary(record))

    def _step(self, report: StepReport) -> None:
        if self._window is None:
            names = list(report.param_norms.names)
            self._window = StepAggregator(names, depth=self.layer_depth)
        self._window.update(report)
        if self.every and self._window.steps >= self.every:
            self._print(self.render_window(self._window))
            self._window.reset()

    # ---------------------------------------------------------------------------- rendering

    def render_window(self, window: StepAggregator) -> Text:
        """One line summarising a window of steps."""
        return window_line(window.summary(), top_k=self.top_k)

    def render_summary(self, s: RunSummary) -> Group:
        """The final table (one row per layer), then totals, NaN origins and findings."""
        return Group(summary_table(s, max_rows=self.max_rows), Text(summary_notes(s)))

    # ------------------------------------------------------------------------------- output

    @property
    def _unicode(self) -> bool:
        return self.console.encoding.lower().replace("-", "").startswith("utf")

    def _print(self, renderable: Any) -> None:
        tqdm_write = _active_tqdm_write()
        soft = isinstance(renderable, Text)  # one logical line: never hard-wrap it
        if tqdm_write is None:
            with _broken_pipe_raises(self.console):
                self.console.print(renderable, soft_wrap=soft)
            return
        with self.console.capture() as capture:
            self.console.print(renderable, soft_wrap=soft)
        tqdm_write(capture.get().rstrip("\n"), file=self.console.file)


_MISSING = object()


@contextlib.contextmanager
def _broken_pipe_raises(console: Console) -> Iterator[None]:
    """While the sink prints, a broken pipe raises ``BrokenPipeError`` and leaves stdout alone.

    rich's ``Console.on_broken_pipe`` points the process's stdout (fd 1) at ``/dev/null`` and
    raises ``SystemExit``, whatever file the console writes to: a sink whose own file broke would
    silence the user's healthy stdout for the rest of the run. :func:`_on_broken_pipe` replaces
    it for the sink's own prints only; the user's prints on a shared console keep their handler.
    """
    own = console.__dict__.get("on_broken_pipe", _MISSING)
    console.on_broken_pipe = functools.partial(_on_broken_pipe, console)  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is _MISSING:
            console.__dict__.pop("on_broken_pipe", None)
        else:
            console.on_broken_pipe = own  # type: ignore[method-assign]


def _on_broken_pipe(console: Console) -> None:
    """The console's file is a broken pipe: quiet the console and raise, so the sink is disabled.

    ``quiet`` stops the console writing to the dead file and drops what it could not write, as
    rich does. The process's stdout is pointed at ``/dev/null`` only when it *is* the broken pipe
    (``python train.py | head -1``), as rich does, so Python's flush of stdout at exit does not
    fail again; a healthy stdout is never touched.
    """
    console.quiet = True
    if _is_stdout(console.file):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    err = sys.exc_info()[1]  # rich calls this while handling the BrokenPipeError
    if isinstance(err, BrokenPipeError):
        raise err
    raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def _is_stdout(file: Any) -> bool:
    """``file`` writes to the same open file (pipe, terminal) as the process's stdout."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.fstat(sys.stdout.fileno()))
    except (AttributeError, OSError, ValueError):  # no descriptor (StringIO, pytest's capture)
        return False


def _active_tqdm_write() -> Any:
    """``tqdm.write`` if a tqdm bar is currently displayed, else None."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return None
    cls = getattr(tqdm_module, "tqdm", None)
    instances = getattr(cls, "_instances", None)
    if not instances:
        return None
    return cls.write
