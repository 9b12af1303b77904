"""NaN/Inf provenance: forward or backward, which parameter and module, without anomaly mode.

Faults are injected at known places in small real models and must be found *and* named. The
forensics hooks must not read a device value on the host during a clean step.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_sync import count_host_reads
from torch import nn

import gradwatch as gw

GAIN = 2.34


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Events(gw.Sink):
    """Keeps every event."""

    def __init__(self) -> None:
        self.events: list[gw.Event] = []

    def write(self, record: object) -> None:
        if isinstance(record, gw.Event):
            self.events.append(record)


def chain(depth: int = 20, width: int = 4) -> nn.Sequential:
    """Equal Linear layers (gain 2.34 each, no biases) with ReLUs: the signal grows ×2.34/layer."""
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(width, width if i < depth - 1 else 1, bias=False)
        nn.init.constant_(linear.weight, GAIN / width)
        layers += [linear, nn.ReLU()] if i < depth - 1 else [linear]
    return nn.Sequential(*layers)


def _overflowing_loss(model: nn.Module) -> torch.Tensor:
    """A finite loss whose backward overflows: the signal grows ×2.34 per layer past 3.4e38."""
    x = torch.full((8, 4), GAIN**-20)
    return model(x).square().mean() * 1e35


def _first_inf_signal(model: nn.Sequential) -> str:
    """Reference: the first Linear (in backward order) whose output gradient holds Inf."""
    outputs = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            outputs[name] = output

        return hook

    handles = [
        m.register_forward_hook(keep(n))
        for n, m in model.named_children()
        if isinstance(m, nn.Linear)
    ]
    _overflowing_loss(model).backward()
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)
    bad = [n for n in sorted(outputs, key=int, reverse=True) if torch.isinf(outputs[n].grad).any()]
    return bad[0]


def test_anomaly_mode_misses_inf_in_backward_that_gradwatch_names() -> None:
    model = chain()
    # The premise: a finite loss, Inf gradients, no NaN, and anomaly mode says nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anomaly mode warns that it is slow
        with torch.autograd.detect_anomaly():
            loss = _overflowing_loss(model)
            loss.backward()  # does not raise: anomaly mode only looks for NaN
    assert math.isfinite(loss.item())
    grads = [p.grad for p in model.parameters()]
    assert any(torch.isinf(g).any() for g in grads)
    assert not any(torch.isnan(g).any() for g in grads)
    model.zero_grad(set_to_none=True)
    expected = _first_inf_signal(model)

    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    loss = _overflowing_loss(model)
    with watch.backward(loss=loss):
        loss.backward()
    findings = watch.close().findings
    (event,) = sink.events
    assert event.kind == "nonfinite"
    assert event.data["stage"] == "backward"
    assert event.data["first_signal"] == expected
    assert event.data["first_activation"] is None  # the forward pass was finite
    assert (
        f"from `{expected}`: the forward pass was finite; the gradient of `{expected}` (Linear)'s"
        in (event.message)
    )
    (finding,) = [f for f in findings if f.kind == "nonfinite"]
    # At step 0 the signal grows x2.34 per layer until it overflows: the initialisation, named
    # at the input end of the chain; never the learning rate (no update yet).
    assert (finding.cause, finding.first_step) == ("initialization", 0)
    assert "in backward" in finding.evidence
    assert not any("learning rate" in r for r in finding.remedies)


class LogLayer(nn.Module):
    """``log`` of a learned affine map: NaN in forward once the argument goes negative."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x * self.scale)


def _log_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 4), nn.Sigmoid(), LogLayer(4), nn.Linear(4, 4), nn.Linear(4, 1)
    )


def test_forward_nan_names_the_first_module_whose_output_went_nan() -> None:
    model = _log_model()
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    x = torch.rand(8, 4)
    for step in range(4):
        if step == 2:
            with torch.no_grad():
                model[2].scale[1] = -1.0  # log of a negative number at layer 2
        model.zero_grad()
        loss = model(x).pow(2).mean()
        with watch.backward(loss=loss):
            loss.backward()
    watch.close()
    event = sink.events[0]
    assert event.step == 2
    assert event.data["stage"] == "forward"
    assert event.data["first_activation"] == "2"  # the LogLayer, not the Linears after it
    assert "from `2`: the output of `2` (LogLayer) was the first to go non-finite" in (
        event.message
    )
    assert event.cause == "forward_numerics"


def test_nan_in_the_input_is_blamed_on_the_input() -> None:
    model = _log_model()
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    x = torch.rand(8, 4)
    x[3, 1] = math.nan
    loss = model(x).pow(2).mean()
    with watch.backward(loss=loss):
        loss.backward()
    watch.close()
    (event,) = sink.events
    assert event.data["first_activation"] == "<input>"
    assert "the model's input already held NaN/Inf" in event.message


def test_evaluation_forwards_are_not_recorded() -> None:
    model = _log_model()
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    with torch.no_grad():  # a validation batch full of NaN between training steps
        model(torch.full((2, 4), math.nan))
    model.zero_grad()
    loss = model(torch.rand(8, 4)).pow(2).mean()
    with watch.backward(loss=loss):
        loss.backward()
    watch.close()
    assert sink.events == []


def test_nan_made_in_backward_is_named_at_the_module_it_entered() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(6, 6) for _ in range(5)), nn.Linear(6, 1))
    poison = [False]

    def hook(module, args, output):
        if poison[0]:
            output.register_hook(lambda g: torch.full_like(g, math.nan))

    model[3].register_forward_hook(hook)  # registered before gradwatch's: runs first
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    for step in range(3):
        poison[0] = step == 1
        model.zero_grad()
        loss = model(torch.randn(8, 6)).pow(2).mean()
        with watch.backward(loss=loss):
            loss.backward()
    watch.close()
    (event,) = sink.events
    assert event.step == 1
    assert event.data["stage"] == "backward"
    assert event.data["first_signal"] == "3"
    assert event.data["first"] in ("3.weight", "3.bias")  # first poisoned in backward order
    assert event.data["module"] == "3" and event.data["module_type"] == "Linear"
    assert event.data["shape"] in ("(6, 6)", "(6,)")


def test_without_forensics_provenance_still_says_forward_or_backward() -> None:
    model = chain()
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink])
    loss = _overflowing_loss(model)
    with watch.backward(loss=loss):
        loss.backward()
    watch.close()
    (event,) = sink.events
    assert event.data["stage"] == "backward" and event.data["first_signal"] is None
    assert "(Linear `" in event.message and "shape (" in event.message


def test_forensics_makes_no_host_reads_on_clean_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, sinks=[], forensics=True).attach(opt)

    def steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            loss = model(torch.randn(8, 8)).pow(2).mean()
            with watch.backward(loss=loss):
                loss.backward()
            opt.step()

    steps(3)  # warm up outside the counter (first call patterns, index caches)
    with count_host_reads() as counts:
        steps(70)  # crosses emission batches, health batches and weight samples
    assert counts == dict.fromkeys(counts, 0), counts
    watch.flush()
    health = watch.health_detector.report()
    assert health.steps == 73 and health.finite_steps == 73
    assert all(math.isfinite(v) for v in health.signal_log)  # the hooks did record
    assert all(math.isfinite(v) for v in health.update_log)  # and the learning rate was known


def test_close_removes_the_forensics_hooks() -> None:
    model = _log_model()
    before = [len(m._forward_hooks) for m in model.modules()]
    watch = gw.GradWatch(model, sinks=[], forensics=True)
    assert sum(len(m._forward_hooks) for m in model.modules()) == sum(before) + 4
    watch.close()
    assert [len(m._forward_hooks) for m in model.modules()] == before


def test_finite_outputs_with_an_overflowing_loss_blame_the_loss() -> None:
    model = chain()
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    x = torch.full((8, 4), 1e21 * GAIN**-20)  # outputs ~1e21: finite, their square is not
    loss = nn.functional.mse_loss(model(x), torch.zeros(8, 1))
    with watch.backward(loss=loss):
        loss.backward()
    findings = watch.close().findings
    (event,) = sink.events
    assert math.isinf(loss.item())
    assert event.data["stage"] == "forward" and event.data["first_activation"] is None
    assert "from the loss: the loss was inf while every module's output was finite" in (
        event.message
    )
    (finding,) = [f for f in findings if f.kind == "nonfinite"]
    # The loss is where it showed; the huge outputs come from the 20-layer x2.34 chain at step 0.
    assert finding.params[0] == "loss" and finding.cause == "initialization"
