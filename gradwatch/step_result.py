"""What ``check()`` returns: the step's report, brought to the host when first read.

A check never waits for the device, so its numbers are not on the host yet when it returns (on CPU
they are at once; on an accelerator about a step later). :class:`StepResult` stands for the step's
:class:`~gradwatch.records.StepReport` until then: reading any field waits for that step's row and
reads the report. The report itself stays plain data; only this handle knows how to get it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradwatch.records import StepReport

__all__ = ["StepResult"]


class StepResult:
    """A checked step; reads as its :class:`~gradwatch.records.StepReport` (same attributes).

    Args:
        step: The step's index.
        wait: Brings the step's row to the host (and the report into :meth:`resolve`).
    """

    __slots__ = ("_report", "_wait", "step")

    def __init__(self, step: int, wait: Callable[[], None]) -> None:
        self.step = step
        self._wait: Callable[[], None] | None = wait
        self._report: StepReport | None = None

    def resolve(self, report: StepReport) -> None:
        """Called once, by the emission, with the finished report."""
        self._report = report
        self._wait = None

    @property
    def is_resolved(self) -> bool:
        """True once the numbers have been copied to the host."""
        return self._report is not None

    @property
    def report(self) -> StepReport:
        """The step's report (waits for the device if it is not on the host yet)."""
        if self._report is None:
            if self._wait is not None:
                self._wait()
            if self._report is None:
                raise RuntimeError(f"the report of step {self.step} was never emitted")
        return self._report

    def __getattr__(self, name: str) -> Any:  # only reached for names not on the handle
        return getattr(self.report, name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StepResult):
            other = other.report
        return self.report == other

    __hash__ = None  # type: ignore[assignment]  # as the report's

    def __repr__(self) -> str:
        if self._report is None:
            return f"StepResult(step={self.step}, pending)"
        return repr(self._report)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_identity, (self.report,))  # a pickled result is its report


def _identity(report: StepReport) -> StepReport:
    return report
