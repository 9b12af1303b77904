"""The JSONL run log's values and records: encoded, and decoded with their types checked.

Shared by the writer (:class:`~gradwatch.report.jsonl.JsonlSink`) and the reader
(:func:`~gradwatch.report.runlog.read_run`); the format itself is described in
:mod:`gradwatch.report.jsonl`. Decoding never guesses: a field of the wrong type raises
:class:`LogFieldError` naming it, and the reader skips that line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from gradwatch.errors import GradWatchError
from gradwatch.records import Event, Finding, LayerSummary, RunSummary

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LogFieldError",
    "decode_event",
    "decode_float",
    "decode_summary",
    "encode_value",
    "expect",
    "show_value",
]

FORMAT = "gradwatch.jsonl"
"""Value of the header's ``format`` key; how a reader recognises a gradwatch run log."""

FORMAT_VERSION = 1
"""Version of the record layout described in this module's docstring."""

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_value(value: Any) -> Any:
    """``value`` made JSON-safe: non-finite floats as strings, tuples as lists, numpy as Python.

    Used for the low-volume records (header, events, summary); step records are formatted directly.
    """
    if isinstance(value, float | np.floating):
        number = float(value)
        if math.isfinite(number):
            return number
        return "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [encode_value(v) for v in value]
    return str(value)


def decode_float(value: Any) -> float:
    """A number read from a log: a JSON number, ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` or null.

    null (a parameter without a gradient, a missing value) becomes NaN.

    Raises:
        ValueError: ``value`` is none of these (another string, a list, a boolean).
    """
    if value is None:
        return math.nan
    if not _is_number(value):
        raise ValueError(f"expected {_KINDS['number'][1]}, got {show_value(value)}")
    return _NONFINITE[value] if isinstance(value, str) else float(value)


class LogFieldError(GradWatchError, ValueError):
    """A record of a run log lacks a field it needs, or holds a value of the wrong type there.

    Raised by the ``decode_*`` functions and the reader; the message names the field (nested
    fields as ``layers[2].steps``) and says what it must be, e.g. ``field 'step' must be an
    integer, got "x"``.
    """


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, str):
        return value in _NONFINITE
    return _is_int(value) or isinstance(value, float)


Kind = Literal["int", "number", "flag", "text", "list", "object"]
"""What a field of the format holds; :func:`expect` checks it."""

_KINDS: dict[Kind, tuple[Any, str, str]] = {
    "int": (_is_int, "an integer", "integers"),
    "number": (_is_number, 'a number, "NaN", "Infinity", "-Infinity" or null', "numbers or null"),
    "flag": (lambda v: isinstance(v, bool), "true or false", "booleans"),
    "text": (lambda v: isinstance(v, str), "a string", "strings"),
    "list": (lambda v: isinstance(v, list), "a list", "lists"),
    "object": (lambda v: isinstance(v, dict), "a JSON object", "JSON objects"),
}
"""Value kinds of the format: (test, "must be ...", "a list of ..."). ``None`` is null."""


def show_value(value: Any) -> str:
    """``value`` as JSON for an error message, cut at 40 characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def expect(
    record: Mapping[str, Any],
    key: str,
    kind: Kind,
    *,
    required: bool = False,
    items: Kind | None = None,
    where: str = "",
) -> Any:
    """``record[key]`` if it is of ``kind`` (a list of ``items`` if given); None if absent or null.

    Args:
        record: A decoded JSON object.
        key: The field.
        kind: ``"int"``, ``"number"``, ``"flag"``, ``"text"``, ``"list"`` or ``"object"``.
        required: Absent or null is an error, not None.
        items: For a list, the kind of every element (``"number"`` elements may be null).
        where: Where ``record`` sits inside the line's record, for the message (``"layers[2]"``).

    Raises:
        LogFieldError: The field is missing although required, or is of another kind.
    """
    value = record.get(key)
    name = f"{where}.{key}" if where else key
    if value is None:
        if required:
            raise LogFieldError(
                f"field {name!r} is missing"
                if key not in record
                else f"field {name!r} must be {_KINDS[kind][1]}, got null"
            )
        return None
    test, what, _ = _KINDS[kind]
    if items is not None:
        item_test, _, plural = _KINDS[items]
        what = f"a list of {plural}"
        ok = isinstance(value, list) and all(
            item_test(v) or (v is None and items == "number") for v in value
        )
    else:
        ok = test(value)
    if not ok:
        raise LogFieldError(f"field {name!r} must be {what}, got {show_value(value)}")
    return value


def decode_event(record: Mapping[str, Any]) -> Event:
    """The :class:`~gradwatch.records.Event` of an ``event`` record.

    A non-finite event's label (``"NaN"``/``"Inf"``) is ``data["what"]``; in older logs it was
    ``data["value"]``, which is renamed here, so readers look in one place whatever wrote the log.

    Raises:
        LogFieldError: A field is missing or of the wrong type (``step``, ``kind`` are required).
    """
    kind = expect(record, "kind", "text", required=True)
    data = dict(expect(record, "data", "object") or {})
    if kind == "nonfinite" and "what" not in data and isinstance(data.get("value"), str):
        data["what"] = data.pop("value")
    return Event(
        step=expect(record, "step", "int", required=True),
        kind=kind,
        message=expect(record, "message", "text") or "",
        params=tuple(expect(record, "params", "list", items="text") or ()),
        data=data,
        cause=expect(record, "cause", "text"),
    )


_LAYER_FLOATS = ("min", "mean", "max", "last")
_LAYER_COUNTS = ("steps", "nonfinite_steps", "spike_culprit")
_SUMMARY_FLOATS = ("global_min", "global_mean", "global_max", "global_last")
_SUMMARY_COUNTS = ("clipped_steps", "spikes", "loss_spikes", "nonfinite_steps", "skipped_steps")


def decode_summary(record: Mapping[str, Any]) -> RunSummary:
    """The :class:`~gradwatch.records.RunSummary` of a ``summary`` record.

    Raises:
        LogFieldError: A field is missing (``steps``, each layer's ``name``, each finding's
            ``kind``) or of the wrong type.
    """
    layers = []
    for i, layer in enumerate(expect(record, "layers", "list", items="object") or ()):
        where = f"layers[{i}]"
        layers.append(
            LayerSummary(
                name=expect(layer, "name", "text", required=True, where=where),
                **{k: decode_float(expect(layer, k, "number", where=where)) for k in _LAYER_FLOATS},
                **{k: expect(layer, k, "int", where=where) or 0 for k in _LAYER_COUNTS},
            )
        )
    findings = []
    for i, f in enumerate(expect(record, "findings", "list", items="object") or ()):
        where = f"findings[{i}]"
        suggested = expect(f, "suggested", "object", where=where) or {}
        findings.append(
            Finding(
                kind=expect(f, "kind", "text", required=True, where=where),
                params=tuple(expect(f, "params", "list", items="text", where=where) or ()),
                evidence=expect(f, "evidence", "text", where=where) or "",
                remedies=tuple(expect(f, "remedies", "list", items="text", where=where) or ()),
                suggested={
                    k: decode_float(expect(suggested, k, "number", where=f"{where}.suggested"))
                    for k in suggested
                },
                cause=expect(f, "cause", "text", where=where) or "unknown",
                severity=expect(f, "severity", "text", where=where) or "warning",
                first_step=expect(f, "first_step", "int", where=where),
                data=dict(expect(f, "data", "object", where=where) or {}),
            )
        )
    origins = []
    for i, origin in enumerate(expect(record, "nonfinite_origins", "list", items="list") or ()):
        if len(origin) != 2 or not _is_int(origin[0]) or not isinstance(origin[1], str):
            raise LogFieldError(
                f"field 'nonfinite_origins[{i}]' must be [step, parameter name], "
                f"got {show_value(origin)}"
            )
        origins.append((origin[0], origin[1]))
    return RunSummary(
        steps=expect(record, "steps", "int", required=True),
        first_step=expect(record, "first_step", "int"),
        last_step=expect(record, "last_step", "int"),
        **{k: decode_float(expect(record, k, "number")) for k in _SUMMARY_FLOATS},
        **{k: expect(record, k, "int") or 0 for k in _SUMMARY_COUNTS},
        layers=tuple(layers),
        nonfinite_origins=tuple(origins),
        findings=tuple(findings),
    )
