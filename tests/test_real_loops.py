"""gradwatch dropped into training loops written the way public projects write them.

Each loop follows a well-known script: pytorch/examples' ``word_language_model`` (hand-written
SGD, ``clip_grad_norm_``, ``torch.save(model)``), timm's ``train.py`` (AMP with a GradScaler, an
EMA copy made with ``copy.deepcopy``, a scheduler), nanoGPT's ``train.py`` (gradient
accumulation, ``zero_grad(set_to_none=True)``), and ``torch.compile``. Each runs with the default
options, ``forensics=True``, ``on_nonfinite="skip"``, a clipper and all of them together, on clean
data and with a NaN in one input batch. Every run must:

* not crash, and end with ``torch.save(model)`` read back by ``torch.load(weights_only=True)``
  inside ``torch.serialization.safe_globals`` (what the loop's own script does);
* make torch warn about nothing it does not warn about in the same loop without gradwatch;
* leave the model finite, parameters and buffers, in eval mode too, whenever no NaN reached it
  or ``on_nonfinite="skip"`` was on; and name the NaN step when there was one.

Tiny models and five steps: the file runs in seconds. ``torch.compile`` uses the ``aot_eager``
backend (dynamo and AOT autograd, where hooks meet compilation, without inductor's C++ build).
"""

from __future__ import annotations

import copy
import functools
import io
import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw

STEPS = 5
NAN_AT = 2  # the step whose input batch holds a NaN
NTOKEN = 20
ACCUMULATE = 2


# ------------------------------------------------------------------------------------ models


class ConvNet(nn.Module):
    """Conv, BatchNorm, ReLU, global pooling, linear head: the smallest timm-style classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


class RNNModel(nn.Module):
    """pytorch/examples word_language_model's RNNModel: encoder, LSTM, tied decoder."""

    def __init__(self, ninp: int = 8, nlayers: int = 2) -> None:
        super().__init__()
        self.nlayers, self.nhid = nlayers, ninp
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(NTOKEN, ninp)
        self.rnn = nn.LSTM(ninp, ninp, nlayers, dropout=0.2)
        self.decoder = nn.Linear(ninp, NTOKEN)
        self.decoder.weight = self.encoder.weight  # --tied

    def forward(self, tokens: torch.Tensor, hidden: Any) -> tuple[torch.Tensor, Any]:
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return F.log_softmax(self.decoder(self.drop(output)), dim=-1), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = next(self.parameters())
        shape = (self.nlayers, bsz, self.nhid)
        return weight.new_zeros(shape), weight.new_zeros(shape)


class Regressor(nn.Module):
    """Linear, BatchNorm1d, ReLU, Dropout, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


SAFE = {
    ConvNet: [ConvNet, nn.Conv2d, nn.BatchNorm2d, nn.Linear],
    RNNModel: [RNNModel, nn.Dropout, nn.Embedding, nn.LSTM, nn.Linear],
    Regressor: [Regressor, nn.Sequential, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout],
}


def _images(step: int, nan: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch; with ``nan``, step ``NAN_AT``'s holds a NaN."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(6, 3, 8, 8, generator=gen)
    if nan and step == NAN_AT:
        x[1, 0, 2, 3] = math.nan
    return x, torch.randint(0, 4, (6,), generator=gen)


def _rows(step: int, nan: bool, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s (micro-)batch; with ``nan``, step ``NAN_AT``'s holds a NaN."""
    gen = torch.Generator().manual_seed(10 * step + micro)
    x = torch.randn(8, 6, generator=gen)
    if nan and step == NAN_AT:
        x[3, 1] = math.nan
    return x, x[:, :1].sin() + 0.1 * torch.randn(8, 1, generator=gen)


# ------------------------------------------------------------------------------------- loops


class _NoWatch:
    """Stands in for the watcher in the baseline run of a loop."""

    def attach(self, optimizer: Any, *, scaler: Any = None) -> _NoWatch:
        return self

    def backward(self, loss: Any = None) -> Any:
        return nullcontext()

    def close(self) -> None:
        return None


Watcher = Callable[[Any], Any]  # model -> GradWatch (or _NoWatch)


def manual_sgd(watcher: Watcher, nan: bool) -> list[nn.Module]:
    """word_language_model's train(): hidden state carried over, clip, update by hand."""
    model = RNNModel()
    watch = watcher(model)
    lr, bsz = 0.5, 3
    model.train()
    hidden = model.init_hidden(bsz)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        data = torch.randint(0, NTOKEN, (6, bsz), generator=gen)
        targets = torch.randint(0, NTOKEN, (6 * bsz,), generator=gen)
        hidden = tuple(h.detach() for h in hidden)  # repackage_hidden
        if nan and step == NAN_AT:
            hidden[0][0, 1, 2] = math.nan  # the batch's input state
        model.zero_grad()
        output, hidden = model(data, hidden)
        loss = F.nll_loss(output.view(-1, NTOKEN), targets)
        with watch.backward(loss=loss):
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        if step == NAN_AT:
            hidden = model.init_hidden(bsz)  # the script would carry NaN on; start over
    watch.close()
    return [model]


def amp(dtype: torch.dtype) -> Callable[[Watcher, bool], list[nn.Module]]:
    def loop(watcher: Watcher, nan: bool) -> list[nn.Module]:
        """timm's train_one_epoch under AMP: autocast, GradScaler, SGD with momentum and decay."""
        model = ConvNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        watch = watcher(model).attach(opt, scaler=scaler)
        for step in range(STEPS):
            x, y = _images(step, nan)
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        watch.close()
        return [model]

    return loop


def accumulation(watcher: Watcher, nan: bool) -> list[nn.Module]:
    """nanoGPT's loop: micro-steps, loss / accumulation, clip, AdamW step, zero_grad to None."""
    model = Regressor()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    watch = watcher(model).attach(opt)
    for step in range(STEPS):
        for micro in range(ACCUMULATE):
            x, y = _rows(step, nan and micro == ACCUMULATE - 1, micro)  # the last micro-batch
            loss = F.mse_loss(model(x), y) / ACCUMULATE
            with watch.backward(loss=loss):
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    watch.close()
    return [model]


def ema(watcher: Watcher, nan: bool) -> list[nn.Module]:
    """timm's ModelEmaV3: a deepcopy made after the watcher, lerped toward the model each step."""
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    watch = watcher(model).attach(opt)
    average = copy.deepcopy(model).eval().requires_grad_(False)
    for step in range(STEPS):
        x, y = _images(step, nan)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            pairs = zip(average.state_dict().values(), model.state_dict().values())
            for kept, now in pairs:
                kept.lerp_(now, 0.1) if kept.is_floating_point() else kept.copy_(now)
            average(x.nan_to_num())  # evaluating the EMA model runs no check
    watch.close()
    return [model, average]


def scheduler(order: str) -> Callable[[Watcher, bool], list[nn.Module]]:
    def loop(watcher: Watcher, nan: bool) -> list[nn.Module]:
        """An LR scheduler (OneCycleLR, which also cycles momentum) created before or after."""
        model = Regressor()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if order == "before":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS)
            watch = watcher(model).attach(opt)
        else:
            watch = watcher(model).attach(opt)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS)
        for step in range(STEPS):
            x, y = _rows(step, nan)
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
        watch.close()
        return [model]

    return loop


def compiled(watcher: Watcher, nan: bool) -> list[nn.Module]:
    """``torch.compile(model)`` watched through the compiled wrapper, Adam attached."""
    torch._dynamo.reset()  # each run compiles afresh, so no run reaches the recompile limit
    model = ConvNet()
    fast = torch.compile(model, backend="aot_eager")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    watch = watcher(fast).attach(opt)
    for step in range(STEPS):
        x, y = _images(step, nan)
        F.cross_entropy(fast(x), y).backward()
        opt.step()
        opt.zero_grad()
    watch.close()
    return [model]


LOOPS: dict[str, Callable[[Watcher, bool], list[nn.Module]]] = {
    "manual-sgd": manual_sgd,
    "amp-bf16": amp(torch.bfloat16),
    "amp-fp16": amp(torch.float16),
    "accumulation": accumulation,
    "ema": ema,
    "scheduler-before": scheduler("before"),
    "scheduler-after": scheduler("after"),
    "compile": compiled,
}

OPTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "default": dict,
    "forensics": lambda: {"forensics": True},
    "skip": lambda: {"on_nonfinite": "skip"},
    "clip": lambda: {"clip": gw.ClipNorm(1.0)},
    "all": lambda: {"forensics": True, "on_nonfinite": "skip", "clip": gw.ClipNorm(1.0)},
}


# ------------------------------------------------------------------------------------ runner


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny kernels: one intra-op thread is faster than two fighting other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Run:
    models: list[nn.Module]
    warnings: list[warnings.WarningMessage]
    watches: list[gw.GradWatch] = field(default_factory=list)


def _run(loop: Callable[[Watcher, bool], list[nn.Module]], options: Any, nan: bool) -> Run:
    watches: list[gw.GradWatch] = []

    def watcher(model: Any) -> Any:
        if options is None:
            return _NoWatch()
        watches.append(gw.GradWatch(model, **options))
        return watches[-1]

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = loop(watcher, nan)
    return Run(models, caught, watches)


@functools.cache
def _baseline_warnings(loop: str, nan: bool) -> frozenset[str]:
    """What torch warns about in the same loop without gradwatch (not ours to fix)."""
    return frozenset(str(w.message) for w in _run(LOOPS[loop], None, nan).warnings)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _saved_and_loaded(model: nn.Module) -> nn.Module:
    """word_language_model's ending: ``torch.save(model, f)``, then a weights-only load."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals(SAFE[type(model)]):
        return torch.load(buffer, weights_only=True)


def _eval_output(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        if isinstance(model, RNNModel):
            return model(torch.zeros(4, 2, dtype=torch.long), model.init_hidden(2))[0]
        if isinstance(model, ConvNet):
            return model(_images(0, False)[0])
        return model(_rows(0, False)[0])


# torch.compile is the slow loop (a compilation per run): fewer cases, each option still once.
COMPILED = {("default", False), ("default", True), ("forensics", False), ("skip", True)}
COMPILED |= {("clip", False), ("all", True)}


def _cases() -> list[Any]:
    cases = []
    for loop in LOOPS:
        for options in OPTIONS:
            for nan in (False, True):
                if loop == "compile" and (options, nan) not in COMPILED:
                    continue
                name = f"{loop}-{options}-{'nan-batch' if nan else 'clean'}"
                cases.append(pytest.param(loop, options, nan, id=name))
    return cases


@pytest.mark.parametrize(("loop", "options", "nan"), _cases())
def test_loop_runs_quietly_and_leaves_the_model_whole(loop: str, options: str, nan: bool) -> None:
    run = _run(LOOPS[loop], OPTIONS[options](), nan)
    baseline = _baseline_warnings(loop, nan)

    ours = [w for w in run.warnings if str(w.message) not in baseline]
    assert [f"{w.category.__name__}: {w.message}" for w in ours] == []

    for model in run.models:
        loaded = _saved_and_loaded(model)
        assert type(loaded) is type(model)
        for name, tensor in _tensors(model).items():
            assert torch.equal(tensor.nan_to_num(), _tensors(loaded)[name].nan_to_num()), name

    (watch,) = run.watches
    reports = list(watch.history)
    assert len(reports) == STEPS
    if nan:
        assert any(r.nonfinite for r in reports)
    if nan and "skip" not in options and "all" not in options:
        return  # the NaN step went through: the model is NaN, as without gradwatch
    for model in run.models:
        for name, tensor in _tensors(model).items():
            assert torch.isfinite(tensor.float()).all(), name
        assert torch.isfinite(_eval_output(model)).all()
