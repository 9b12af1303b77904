"""NaN/Inf are found, named (first in backward order first), and the policies act on them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import mlp

import gradwatch as gw


def _poison_hook(module: torch.nn.Module, value: float, when: list[bool]):
    """Forward hook making the gradient flowing into ``module``'s output non-finite."""

    def hook(mod, args, output):
        if when[0]:
            output.register_hook(lambda g: torch.full_like(g, value))
        return output

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_injected_fault_is_detected_and_named_at_its_step(value: float) -> None:
    model = mlp(depth=4)  # Linear layers at 0, 2, 4, 6 and head at 8
    poison = [False]
    _poison_hook(model[4], value, poison)
    watch = gw.GradWatch(model, sinks=[])
    reports = []
    for step in range(6):
        poison[0] = step == 3
        model.zero_grad()
        model(torch.randn(8, 8)).pow(2).mean().backward()
        reports.append(watch.check())
    clean = [r for r in reports if r.step != 3]
    assert all(r.nonfinite == () and math.isfinite(r.global_norm) for r in clean)
    bad = reports[3]
    # The poisoned gradient enters at layer 4's output: its weight/bias are hit first in backward
    # order, then everything upstream (layers 2 and 0). Layers 6 and 8 are downstream and clean.
    assert bad.nonfinite[0] in ("4.weight", "4.bias")
    assert set(bad.nonfinite) == {"4.weight", "4.bias", "2.weight", "2.bias", "0.weight", "0.bias"}
    assert bad.nonfinite.index("2.weight") > bad.nonfinite.index("4.weight")
    assert bad.nonfinite.index("0.weight") > bad.nonfinite.index("2.weight")
    assert not math.isfinite(bad.global_norm)


def test_nonfinite_names_follow_arrival_order_not_declaration_order() -> None:
    model = mlp(depth=2)
    watch = gw.GradWatch(model, sinks=[])
    model(torch.randn(4, 8)).sum().backward()
    for p in model.parameters():
        p.grad.fill_(math.nan)
    report = watch.check()
    # Backward reaches the head (declared last) first.
    assert report.nonfinite[0].startswith("4.")
    assert report.nonfinite[-1].startswith("0.")


def _train_with_fault(optimizer_cls, skip_via: str):
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = optimizer_cls(model.parameters())
    watch = gw.GradWatch(model, on_nonfinite="skip", sinks=[])
    if skip_via == "attach":
        watch.attach(opt)
    snapshots = {}
    for step in range(5):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        if step == 3:
            model[2].weight.grad[0, 0] = math.nan
            snapshots["weights"] = copy.deepcopy(model.state_dict())
            snapshots["optim"] = copy.deepcopy(opt.state_dict())
        if skip_via == "check":
            watch.check()
        opt.step()
        if step == 3:
            snapshots["after_weights"] = copy.deepcopy(model.state_dict())
            snapshots["after_optim"] = copy.deepcopy(opt.state_dict())
    watch.close()
    return watch, snapshots


def _assert_state_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_state_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_state_equal(x, y)
    else:
        assert a == b


@pytest.mark.parametrize(
    "optimizer_cls",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd-momentum", "adamw"],
)
@pytest.mark.parametrize("skip_via", ["attach", "check"])
def test_skip_leaves_weights_and_optimizer_state_bit_identical(optimizer_cls, skip_via) -> None:
    watch, snap = _train_with_fault(optimizer_cls, skip_via)
    _assert_state_equal(snap["weights"], snap["after_weights"])
    _assert_state_equal(snap["optim"], snap["after_optim"])
    reports = list(watch.history)
    assert [r.skipped for r in reports] == [False, False, False, True, False]
    assert reports[3].skip_reason == "non-finite gradient"
    assert reports[3].nonfinite == ("2.weight",)
    # Training resumed after the skip: the weights are finite.
    assert all(torch.isfinite(p).all() for p in watch._path.bound.watched.params)


def test_raise_names_parameters_and_step() -> None:
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, on_nonfinite="raise", sinks=[]).attach(opt)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    model(torch.randn(4, 8)).sum().backward()
    model[0].bias.grad[1] = math.inf
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(gw.NonFiniteGradientError, match=r"step 1 .*0\.bias") as info:
        opt.step()
    assert info.value.step == 1
    assert info.value.params == ("0.bias",)
    assert isinstance(info.value, gw.GradWatchError)
    _assert_state_equal(before, model.state_dict())
    assert watch.history[-1].nonfinite == ("0.bias",)


def test_nan_never_enters_running_statistics() -> None:
    model = mlp(depth=2)
    watch = gw.GradWatch(model, sinks=[])
    for step in range(40):
        model.zero_grad()
        model(torch.randn(8, 8)).pow(2).mean().backward()
        if step in (30, 31):
            model[0].weight.grad.fill_(math.nan)
        watch.check()
        if step == 29:
            before = watch.state_dict()["spike_detector"]
        if step == 31:
            # The two poisoned steps changed nothing in the detector's state.
            assert watch.state_dict()["spike_detector"] == before
    watch.flush()  # detectors see steps when they are emitted (in batches on the host)
    detector = watch.spike_detector
    assert math.isfinite(detector.mean) and math.isfinite(detector.var)
    assert detector.count == 38  # the two poisoned steps were not counted
    assert all(math.isfinite(v) for v in watch._emission.baseline.ema)
    summary = watch.close()
    assert summary.nonfinite_steps == 2
    assert math.isfinite(summary.global_mean) and math.isfinite(summary.global_max)
    assert all(math.isfinite(layer.max) for layer in summary.layers)


def test_global_norm_overflow_with_finite_parameters_is_reported() -> None:
    events = []

    class Collect(gw.Sink):
        def write(self, record) -> None:
            if isinstance(record, gw.Event):
                events.append(record)

    model = mlp(depth=2)
    watch = gw.GradWatch(model, sinks=[Collect()])
    model(torch.randn(4, 8)).sum().backward()
    for p in model.parameters():  # each norm 1.5e19 is finite; the sum of their squares is not
        p.grad.fill_(1.5e19 / math.sqrt(p.numel()))
    report = watch.check()
    assert report.nonfinite == () and math.isinf(report.global_norm)
    assert [e.kind for e in events] == ["nonfinite"]
    assert "overflowed" in events[0].message and "finite" in events[0].message
