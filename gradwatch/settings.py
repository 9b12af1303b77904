"""How a :class:`~gradwatch.GradWatch` was configured: checked once, fixed for the run.

The watcher's parts (collector, clipper, policy, emission) are built from these values, so changing
one later would leave them disagreeing: the settings are a frozen record, readable as
``watch.settings``, and the same values go into the run log's header (:meth:`WatchSettings.config`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from gradwatch._version import __version__
from gradwatch.act.clip import Clipper
from gradwatch.collect.norms import GradAttr, resolve_grad_attr
from gradwatch.collect.pipeline import resolve_pipeline_group
from gradwatch.errors import ConfigError, ConfigTypeError
from gradwatch.records import ParamInfo, RunStart
from gradwatch.validation import (
    NONFINITE_POLICIES,
    SPIKE_POLICIES,
    NonFinitePolicy,
    SpikePolicy,
    check_bool,
    check_choice,
    check_int,
    check_rank,
    resolve_norm_type,
)

__all__ = ["WatchSettings", "check_state"]

STATE_KEYS = ("names", "step", "spike_detector", "loss_detector", "baseline", "clip")
"""Keys every ``GradWatch.state_dict()`` holds (``"health"`` is optional: older checkpoints)."""


@dataclass(frozen=True)
class WatchSettings:
    """The validated settings of a watcher; see :class:`~gradwatch.GradWatch` for each one.

    ``norm_type`` is resolved (the clipper's, else 2) and ``pipeline_group`` is the process
    group itself (a ``DeviceMesh`` given is turned into its group).

    Raises:
        TypeError, ValueError: A setting is invalid (the message names it).
    """

    clip: Clipper | None = None
    on_nonfinite: NonFinitePolicy = "warn"
    on_spike: SpikePolicy = "warn"
    norm_type: float = field(default=None)  # type: ignore[assignment]  # resolved on creation
    accumulation_steps: int = 1
    history: int = 256
    layer_depth: int | None = None
    log_rank: int | None = 0
    rank_blame: bool = False
    track_micro_batches: bool = False
    forensics: bool = False
    pipeline_group: Any = None
    grad_attr: GradAttr = "grad"

    def __post_init__(self) -> None:
        clip = self.clip
        if isinstance(clip, type):
            raise ConfigTypeError(
                f"clip must be a clipper instance such as {clip.__name__}(...), "
                f"got the class {clip.__name__}"
            )
        if clip is not None and not isinstance(clip, Clipper):
            raise ConfigTypeError(
                "clip must be a gradwatch clipper such as ClipNorm(1.0) or ClipValue(0.5), "
                f"or None; got {type(clip).__name__}"
            )
        checked = {
            "on_nonfinite": check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES),
            "on_spike": check_choice("on_spike", self.on_spike, SPIKE_POLICIES),
            "norm_type": resolve_norm_type(
                self.norm_type, clip.norm_type if clip is not None else None
            ),
            "accumulation_steps": check_int("accumulation_steps", self.accumulation_steps),
            "history": check_int("history", self.history),
            "log_rank": check_rank("log_rank", self.log_rank),
            "rank_blame": check_bool("rank_blame", self.rank_blame),
            "track_micro_batches": check_bool("track_micro_batches", self.track_micro_batches),
            "forensics": check_bool("forensics", self.forensics),
            "pipeline_group": resolve_pipeline_group("pipeline_group", self.pipeline_group),
            "grad_attr": resolve_grad_attr("grad_attr", self.grad_attr),
        }
        if self.layer_depth is not None:
            checked["layer_depth"] = check_int("layer_depth", self.layer_depth)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def skips(self) -> bool:
        """A policy may skip a step (buffers must then be kept to put back)."""
        return "skip" in (self.on_nonfinite, self.on_spike)

    @property
    def writes_coef(self) -> bool:
        """Something may rescale the gradients (the report's ``clip_coef`` is written)."""
        return self.clip is not None or self.on_spike == "clip"

    def run_start(self, params: tuple[ParamInfo, ...], spike_detector: Any) -> RunStart:
        """The run log's first record: versions, the reported parameters, the configuration."""
        config = self.config(spike_detector)
        return RunStart(__version__, torch.__version__, params, config, time.time())

    def config(self, spike_detector: Any) -> dict[str, Any]:
        """The configuration a run log's header records (JSON-ready)."""
        return {
            "clip": self.clip.config() if self.clip is not None else None,
            "on_nonfinite": self.on_nonfinite,
            "on_spike": self.on_spike,
            "norm_type": self.norm_type,
            "accumulation_steps": self.accumulation_steps,
            "layer_depth": self.layer_depth,
            "spike_detector": {
                "alpha": spike_detector.alpha,
                "z_threshold": spike_detector.z_threshold,
                "warmup": spike_detector.warmup,
            },
        }


def check_state(state: object, names: tuple[str, ...] | list[str]) -> None:
    """Raise unless ``state`` is a ``GradWatch.state_dict()`` of a watcher over ``names``."""
    if not isinstance(state, dict):
        raise ConfigTypeError(
            f"state must be a dict returned by GradWatch.state_dict(), got {type(state).__name__}"
        )
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise ConfigError(
            f"state is missing {', '.join(repr(k) for k in missing)}: pass what "
            "GradWatch.state_dict() returned"
        )
    if list(state["names"]) != list(names):
        raise ConfigError(
            "state was saved from a watcher over different parameters "
            f"({len(state['names'])} names vs {len(names)} here)"
        )
