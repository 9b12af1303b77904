"""The exception and warning hierarchy.

Every error gradwatch raises derives from :class:`GradWatchError`. Configuration errors also derive
from the matching builtin (``ValueError``/``TypeError``) so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "GradWatchError",
    "GradWatchWarning",
    "GradientSpikeError",
    "NonFiniteGradientError",
    "StateError",
]


class GradWatchError(Exception):
    """Root of every exception raised by gradwatch."""


class ConfigError(GradWatchError, ValueError):
    """An argument has a value gradwatch cannot work with."""


class ConfigTypeError(GradWatchError, TypeError):
    """An argument has the wrong type."""


class StateError(GradWatchError, RuntimeError):
    """A call is not valid in the watcher's current state (e.g. ``check()`` after ``close()``)."""


class NonFiniteGradientError(GradWatchError, FloatingPointError):
    """Raised by ``on_nonfinite="raise"`` when a gradient holds NaN or Inf.

    Attributes:
        step: The optimizer step at which it happened.
        params: Names of the parameters with non-finite gradients, first in backward order first.
    """

    def __init__(self, message: str, *, step: int, params: tuple[str, ...]) -> None:
        super().__init__(message)
        self.step = step
        self.params = params


class GradientSpikeError(GradWatchError, ArithmeticError):
    """Raised by ``on_spike="raise"`` when the global gradient norm is an outlier.

    Attributes:
        step: The optimizer step at which it happened.
        global_norm: The norm that triggered the detector.
        threshold: The detector's threshold at that step.
    """

    def __init__(self, message: str, *, step: int, global_norm: float, threshold: float) -> None:
        super().__init__(message)
        self.step = step
        self.global_norm = global_norm
        self.threshold = threshold


class GradWatchWarning(UserWarning):
    """Warnings gradwatch emits about itself (e.g. a sink disabled after it failed)."""
