"""The diagnosis zoo (benchmarks/diagnosis_zoo.py) as tests: each fast scenario is diagnosed right.

Every scenario is first validated with torch alone (its failure, or its health, really happened);
then gradwatch's diagnosis of the same run must name the expected cause and place, and a healthy
run must raise no error/warning finding and no alarm event. ``benchmarks/diagnosis.py`` runs
every scenario, slow ones included, and prints the table.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import gradwatch as gw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import diagnosis_zoo as zoo

KNOWN_WRONG: dict[str, str] = {}
"""Scenarios the diagnosis still gets wrong, and why: strict, so a fix must remove its line."""
FAST = [sc for sc in zoo.SCENARIOS if sc.fast]
FAST_JUDGED = [
    pytest.param(
        sc,
        id=sc.name,
        marks=pytest.mark.xfail(strict=True, reason=KNOWN_WRONG[sc.name])
        if sc.name in KNOWN_WRONG
        else (),
    )
    for sc in FAST
]
EVERY = [
    pytest.param(sc, id=sc.name, marks=() if sc.fast else pytest.mark.slow) for sc in zoo.SCENARIOS
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # the scenarios are tiny: one thread is faster and the same on every machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _validate(name: str) -> str:
    return next(sc for sc in zoo.SCENARIOS if sc.name == name).validate()


def _validated(sc: zoo.Scenario) -> str:
    """Each scenario is validated once per session (the two tests share the result)."""
    return _validate(sc.name)


def _said(out: zoo.Outcome) -> str:
    findings = "; ".join(
        f"{f.severity} {f.kind}/{f.cause} at {list(f.params[:2])} step {f.first_step}"
        for f in out.findings
    )
    events = ", ".join(f"{e.kind}@{e.step}:{e.cause}" for e in out.alarms[:6])
    return f"findings [{findings or 'none'}]; alarms [{events or 'none'}]"


def test_zoo_covers_every_cause_and_enough_healthy_runs() -> None:
    names = [sc.name for sc in zoo.SCENARIOS]
    assert len(names) == len(set(names))
    assert len(zoo.SCENARIOS) >= 24
    per_cause = Counter(sc.expected_cause for sc in zoo.SCENARIOS)
    assert set(per_cause) - {None} <= set(gw.CAUSES)
    for cause in gw.CAUSES:
        if cause != "unknown":
            assert per_cause[cause] >= 2, cause
    assert per_cause[None] >= 6
    # built differently: each cause on at least two architectures or optimizers
    for cause in set(per_cause) - {None}:
        runs = [sc for sc in zoo.SCENARIOS if sc.expected_cause == cause]
        assert len({(sc.arch, sc.optimizer) for sc in runs}) == len(runs), cause
    # the fix checks the issue asks for
    with_fix = {sc.name: sc.fix for sc in zoo.SCENARIOS if sc.fix}
    assert "max_norm" in with_fix["data_outlier_x1000"]
    assert with_fix["lr_mlp_sgd_high"] == ("lr",) and with_fix["lr_gpt_adamw_0.3"] == ("lr",)
    assert "max_norm" in with_fix["rnn_relu_1.25I_50steps"]


@pytest.mark.parametrize("sc", EVERY)
def test_scenario_really_fails_as_built(sc: zoo.Scenario) -> None:
    # torch alone: the failure (or the health) is real, else the scenario measures nothing
    assert _validated(sc)


@pytest.mark.parametrize("sc", FAST_JUDGED)
def test_scenario_is_diagnosed_right(sc: zoo.Scenario) -> None:
    _validated(sc)  # raises Invalid if torch alone does not see the failure
    out = sc.run()
    verdict = zoo.judge(sc, out)
    assert verdict.right, f"{sc.name}: {verdict.why}; {_said(out)}"
    if sc.expected_cause in (None, "redundant_bias"):
        assert not [f for f in out.findings if f.severity in ("error", "warning")]
        assert not out.alarms
    else:
        assert out.diagnosis is not None and out.diagnosis.cause == sc.expected_cause
        if sc.expected_places is not None:
            assert out.diagnosis.params[0] in sc.expected_places
        # said live: the first alarm states the same cause
        assert out.alarms, f"{sc.name}: no alarm during the run"
        assert out.alarms[0].cause == sc.expected_cause, _said(out)


def test_judge_reads_the_first_error_or_warning_finding() -> None:
    sc = next(s for s in zoo.SCENARIOS if s.name == "data_outlier_x1000")
    info = gw.Finding("bias_before_norm", ("0.bias",), "", cause="redundant_bias", severity="info")
    right = gw.Finding("spike", ("0.weight",), "", cause="data", severity="error")
    wrong = gw.Finding("divergence", ("0.weight",), "", cause="learning_rate", severity="warning")
    trace = zoo.Trace()
    assert zoo.judge(sc, zoo.Outcome([info, right, wrong], [], trace, 0.0)).right
    assert not zoo.judge(sc, zoo.Outcome([info, wrong, right], [], trace, 0.0)).right
    assert not zoo.judge(sc, zoo.Outcome([info], [], trace, 0.0)).right
    healthy = next(s for s in zoo.SCENARIOS if s.expected_cause is None)
    spike = gw.Event(3, "spike", "gradient norm spike")
    assert zoo.judge(healthy, zoo.Outcome([info], [], trace, 0.0)).right
    assert not zoo.judge(healthy, zoo.Outcome([], [spike], trace, 0.0)).right
    skip = gw.Event(3, "skip", "step skipped")
    assert zoo.judge(healthy, zoo.Outcome([], [skip], trace, 0.0)).right
