"""gradwatch: see and control your PyTorch gradients.

Per-parameter gradient norms, NaN/Inf detection with the parameter it started in, spike detection
against the run's own history, clipping and step skipping, and reports people read.
"""

from gradwatch._version import __version__
from gradwatch.act.adaptive import ClipPercentile, ClipUnitwise, ClipZScore
from gradwatch.act.clip import ClipNorm, Clipper, ClipValue
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
from gradwatch.watch import GradWatch

__all__ = [
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
    "LayerSummary",
    "NonFiniteGradientError",
    "ParamNorms",
    "RunStart",
    "RunSummary",
    "Sink",
    "SpikeDetector",
    "StateError",
    "StepReport",
    "__version__",
]
