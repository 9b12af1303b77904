"""The sink interface and safe fan-out of records to sinks.

A sink receives every record (:class:`~gradwatch.records.RunStart`, each
:class:`~gradwatch.records.StepReport`, each :class:`~gradwatch.records.Event`, and the final
:class:`~gradwatch.records.RunSummary`) through one method, ``write``. A sink that reports every
N steps is a :class:`~gradwatch.report.windowed.WindowedSink`: it writes only "render this
window", the windowing lives there.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence

from gradwatch.errors import GradWatchWarning
from gradwatch.records import Record

__all__ = ["NEVER", "Sink", "SinkGroup", "window_due"]


class Sink:
    """Base class of every sink. Subclass it and implement :meth:`write`.

    Example, a sink that keeps the loss of every step (a sink showing windows of steps
    subclasses :class:`~gradwatch.report.windowed.WindowedSink` instead)::

        class LossSink(gradwatch.Sink):
            def __init__(self):
                self.losses = []
            def write(self, record):
                if isinstance(record, gradwatch.StepReport):
                    self.losses.append(record.loss)
    """

    def write(self, record: Record) -> None:
        """Receive one record. Called on the training thread: keep it cheap."""
        raise NotImplementedError

    def join(self, sinks: Sequence[Sink]) -> None:
        """Meet the other sinks of the watcher (this one included), once, before any record.

        A sink can leave to another what that one shows already (default: nothing).
        """

    def next_due(self, step: int) -> int:
        """The first step after ``step`` that this sink needs as soon as it is computed.

        Records always arrive in order and events (NaN/Inf, spikes, skipped steps) always at
        once; the steps in between may reach a sink in batches of up to 32, which makes
        monitoring cheaper. A sink that shows or stores something every N steps returns the step
        its next output covers; one that wants every step at once (the default, e.g. to lose
        nothing if the process is killed) returns ``step + 1``; one that never needs a step
        early (a background writer) returns :data:`NEVER`.

        Args:
            step: The last step this sink has received.
        """
        return step + 1

    def close(self) -> None:
        """Release resources (files, writers). Called once, after the final summary."""


NEVER = sys.maxsize
"""What :meth:`Sink.next_due` returns for a sink that never needs a step early."""


def window_due(step: int, every: int, filled: int) -> int:
    """:meth:`Sink.next_due` of a sink writing one line per window of ``every`` steps.

    Args:
        step: The last step the sink has received.
        every: Steps per window (0: the sink writes no periodic line, so never).
        filled: Steps already in the current window.
    """
    return NEVER if not every else step + every - filled


class SinkGroup:
    """Fans records out to sinks; a sink that raises is disabled with one warning, never fatal.

    A diagnostics tool must not kill the run it is diagnosing: if a sink fails (disk full, broken
    pipe, a tracker's network error), the others go on and training continues. ``SystemExit``
    from a sink counts as a failure too (rich's console raises it on a broken pipe). A
    ``KeyboardInterrupt`` is the user's: the record still reaches the other sinks, then it
    propagates. A disabled sink is closed at once (errors ignored) to release its file.
    """

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks: list[Sink] = list(sinks)
        self.disabled: list[tuple[Sink, BaseException]] = []
        everyone = tuple(self.sinks)
        self._each(lambda sink: getattr(sink, "join", _ignore)(everyone), close_failed=True)

    def write(self, record: Record) -> None:
        self._each(lambda sink: sink.write(record), close_failed=True)

    def next_due(self, step: int) -> int:
        """The earliest :meth:`Sink.next_due` over the sinks (:data:`NEVER` without sinks)."""
        dues = [NEVER]

        def ask(sink: Sink) -> None:
            next_due = getattr(sink, "next_due", None)  # duck-typed sinks: every step
            dues.append(step + 1 if next_due is None else int(next_due(step)))

        self._each(ask, close_failed=True)
        return min(dues)

    def close(self) -> None:
        self._each(lambda sink: getattr(sink, "close", _nothing)(), close_failed=False)

    def _each(self, call: Callable[[Sink], object], *, close_failed: bool) -> None:
        interrupt: KeyboardInterrupt | None = None
        for sink in tuple(self.sinks):
            try:
                call(sink)
            except (Exception, SystemExit) as err:
                self._disable(sink, err)
                if close_failed:
                    with contextlib.suppress(Exception, SystemExit):
                        getattr(sink, "close", _nothing)()
            except KeyboardInterrupt as err:
                interrupt = interrupt or err
        if interrupt is not None:
            raise interrupt

    def _disable(self, sink: Sink, err: BaseException) -> None:
        self.sinks.remove(sink)
        self.disabled.append((sink, err))
        cause = f"{type(err).__name__}: {err}"
        if isinstance(err, SystemExit) and err.__context__ is not None:  # e.g. rich on EPIPE
            cause += f" after {type(err.__context__).__name__}: {err.__context__}"
        warnings.warn(
            f"gradwatch: sink {type(sink).__name__} failed and was disabled "
            f"({cause}); training and the other sinks continue",
            GradWatchWarning,
            stacklevel=_outside_gradwatch(),
        )


_TORCH_OPTIM = f"{os.sep}torch{os.sep}optim{os.sep}"


def _outside_gradwatch() -> int:
    """``stacklevel`` of the nearest caller outside gradwatch, for the caller of ``_disable``.

    Frames of torch's optimizers are skipped too: an attached watcher checks from their step
    hook, and the warning belongs to the loop that called ``optimizer.step()``.
    """
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1  # level 1 is _disable itself
    while frame is not None and (
        frame.f_code.co_filename.startswith(package) or _TORCH_OPTIM in frame.f_code.co_filename
    ):
        frame, level = frame.f_back, level + 1
    return level


def _nothing() -> None:
    """Stands in for the ``close`` of a sink that has none."""


def _ignore(sinks: Sequence[Sink]) -> None:
    """Stands in for the ``join`` of a duck-typed sink that has none."""
