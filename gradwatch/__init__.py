"""gradwatch: see and control your PyTorch gradients.

Per-parameter gradient norms, NaN/Inf detection with the parameter it started in, spike detection
against the run's own history, clipping and step skipping, and reports people read.

Importing the package is instant: each public name is imported from its module the first time it is
used (PEP 562), so ``gradwatch --help`` and ``gradwatch --version`` never load torch, and
``import gradwatch`` costs nothing until ``gradwatch.GradWatch`` (or any other name) is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradwatch._version import __version__

if TYPE_CHECKING:
    from gradwatch.act.adaptive import ClipPercentile, ClipZScore
    from gradwatch.act.clip import ClipNorm, Clipper, ClipValue
    from gradwatch.act.unitwise import ClipUnitwise
    from gradwatch.detect.health import HealthDetector
    from gradwatch.detect.spikes import SpikeDetector
    from gradwatch.errors import (
        ConfigError,
        GradientSpikeError,
        GradWatchError,
        GradWatchWarning,
        NonFiniteGradientError,
        StateError,
    )
    from gradwatch.records import (
        CAUSES,
        Event,
        Finding,
        LayerSummary,
        ParamNorms,
        RunStart,
        RunSummary,
        StepReport,
    )
    from gradwatch.report.console import ConsoleSink
    from gradwatch.report.jsonl import JsonlSink, RunLogExistsError
    from gradwatch.report.logging import LoggingSink
    from gradwatch.report.mlflow_sink import MLflowSink
    from gradwatch.report.runlog import RunLog, RunLogError, RunLogNotFoundError, read_run
    from gradwatch.report.sink import Sink
    from gradwatch.report.tensorboard import TensorBoardSink
    from gradwatch.report.wandb_sink import WandbSink
    from gradwatch.report.windowed import StepWindow, WindowedSink
    from gradwatch.settings import WatchSettings
    from gradwatch.step_result import StepResult
    from gradwatch.watch import GradWatch

_EXPORTS: dict[str, tuple[str, ...]] = {
    "gradwatch.act.adaptive": ("ClipPercentile", "ClipZScore"),
    "gradwatch.act.unitwise": ("ClipUnitwise",),
    "gradwatch.act.clip": ("ClipNorm", "Clipper", "ClipValue"),
    "gradwatch.detect.health": ("HealthDetector",),
    "gradwatch.detect.spikes": ("SpikeDetector",),
    "gradwatch.errors": (
        "ConfigError",
        "GradientSpikeError",
        "GradWatchError",
        "GradWatchWarning",
        "NonFiniteGradientError",
        "StateError",
    ),
    "gradwatch.records": (
        "CAUSES",
        "Event",
        "Finding",
        "LayerSummary",
        "ParamNorms",
        "RunStart",
        "RunSummary",
        "StepReport",
    ),
    "gradwatch.report.sink": ("Sink",),
    "gradwatch.report.console": ("ConsoleSink",),
    "gradwatch.report.jsonl": ("JsonlSink", "RunLogExistsError"),
    "gradwatch.report.logging": ("LoggingSink",),
    "gradwatch.report.mlflow_sink": ("MLflowSink",),
    "gradwatch.report.runlog": ("RunLog", "RunLogError", "RunLogNotFoundError", "read_run"),
    "gradwatch.report.tensorboard": ("TensorBoardSink",),
    "gradwatch.report.wandb_sink": ("WandbSink",),
    "gradwatch.report.windowed": ("StepWindow", "WindowedSink"),
    "gradwatch.settings": ("WatchSettings",),
    "gradwatch.step_result": ("StepResult",),
    "gradwatch.watch": ("GradWatch",),
}
"""The module each public name lives in; :func:`__getattr__` imports it on first use."""

_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "CAUSES",
    "ClipNorm",
    "ClipPercentile",
    "ClipUnitwise",
    "ClipValue",
    "ClipZScore",
    "Clipper",
    "ConfigError",
    "ConsoleSink",
    "Event",
    "Finding",
    "GradWatch",
    "GradWatchError",
    "GradWatchWarning",
    "GradientSpikeError",
    "HealthDetector",
    "JsonlSink",
    "LayerSummary",
    "LoggingSink",
    "MLflowSink",
    "NonFiniteGradientError",
    "ParamNorms",
    "RunLog",
    "RunLogError",
    "RunLogExistsError",
    "RunLogNotFoundError",
    "RunStart",
    "RunSummary",
    "Sink",
    "SpikeDetector",
    "StateError",
    "StepReport",
    "StepResult",
    "StepWindow",
    "TensorBoardSink",
    "WandbSink",
    "WatchSettings",
    "WindowedSink",
    "__version__",
    "read_run",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
