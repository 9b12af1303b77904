"""Diagnosis: what went wrong in a run, why, where it started, and what to change.

:func:`diagnose` runs every rule of :data:`RULES` over a
:class:`~gradwatch.detect.health.HealthReport` (plain numpy data, no torch) and returns
:class:`~gradwatch.records.Finding` records, most causal first: errors before warnings before
information, and within a severity the earliest first. The first ``"error"`` or ``"warning"``
finding is *the* diagnosis.

The evidence is read on three axes, as an engineer reads it:

* **time** (:mod:`~gradwatch.diagnosis.trend`): the trajectory of the global norm and the loss —
  one outlier out of steady steps (the data), growth over several steps (the learning rate);
* **depth** (:mod:`~gradwatch.diagnosis.depth`): growth or decay through the layers at the first
  step and over the run, gradients relative to the weights;
* **place** (:mod:`~gradwatch.diagnosis.incident`): the module, the loss or the input where a
  NaN/Inf first appeared, forward or backward, and the dtype's range.

Each rule is ``rule(run: Run) -> list[Finding]`` (:mod:`~gradwatch.diagnosis.context`); the
wording shared with the live alerts is in :mod:`~gradwatch.diagnosis.wording`; the standing
advice per cause in :mod:`~gradwatch.diagnosis.remedies`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gradwatch.detect.health_report import HealthReport
from gradwatch.diagnosis.context import Run
from gradwatch.diagnosis.rules_incidents import (
    divergence_finding,
    incident_finding,
    loss_spike_finding,
    scaler_finding,
    spike_finding,
)
from gradwatch.diagnosis.rules_layers import (
    bias_before_norm_finding,
    dead_findings,
    explosion_finding,
    vanishing_finding,
)
from gradwatch.records import Finding

__all__ = ["RULES", "Run", "diagnose", "probable_cause"]

Rule = Callable[[Run], list[Finding]]

RULES: tuple[Rule, ...] = (
    incident_finding,
    explosion_finding,
    divergence_finding,
    vanishing_finding,
    spike_finding,
    loss_spike_finding,
    scaler_finding,
    dead_findings,
    bias_before_norm_finding,
)
"""Every rule, in causal order: incidents and their causes first, symptoms and benign notes last."""

_SEVERITY = {"error": 0, "warning": 1, "info": 2}


def diagnose(health: HealthReport, *, clip: Mapping[str, Any] | None = None) -> list[Finding]:
    """Every finding of the run, most causal first.

    Args:
        health: What the watcher's health detector accumulated.
        clip: The run's clipper settings (``clipper.config()``), or None: a clipped run is not
            told to add clipping.
    """
    run = Run(health, clip)
    found = [(rank, f) for rank, rule in enumerate(RULES) for f in rule(run)]
    found.sort(key=lambda pair: (_SEVERITY[pair[1].severity], pair[0]))
    return [f for _, f in found]


def probable_cause(health: HealthReport, *, clip: Mapping[str, Any] | None = None) -> str | None:
    """The cause of the run's first error or warning so far, for a live alert (None: none)."""
    for finding in diagnose(health, clip=clip):
        if finding.severity != "info":
            return finding.cause
    return None
