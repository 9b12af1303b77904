"""The three ways into a loop, gradient accumulation, GradScaler, and the watcher's lifecycle."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from conftest import defer_host_copies, mlp
from rich.console import Console

import gradwatch as gw


def _batch(step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 8, generator=gen)


def test_three_usage_patterns_give_the_same_reports() -> None:
    results = {}
    for mode in ("attach", "backward", "check"):
        torch.manual_seed(0)
        model = mlp(depth=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        watch = gw.GradWatch(model, clip=gw.ClipNorm(0.3), sinks=[])
        if mode == "attach":
            watch.attach(opt)
        for step in range(5):
            opt.zero_grad()
            loss = model(_batch(step)).pow(2).mean()
            if mode == "backward":
                with watch.backward(loss=loss) as scope:
                    loss.backward()
                assert scope.report is not None
            else:
                loss.backward()
                if mode == "check":
                    watch.check(loss=loss)
                else:
                    watch.backward  # noqa: B018 - attach mode: only optimizer.step triggers
            opt.step()
        watch.close()
        results[mode] = [(r.global_norm, r.clip_coef) for r in watch.history]
    assert results["attach"] == results["backward"] == results["check"]
    assert len(results["attach"]) == 5


@pytest.mark.parametrize("mode", ["attach", "backward"])
def test_gradient_accumulation_one_report_per_optimizer_step(mode: str) -> None:
    torch.manual_seed(0)
    model = mlp(depth=2)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = gw.GradWatch(model, sinks=[], accumulation_steps=1 if mode == "attach" else 4)
    if mode == "attach":
        watch.attach(opt)
    expected = []
    for step in range(3):
        opt.zero_grad()
        reference.zero_grad()
        losses = []
        for micro in range(4):
            x = _batch(10 * step + micro)
            loss = model(x).pow(2).mean() / 4
            with watch.backward(loss=loss):
                loss.backward()
            reference(x).pow(2).mean().div(4).backward()
            losses.append(loss.item())
        expected.append(
            (
                torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item(),
                sum(losses) / 4,
            )
        )
        opt.step()
        with torch.no_grad():
            for p, q in zip(reference.parameters(), model.parameters()):
                p.copy_(q)
    watch.close()
    assert len(watch.history) == 3
    for report, (norm, loss) in zip(watch.history, expected):
        assert report.global_norm == pytest.approx(norm, rel=1e-6)
        assert report.loss == pytest.approx(loss, rel=1e-6)


def test_grad_scaler_statistics_are_unscaled_and_skips_are_reported() -> None:
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(10.0), sinks=[]).attach(opt, scaler=scaler)
    unscaled = []
    for step in range(4):
        opt.zero_grad()
        loss = model(_batch(step)).pow(2).mean()
        scaler.scale(loss).backward()
        if step == 2:
            model[0].weight.grad[0, 0] = math.inf  # GradScaler will skip this step
        unscaled.append(
            torch.nn.utils.get_total_norm([p.grad / 1024.0 for p in model.parameters()]).item()
        )
        scaler.step(opt)
        scaler.update()
    watch.close()
    reports = list(watch.history)
    assert len(reports) == 4
    for i in (0, 1):
        assert reports[i].global_norm == pytest.approx(unscaled[i], rel=1e-5)
        assert reports[i].scale == 1024.0 and not reports[i].skipped
    assert reports[2].skipped and "GradScaler" in reports[2].skip_reason
    assert reports[2].nonfinite == ("0.weight",)
    assert reports[3].scale == 512.0  # the scaler backed off after the inf step


def test_close_removes_every_hook_and_restores_the_optimizer() -> None:
    model = mlp(depth=2)
    state = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.GradWatch(model, sinks=[]).attach(opt)
    assert all(p._post_accumulate_grad_hooks for p in model.parameters())
    assert "step" in vars(opt)
    watch.close()
    watch.close()  # idempotent
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert "step" not in vars(opt)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    pickle.loads(pickle.dumps(opt.state_dict()))


def test_lr_scheduler_keeps_working_when_created_after_attach() -> None:
    model = mlp(depth=1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    watch = gw.GradWatch(model, sinks=[]).attach(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)
    assert len(watch.history) == 3
    watch.close()
    model(torch.randn(2, 8)).sum().backward()
    opt.step()  # the scheduler's wrapper still works; gradwatch is a pass-through now
    assert len(watch.history) == 3


def test_context_manager_lifetime_prints_final_summary() -> None:
    out = io.StringIO()
    model = mlp(depth=2)
    with gw.GradWatch(model, sinks=[gw.ConsoleSink(console=Console(file=out, width=120))]) as w:
        model(torch.randn(4, 8)).sum().backward()
        w.check()
    assert w.closed
    text = out.getvalue()
    assert "gradwatch summary: 1 steps" in text and "layer" in text


def test_history_is_bounded() -> None:
    model = mlp(depth=1)
    watch = gw.GradWatch(model, sinks=[], history=8)
    for _ in range(100):
        model(torch.randn(2, 8)).sum().backward()
        watch.check()
    assert len(watch.history) == 8
    assert [r.step for r in watch.history] == list(range(92, 100))
    assert watch.summary().steps == 100


def test_report_is_lazy_until_read_and_pickles() -> None:
    model = mlp(depth=1)
    watch = gw.GradWatch(model, sinks=[])
    model(torch.randn(2, 8)).sum().backward()
    first = watch.check()
    assert not first.is_resolved  # no sink wants it yet: its emission waits for a batch
    assert first.global_norm > 0 and first.is_resolved  # on CPU the row is on the host already
    defer_host_copies(watch)  # as on an accelerator: the row's copy is still in flight
    model(torch.randn(2, 8)).sum().backward()
    report = watch.check()
    assert not report.is_resolved  # created without waiting for the device
    assert report.global_norm > 0 and report.is_resolved  # first read waits and fills all
    clone = pickle.loads(pickle.dumps(report))
    assert clone == report and clone.param_norms == report.param_norms
