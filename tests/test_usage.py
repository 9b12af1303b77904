"""The three ways into a loop, gradient accumulation, GradScaler, and the watcher's lifecycle."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from conftest import defer_host_copies, mlp
from rich.console import Console
from torch import nn

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
    assert "step" not in vars(opt)  # the optimizer's own step hooks, never a replaced step
    assert opt._optimizer_step_pre_hooks and opt._optimizer_step_post_hooks
    watch.close()
    watch.close()  # idempotent
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert "step" not in vars(opt)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
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


# ------------------------------------------------------------- a skipped step moves nothing


class _BufferedNet(nn.Module):
    """BatchNorm, a counter forward updates in place, a running mean forward reassigns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("input_mean", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        self.input_mean = 0.9 * self.input_mean + 0.1 * x.mean(dim=(0, 2, 3))
        return self.head(self.bn(self.conv(x)).mean(dim=(2, 3)))


def _images(step: int, nan: bool = False) -> torch.Tensor:
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(step))
    if nan:
        x[0, 1, 2, 3] = math.nan
    return x


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("via", ["attach", "check", "backward", "scaler"])
def test_skip_leaves_buffers_as_they_were(via: str) -> None:
    """A NaN batch writes NaN into BatchNorm statistics in forward; the skip puts them back."""
    model = _BufferedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu") if via == "scaler" else None
    watch = gw.GradWatch(model, on_nonfinite="skip", sinks=[])
    if via in ("attach", "scaler"):
        watch.attach(opt, scaler=scaler)
    for step in range(5):
        before = _buffers(model)
        opt.zero_grad()
        loss = model(_images(step, nan=step == 2)).logsumexp(1).mean()
        if via == "backward":
            with watch.backward(loss=loss):
                loss.backward()
        elif via == "scaler":
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if via == "check":
            watch.check(loss=loss)
        if via == "scaler":
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        after = _buffers(model)
        if step == 2:
            assert loss.isnan()  # the batch was poisoned
            for name, value in before.items():
                assert torch.equal(after[name], value), name  # bit for bit, counters included
        else:
            assert after["seen"] == before["seen"] + 4
    assert [r.skipped for r in watch.history] == [False, False, True, False, False]
    watch.close()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(_images(9))).all()
    assert all(torch.isfinite(b.float()).all() for b in model.buffers())


def test_skip_names_a_buffer_it_cannot_put_back() -> None:
    class Growing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)
            self.register_buffer("trace", torch.zeros(0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.lin(x)
            self.trace = torch.cat([self.trace, out.detach().mean().reshape(1)])
            if len(self.trace) == 2:
                self.register_buffer("late", out.detach().mean())
            return out

    model = Growing()
    watch = gw.GradWatch(model, on_nonfinite="skip", sinks=[])
    model(torch.ones(2, 3)).sum().backward()
    watch.check()
    model.zero_grad()
    model(torch.full((2, 3), math.nan)).sum().backward()
    pattern = r"step 1 was skipped, but 2 buffer.*trace \(now .*late \(registered during"
    with pytest.warns(gw.GradWatchWarning, match=pattern) as caught:
        watch.check()
    assert watch.history[-1].skipped
    assert caught[0].filename == __file__  # points at the loop


def _hand_written_step(model: nn.Module, lr: float = 0.1) -> None:
    """pytorch/examples word_language_model: ``p.data.add_(p.grad, alpha=-lr)``."""
    for p in model.parameters():
        p.data.add_(p.grad, alpha=-lr)


@pytest.mark.parametrize("via", ["backward", "check"])
def test_skip_in_a_hand_written_update_loop(via: str) -> None:
    model = mlp(depth=2)
    watch = gw.GradWatch(model, on_nonfinite="skip", sinks=[])
    for step in range(4):
        model.zero_grad()
        x = _batch(step)
        if step == 2:
            x[0, 0] = math.nan
        loss = model(x).pow(2).mean()
        if via == "backward":
            with watch.backward(loss=loss):
                loss.backward()
        else:
            loss.backward()
            watch.check(loss=loss)
        before = copy.deepcopy(model.state_dict())
        _hand_written_step(model)  # old code: TypeError, the gradients were None
        if step == 2:
            assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
            for key, value in model.state_dict().items():
                assert torch.equal(value, before[key])
    assert [r.skipped for r in watch.history] == [False, False, True, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1),
    ],
    ids=["sgd-momentum-decay", "adam"],
)
@pytest.mark.parametrize("where", ["before-step", "in-closure"])
def test_skip_without_attach_keeps_torch_optimizers_still(make, where: str) -> None:
    """Zeroed gradients are hidden from torch optimizers until the next backward."""
    model = mlp(depth=2)
    opt = make(model.parameters())
    watch = gw.GradWatch(model, on_nonfinite="skip", sinks=[])

    def closure(step: int) -> torch.Tensor:
        opt.zero_grad()
        x = _batch(step)
        if step == 2:
            x[0, 0] = math.nan
        loss = model(x).pow(2).mean()
        loss.backward()
        watch.check(loss=loss)
        return loss

    for step in range(4):
        before = copy.deepcopy((model.state_dict(), opt.state_dict()))
        if where == "in-closure":  # as Lightning runs backward and the check inside step()
            opt.step(lambda step=step: closure(step))
        else:
            closure(step)
            opt.step()
        if step == 2:
            _assert_same(before, (model.state_dict(), opt.state_dict()))
            assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
            opt.step()  # a second step before any backward changes nothing either
            _assert_same(before, (model.state_dict(), opt.state_dict()))
    assert [r.skipped for r in watch.history] == [False, False, True, False]
    if isinstance(opt, torch.optim.Adam):
        assert opt.state_dict()["state"][0]["step"] == 3  # the skipped step is not counted
    watch.close()


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("order", ["scheduler-first", "attach-first"])
def test_lr_scheduler_in_either_order_without_a_torch_warning(order: str) -> None:
    """torch warns when ``optimizer.step`` is replaced after a scheduler patched it."""

    def run(watched: bool) -> tuple[list[float], list[str]]:
        torch.manual_seed(0)
        model = mlp(depth=1)
        opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
        watch = gw.GradWatch(model, on_nonfinite="skip", sinks=[]) if watched else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if order == "attach-first" and watch is not None:
                watch.attach(opt)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            if order == "scheduler-first" and watch is not None:
                watch.attach(opt)
            lrs = []
            for step in range(3):
                opt.zero_grad()
                model(_batch(step)).sum().backward()
                if step == 0:
                    model[0].weight.grad[0, 0] = math.nan  # the first step is skipped
                opt.step()
                sched.step()
                lrs.append(opt.param_groups[0]["lr"])
        if watch is not None:
            assert [r.skipped for r in watch.history] == [True, False, False]
            watch.close()
        return lrs, [str(w.message) for w in caught]

    lrs, caught = run(watched=True)
    assert caught == []
    assert lrs == run(watched=False)[0] == [0.5, 0.25, 0.125]


def test_rank_blame_gathers_without_a_deprecation_warning(tmp_path) -> None:
    import torch.distributed as dist

    from gradwatch.collect.distributed import RankBlame

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        blame = RankBlame(torch.device("cpu"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            flags = blame.take()
        assert [str(w.message) for w in caught] == []  # was: all_gather_into_tensor deprecated
        assert flags.tolist() == [0]
    finally:
        dist.destroy_process_group()
