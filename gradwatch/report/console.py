"""Console sink: one-line alerts, a compact periodic summary, and a final table, through rich.

Output is at most one alert line per event and one summary line every ``every`` steps, so a long
run's log stays readable. It shares the terminal with progress bars:

* By default it prints to rich's global console, the one ``rich.progress`` uses by default, so
  lines appear above a running ``Progress`` bar. For a ``Progress`` with its own console, pass
  ``ConsoleSink(console=progress.console)``.
* When a ``tqdm`` bar is active, lines go through ``tqdm.write``, which clears the bar, prints
  the line and redraws the bar, instead of writing into the middle of it.

When the output is not a terminal (CI logs, Slurm output files) rich drops colour and cursor
codes, and where the output encoding cannot show ``⚠`` or box-drawing characters, plain ASCII is
used instead. The text fits the console's width (80 columns in a file) without cutting a number
or a name (see :mod:`gradwatch.report.text`); an alert stays one line, whole, so ``grep`` finds
it complete.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
from collections.abc import Iterator
from typing import Any

import rich
from rich.console import Console, Group
from rich.text import Text

from gradwatch.errors import ConfigTypeError
from gradwatch.records import Event, RunSummary
from gradwatch.report.text import summary_notes, summary_table, window_line, wrap_notes
from gradwatch.report.windowed import StepWindow, WindowedSink
from gradwatch.validation import check_int

__all__ = ["ConsoleSink"]

_STYLE = {
    "nonfinite": "bold red",
    "spike": "bold yellow",
    "loss_spike": "yellow",
    "skip": "magenta",
}


class ConsoleSink(WindowedSink):
    """Prints alerts as they happen, a summary line every ``every`` steps, a table at the end.

    Args:
        every: Steps per periodic summary line (0 disables the periodic line).
        top_k: Layers named in the periodic line (largest max norm in the window).
        max_rows: Rows of the final table; the rest are folded into one line.
        console: A ``rich.console.Console`` to print to. Default: rich's global console (stdout),
            which a default ``rich.progress.Progress`` also uses. Pass ``progress.console`` to
            share a progress display that has its own console.
        alerts: Print one line per NaN/spike/skip event as it happens.
        layer_depth: Group parameters into layers by their first ``layer_depth`` name parts in
            the periodic line (None: the watcher's ``layer_depth``, else by owning module).

    Raises:
        TypeError, ValueError: An argument is invalid (the message names it).
    """

    render_partial = False  # the final table covers the steps after the last full window

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
        super().__init__(every=every, layer_depth=layer_depth, minimum_every=0)
        self.top_k = check_int("top_k", top_k, minimum=0)
        self.max_rows = check_int("max_rows", max_rows)
        if console is not None and not isinstance(console, Console):
            raise ConfigTypeError(
                f"console must be a rich.console.Console or None, got {type(console).__name__}"
            )
        self.console = console if console is not None else rich.get_console()
        self.alerts = alerts

    # ---------------------------------------------------------------------------- rendering

    def render_window(self, window: StepWindow) -> None:
        """One line (wrapped to the console's width between its parts) per window of steps."""
        self._print(window_line(window.stats, top_k=self.top_k, width=self.console.width))

    def render_event(self, event: Event) -> None:
        """One line per alert, whole, as it happens."""
        if self.alerts:
            mark = "⚠" if self._unicode else "!"
            self._print(Text(f"gradwatch {mark} {event.message}", style=_STYLE.get(event.kind)))

    def render_summary(self, summary: RunSummary) -> None:
        """The final table (one row per layer), then totals, NaN origins and findings."""
        width = self.console.width
        table = summary_table(summary, max_rows=self.max_rows, width=width)
        self._print(Group(table, Text(wrap_notes(summary_notes(summary), width))))

    # ------------------------------------------------------------------------------- output

    @property
    def _unicode(self) -> bool:
        return self.console.encoding.lower().replace("-", "").startswith("utf")

    def _print(self, renderable: Any) -> None:
        """Print as laid out here: rich adds no line breaks (it would cut names and numbers)."""
        tqdm_write = _active_tqdm_write()
        if tqdm_write is None:
            with _broken_pipe_raises(self.console):
                self.console.print(renderable, soft_wrap=True)
            return
        with self.console.capture() as capture:
            self.console.print(renderable, soft_wrap=True)
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
