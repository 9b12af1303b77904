"""Wording shared by alerts and findings, so a number or a place reads the same everywhere.

Numbers: :func:`num` (3 significant digits, ``inf``/``nan`` in lower case) and :func:`times`
(``×2.34``). Places: :func:`names_list` quotes names (a numeric layer name such as ``4`` must not
read as a number), :func:`where` says which module a NaN/Inf came from in one clause.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradwatch.detect.health_report import INPUT, NonFiniteOrigin

__all__ = ["names_list", "num", "plural", "shape", "times", "where"]


def num(value: float | None) -> str:
    """``1.5e+04``, ``0.25``, ``inf``, ``nan`` or ``n/a``."""
    if value is None:
        return "n/a"
    return f"{value:.3g}" if math.isfinite(value) else str(value).lower()


def times(value: float | None) -> str:
    """A growth factor: ``×2.34``, ``×1.2e+03``."""
    return "×?" if value is None else f"×{value:.3g}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def names_list(names: Sequence[str], limit: int = 4) -> str:
    """```a`, `b` and 3 more``."""
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def shape(dims: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in dims) + ("," if len(dims) == 1 else "") + ")"


def where(origin: NonFiniteOrigin) -> tuple[str, str]:
    """The place a step's NaN/Inf came from, as ``(name, clause)``.

    The name is what a finding's ``params`` starts with: ``"input"``, a module, ``"loss"``, the
    first non-finite parameter of a finite forward pass, or ``""`` when the forward pass made it
    but forensics is off (the first parameter reached is then a victim, not the source).
    """
    if origin.first_activation == INPUT:
        return "input", "the model's input already held NaN/Inf"
    if origin.first_activation is not None:
        return _first_module(
            origin.first_activation,
            origin.first_activation_type,
            "the output of {module} was the first to go non-finite in the forward pass",
        )
    loss_bad = origin.loss is not None and not math.isfinite(origin.loss)
    if loss_bad and (origin.forensics or origin.count == 0):
        finite = (
            "every module's output was finite" if origin.forensics else "the gradients were finite"
        )
        return (
            "loss",
            f"the loss was {num(origin.loss)} while {finite}: the loss computation made it",
        )
    if origin.first_signal is not None:
        return _first_module(
            origin.first_signal,
            origin.first_signal_type,
            "the forward pass was finite; the gradient of {module}'s output was the first to go "
            "non-finite in backward",
        )
    what = "NaN" if origin.value == "NaN" else "Inf"
    at = f"`{origin.param}` ({origin.module_type} `{origin.module}`, shape {shape(origin.shape)})"
    if loss_bad:  # the forward pass made it; the first parameter reached is only a victim
        return (
            "",
            f"the loss was already {num(origin.loss)}, so the forward pass made it ({what} "
            f"then reached {at} first in backward); forensics=True names the module",
        )
    if origin.stage == "backward":
        return (
            origin.param or "",
            f"the loss was finite ({num(origin.loss)}); {what} first reached {at} in backward",
        )
    return origin.param or "", f"{what} first reached {at}"


def _first_module(name: str, module_type: str | None, sentence: str) -> tuple[str, str]:
    """``(name, sentence)``, the module quoted in ``sentence``'s ``{module}`` with its type."""
    kind = f" ({module_type})" if module_type else ""
    return name, sentence.format(module=f"`{name}`{kind}")
