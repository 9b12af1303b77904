"""Policy names and the argument checks shared by every module (validation of user input).

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
    "check_bool",
    "check_choice",
    "check_instance",
    "check_int",
    "check_norm_type",
    "check_positive",
    "check_probability",
    "check_rank",
    "check_sinks",
    "resolve_norm_type",
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


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is ``True`` or ``False``, else raise."""
    if not isinstance(value, bool):
        raise ConfigTypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_rank(name: str, value: object) -> int | None:
    """Return ``value`` if it is None or a process rank (an int >= 0), else raise."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ConfigTypeError(f"{name} must be an int >= 0 or None, got {value!r}")
    return value


def check_instance(name: str, value: object, cls: type) -> None:
    """Raise unless ``value`` is None or an instance of ``cls`` (a part the caller may replace)."""
    if value is not None and not isinstance(value, cls):
        raise ConfigTypeError(
            f"{name} must be a {cls.__name__} or None, got {type(value).__name__}"
        )


def check_sinks(name: str, sinks: object) -> None:
    """Raise unless ``sinks`` is a list or tuple of sink instances (objects with ``write``)."""
    if not isinstance(sinks, (list, tuple)):
        raise ConfigTypeError(f"{name} must be a list of sinks or None, got {type(sinks).__name__}")
    for i, sink in enumerate(sinks):
        if isinstance(sink, type):
            raise ConfigTypeError(
                f"{name}[{i}] must be a sink instance, got the class {sink.__name__}; "
                f"create an instance: {sink.__name__}(...)"
            )
        if not callable(getattr(sink, "write", None)):
            raise ConfigTypeError(
                f"{name}[{i}] must have a write(record) method (subclass gradwatch.Sink), "
                f"got {type(sink).__name__}"
            )


def resolve_norm_type(norm_type: object, clip_norm_type: float | None) -> float:
    """The global norm's order: ``norm_type``, else the clipper's, else 2; the two must agree.

    Args:
        norm_type: The order asked for, or None.
        clip_norm_type: The clipper's order, or None (no clipper, or one without a norm).

    Raises:
        ConfigError: Both are given and differ.
    """
    if norm_type is None:
        norm_type = clip_norm_type if clip_norm_type is not None else 2.0
    number = check_norm_type("norm_type", norm_type)
    if clip_norm_type is not None and clip_norm_type != number:
        raise ConfigError(
            f"norm_type={norm_type!r} differs from the clipper's norm_type={clip_norm_type!r}; "
            "give one norm_type (the clipper's is used when norm_type is left out)"
        )
    return number
