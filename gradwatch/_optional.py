"""Lazy imports of optional integrations, with an install hint naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from gradwatch.errors import GradWatchError

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(GradWatchError, ImportError):
    """An optional dependency is needed for a feature and is not installed."""


def require(module: str, *, extra: str) -> ModuleType:
    """Import ``module``, or fail with the ``pip install "gradwatch[extra]"`` command that fixes it.

    Args:
        module: Dotted module name, e.g. ``"matplotlib.pyplot"``.
        extra: The gradwatch extra that installs it, e.g. ``"plot"``.

    Raises:
        MissingExtraError: The module cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{module!r} is required for this feature but is not installed; "
            f'install it with: pip install "gradwatch[{extra}]"'
        ) from err
