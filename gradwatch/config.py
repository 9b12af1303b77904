"""Policy names and the argument checks shared by every module.

Every public argument goes through one of these helpers so that all error messages have one shape:
the argument's name, the value received and what would be valid.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from gradwatch.errors import ConfigError, ConfigTypeError

__all__ = [
    "NonFinitePolicy",
    "SpikePolicy",
    "check_choice",
    "check_int",
    "check_norm_type",
    "check_positive",
    "check_probability",
]

NonFinitePolicy = Literal["warn", "skip", "raise"]
"""What to do when a gradient holds NaN/Inf: report only, skip the optimizer step, or raise."""

SpikePolicy = Literal["warn", "clip", "skip", "raise"]
"""On a gradient-norm spike: report, rescale to the detector's threshold, skip, or raise."""

NONFINITE_POLICIES: tuple[str, ...] = get_args(NonFinitePolicy)
SPIKE_POLICIES: tuple[str, ...] = get_args(SpikePolicy)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float if it is a finite number > 0 (or >= 0), else raise."""
    bound = ">= 0" if allow_zero else "> 0"
    if not _is_number(value):
        raise ConfigTypeError(f"{name} must be a finite number {bound}, got {value!r}")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return number


def check_probability(name: str, value: object) -> float:
    """Return ``value`` as a float if it lies strictly between 0 and 1, else raise."""
    if not _is_number(value):
        raise ConfigTypeError(f"{name} must be a number in (0, 1), got {value!r}")
    number = float(value)  # type: ignore[arg-type]
    if not 0.0 < number < 1.0:
        raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}")
    return number


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigTypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_norm_type(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a valid p-norm order (> 0, or ``inf``), else raise."""
    if isinstance(value, str) and value.lower() == "inf":
        return math.inf
    if not _is_number(value):
        raise ConfigTypeError(f"{name} must be a number > 0 or float('inf'), got {value!r}")
    number = float(value)  # type: ignore[arg-type]
    if math.isnan(number) or number <= 0:
        raise ConfigError(f"{name} must be a number > 0 or float('inf'), got {value!r}")
    return number


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming all of them."""
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{name} must be one of {valid}, got {value!r}")
    return value
