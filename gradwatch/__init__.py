"""gradwatch: see and control your PyTorch gradients.

Per-parameter gradient norms, NaN/Inf detection with the parameter it started in, spike detection
against the run's own history, clipping and step skipping, and reports people read.
"""

from gradwatch._version import __version__
from gradwatch.act.adaptive import ClipPercentile, ClipUnitwise, ClipZScore
from gradwatch.act.clip import ClipNorm, Clipper, ClipValue
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
from gradwatch.report.base import Sink
from gradwatch.report.console import ConsoleSink
from gradwatch.report.jsonl import JsonlSink, RunLogExistsError
from gradwatch.report.logging import LoggingSink
from gradwatch.report.runlog import RunLog, RunLogError, RunLogNotFoundError, read_run
from gradwatch.report.tensorboard import TensorBoardSink
from gradwatch.watch import GradWatch

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
    "TensorBoardSink",
    "__version__",
    "read_run",
]
