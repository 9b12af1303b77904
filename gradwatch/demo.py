"""``gradwatch demo``: the textbook exploding network and its remedies, then one bad record.

Part 1 (:mod:`gradwatch.demo_remedies`) is the seed's network, diagnosed at step 0 and run again
with each remedy the texts name. Part 2, below, is a deep network that trains well until one
record in the wrong unit throws it off, unprotected and then clipped.

The network is the one texts on exploding gradients use: a deep stack of Linear+ReLU layers whose
weights all start at the same constant above 1 (20 layers, gain 2.34 per layer). Its output is a
product of 20 factors, and each layer's weight gradient is proportional to the product of the 19
other layers' weights. Inputs are scaled by 2.34^-20 so that the untrained network's output is O(1)
and training starts healthy. No biases: the gradient of the first layer's bias would be
2.34^19 ~ 10^7 times the output's, and no learning rate a person would pick is then stable.

The data: 1024 records of 4 features, target 3 times a weighted mean of the features, and one
record entered in millimetres instead of metres: its features and its target are 1000 times too
large. The record chosen is the one the shuffle first serves at step ``BAD_STEP`` (30), so that the
incident comes after the spike detector's 25-step warm-up. Training is plain SGD with a linear
learning-rate warm-up; both runs see the same data in the same order.

Unprotected, the network learns steadily until step 30. That batch's gradient norm is ~10^4 times
the usual one (gradwatch flags the spike); SGD takes the full step, every weight becomes at least
ten times larger, and 20 layers multiply that into an output (~10^32) whose square overflows
float32: at step 31 the loss is inf and every gradient holds Inf (gradwatch names the first one in
backward order). With ``ClipNorm``, that step is cut down to a normal size and the same run
converges.

Why a bad record and not simply a too-high learning rate: all weights here are positive, so a step
that is too large overshoots, the correcting step drives the weights negative, and every ReLU dies:
the gradient becomes exactly 0, silently, never Inf. An overflow needs a single step that pushes
the output *up* by many orders of magnitude while the network is still below its targets, which is
what one batch holding a record 1000 times too large does. Plain SGD rather than momentum for the
same reason: with momentum the network oscillates around its targets, and whether the bad batch
then overflows it or kills its ReLUs depends on where in the swing it lands.
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from gradwatch.records import Record, RunSummary, StepReport
from gradwatch.report.sink import Sink

__all__ = [
    "DemoData",
    "DemoRun",
    "LossLine",
    "bad_steps",
    "exploding_mlp",
    "lr_at",
    "make_data",
    "one_thread",
    "run_demo",
    "train",
]

DEPTH = 20
GAIN = 2.34
WIDTH = 16
FEATURES = 4
RECORDS = 1024
BATCH = 32
BAD_STEP = 30
UNIT_ERROR = 1000.0  # millimetres entered as metres
INPUT_SCALE = GAIN**-DEPTH  # the untrained network's output is then O(1)
PEAK_LR = 0.005
WARMUP = 50
MAX_NORM = 20.0  # a few times the usual gradient norm (5 to 11 here: see the periodic lines)
EVERY = 10


def exploding_mlp(
    depth: int = DEPTH, width: int = WIDTH, features: int = FEATURES, gain: float = GAIN
) -> nn.Sequential:
    """``depth`` Linear layers ``fc1`` ... ``fc<depth>``, ReLUs between, no biases, gain ``gain``.

    Every weight is ``gain / fan_in``, so each layer multiplies a uniform positive signal by
    ``gain``. With all weights equal, all units of a layer compute the same thing: this is the
    textbook one-unit chain ``y = w20 * relu(w19 * ... relu(w1 * x))``, ``width`` times over.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(1, depth + 1):
        fan_in = features if i == 1 else width
        linear = nn.Linear(fan_in, width if i < depth else 1, bias=False)
        nn.init.constant_(linear.weight, gain / fan_in)
        layers[f"fc{i}"] = linear
        if i < depth:
            layers[f"relu{i}"] = nn.ReLU()
    return nn.Sequential(layers)


@dataclass(frozen=True)
class DemoData:
    """Inputs (already multiplied by ``INPUT_SCALE``), targets, and the shuffling.

    Attributes:
        x: ``(RECORDS, FEATURES)`` inputs.
        y: ``(RECORDS, 1)`` targets.
        bad: Index of the record in millimetres.
        seed: Seed of the shuffle (a fresh permutation every epoch).
    """

    x: torch.Tensor
    y: torch.Tensor
    bad: int
    seed: int

    def batches(self, steps: int) -> list[torch.Tensor]:
        """Record indices of the batch of each step, ``BATCH`` records, reshuffled every epoch."""
        generator = torch.Generator().manual_seed(self.seed)
        out: list[torch.Tensor] = []
        while len(out) < steps:
            order = torch.randperm(len(self.x), generator=generator)
            out.extend(order[i : i + BATCH] for i in range(0, len(order) - BATCH + 1, BATCH))
        return out[:steps]


def make_data(seed: int = 0) -> DemoData:
    """``RECORDS`` records, target 3x a weighted mean of the features, one record 1000x too large.

    The features are uniform in [0.5, 1.5]. The record in the wrong unit is the first one of the
    batch the shuffle serves at step ``BAD_STEP``.
    """
    generator = torch.Generator().manual_seed(seed)
    features = 0.5 + torch.rand(RECORDS, FEATURES, generator=generator)
    weights = 0.5 + torch.rand(FEATURES, 1, generator=generator)
    targets = 3.0 * features @ (weights / weights.sum())
    order = DemoData(features, targets, -1, seed + 1).batches(BAD_STEP + 1)
    bad = int(order[BAD_STEP][0])
    features[bad] *= UNIT_ERROR
    targets[bad] *= UNIT_ERROR
    return DemoData(features * INPUT_SCALE, targets, bad, seed + 1)


def lr_at(step: int) -> float:
    """Learning rate of ``step``: linear warm-up to ``PEAK_LR`` over ``WARMUP`` steps, then flat."""
    return PEAK_LR * min(1.0, (step + 1) / WARMUP)


@dataclass(frozen=True)
class DemoRun:
    """What one training run did.

    Attributes:
        initial_loss: Mean squared error over the good records (all but the one in millimetres)
            before training.
        final_loss: The same after training (NaN once the weights hold NaN/Inf).
        steps: Steps trained.
        stopped_at: The step whose loss was not finite, after which training stopped (None if
            every loss was finite).
        bad_steps: Steps whose batch held the record in millimetres.
        summary: The watcher's final summary.
    """

    initial_loss: float
    final_loss: float
    steps: int
    stopped_at: int | None
    bad_steps: tuple[int, ...]
    summary: RunSummary


class LossLine(Sink):
    """Prints the training loss every ``every`` steps, after ConsoleSink's periodic line."""

    def __init__(self, console: Console, every: int = EVERY) -> None:
        self.console = console
        self.every = every

    def write(self, record: Record) -> None:
        if isinstance(record, StepReport) and (record.step + 1) % self.every == 0:
            loss = "-" if record.loss is None else f"{record.loss:.4g}"
            self.console.print(
                f"  loss at step {record.step}: {loss}  (learning rate {lr_at(record.step):.2g})",
                soft_wrap=True,
            )


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: for 16-wide layers, threads only add synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train(watch_kwargs: dict[str, Any], steps: int, *, sinks: list[Sink], seed: int = 0) -> DemoRun:
    """Train the exploding network for ``steps`` steps with a GradWatch attached to its optimizer.

    Args:
        watch_kwargs: Extra ``GradWatch`` arguments (``clip=...``, ``on_nonfinite=...``).
        steps: Number of training steps (batches of ``BATCH`` records).
        sinks: The watcher's sinks.
        seed: Seed of the data and of the shuffle.

    Returns:
        The losses before and after, and the watcher's summary. Training stops after the first
        step whose loss is not finite: the optimizer has then applied Inf/NaN gradients, so every
        later step would be NaN.
    """
    import gradwatch as gw

    model = exploding_mlp()
    data = make_data(seed)
    good = torch.ones(len(data.x), dtype=torch.bool)
    good[data.bad] = False

    def good_loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(data.x[good]), data.y[good]).item()

    batches = data.batches(steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_at(0))
    stopped_at = None
    with one_thread():
        initial = good_loss()
        with gw.GradWatch(model, sinks=sinks, **watch_kwargs) as watch:
            watch.attach(optimizer)
            for step, batch in enumerate(batches):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(data.x[batch]), data.y[batch])
                with watch.backward(loss=loss):
                    loss.backward()
                optimizer.step()  # gradwatch checks the gradients here, before the update
                if not math.isfinite(loss.item()):
                    stopped_at = step
                    break
        final = good_loss()
    done = len(batches) if stopped_at is None else stopped_at + 1
    bad = tuple(step for step, batch in enumerate(batches) if data.bad in batch)
    return DemoRun(initial, final, done, stopped_at, bad, watch.close())


def bad_steps(steps: int, seed: int = 0) -> tuple[int, ...]:
    """The steps, among the first ``steps``, whose batch holds the record in millimetres."""
    data = make_data(seed)
    return tuple(step for step, batch in enumerate(data.batches(steps)) if data.bad in batch)


def _bad_steps_text(steps: tuple[int, ...]) -> str:
    if not steps:
        return "does not come up within this run"
    if len(steps) == 1:
        return f"comes up at step {steps[0]}: gradwatch still flags the spike, and"
    listed = ", ".join(str(s) for s in steps[:-1]) + f" and {steps[-1]}"
    return f"comes up at steps {listed}: gradwatch still flags the spikes, and"


def run_demo(steps: int = 60, log: str | None = "gradwatch-demo.jsonl") -> int:
    """Run both halves of the demo, printing what gradwatch reports; returns an exit code."""
    import gradwatch as gw
    from gradwatch.demo_remedies import remedies_table

    console = Console(file=sys.stdout, highlight=False)
    remedies_table(console)
    console.print()
    console.rule("[bold]gradwatch demo, part 2: a deep network and one bad record")
    console.print(
        f"Network: {DEPTH} Linear+ReLU layers of {WIDTH} units, no biases, every weight "
        f"{GAIN}/fan_in. Its output is a product of {DEPTH} factors of {GAIN}, and each layer's "
        f"gradient is proportional to the product of the {DEPTH - 1} other layers' weights. "
        f"Inputs are scaled by {GAIN}^-{DEPTH} so that training starts with outputs of about 1."
    )
    console.print(
        f"Data: {RECORDS} records, target = 3 x a weighted mean of {FEATURES} features. One record "
        f"was entered in millimetres instead of metres: it is {UNIT_ERROR:g} times too large. "
        f"Training: plain SGD, batches of {BATCH}, learning rate warming up linearly to {PEAK_LR} "
        f"over {WARMUP} steps. Both runs see the same data in the same order."
    )
    if steps < BAD_STEP + 2:
        console.print(
            f"[yellow]The record in millimetres first comes up at step {BAD_STEP}: run with "
            f"--steps {BAD_STEP + 2} or more to see what it does.[/]"
        )

    console.print()
    console.rule("[bold]1. Unprotected: gradwatch watches and changes nothing")
    console.print(
        f"The network learns steadily until step {BAD_STEP}, whose batch holds the record in "
        "millimetres: its gradient is about 10^4 times the usual one. SGD takes the full step, "
        f"every weight becomes at least ten times larger, and {DEPTH} layers multiply that into an "
        "output whose square, the loss, overflows float32: the next step's loss and gradients "
        "are Inf."
    )
    sinks: list[Sink] = [gw.ConsoleSink(every=EVERY, console=console), LossLine(console)]
    if log:
        from gradwatch.report.jsonl import JsonlSink

        path = Path(log)
        if path.exists():
            path.unlink()  # the demo owns its log file: each run starts a fresh one
        sinks.append(JsonlSink(path))
    run = train({}, steps, sinks=sinks)
    if run.stopped_at is not None:
        console.print(
            f"[bold red]Step {run.stopped_at}: the loss is inf and SGD has applied Inf gradients: "
            "every weight is now Inf or NaN, so training stops here.[/]"
        )
    console.print(
        f"Loss on the {RECORDS - 1} good records: {run.initial_loss:.4g} before training, "
        f"[bold red]{run.final_loss:.4g}[/] after.\n"
    )

    console.rule(
        f"[bold]2. The same run with gradwatch.ClipNorm({MAX_NORM:g}), on_nonfinite='skip'"
    )
    console.print(
        "Same network, data, order and learning rates. The record in millimetres "
        f"{_bad_steps_text(bad_steps(steps))} ClipNorm({MAX_NORM:g}), a few times the usual norm, "
        "cuts any step whose gradient norm is larger down to that norm."
    )
    clipped = train(
        {"clip": gw.ClipNorm(MAX_NORM), "on_nonfinite": "skip"},
        steps,
        sinks=[gw.ConsoleSink(every=EVERY, console=console), LossLine(console)],
    )
    console.print(
        f"Loss on the {RECORDS - 1} good records: {clipped.initial_loss:.4g} before training, "
        f"[bold green]{clipped.final_loss:.4g}[/] after {clipped.steps} steps."
    )
    if log:
        # soft_wrap: a command must stay on one line to be copied; markup=False: a path is text
        console.print(f"\nRun log of the unprotected run: {log}", soft_wrap=True, markup=False)
        console.print(f"View it with: gradwatch report {log}", soft_wrap=True, markup=False)
    return 0
