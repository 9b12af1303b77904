"""Which layer a parameter belongs to, from its name alone.

Used wherever parameters are grouped into layers (statistics, health, plots, the run log's
reader), so every part of gradwatch groups them the same way. Imports nothing: the report CLI
uses it without loading torch.
"""

from __future__ import annotations

__all__ = ["layer_of"]


def layer_of(name: str, depth: int | None = None) -> str:
    """The layer a parameter belongs to: its owning module, or its first ``depth`` name parts.

    ``layer_of("encoder.layers.3.attn.q.weight")`` is ``"encoder.layers.3.attn.q"``;
    with ``depth=3`` it is ``"encoder.layers.3"``. A top-level parameter is its own layer.
    """
    parts = name.split(".")
    owner = parts[:-1] or parts
    if depth is not None:
        owner = owner[:depth]
    return ".".join(owner)
