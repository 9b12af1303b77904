"""The seed's story, first part of ``gradwatch demo``: the textbook network and its remedies.

The network is the one the texts on exploding gradients draw: 20 layers of one neuron each,
ReLU between them, every weight 2.34, input about 1. Its output is 2.34^20 ≈ 2.4e7 and the
gradient of the first layers ≈ 10^15: gradwatch says so at step 0, before any update, and names
the cause (the initialisation) from the growth through depth (×2.34 per layer). Then each remedy
the texts name is applied to the same run — gradient clipping, careful initialisation, batch
normalisation, fewer layers — and a table shows what each did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

__all__ = ["REMEDIES", "Outcome", "remedies_table", "seed_network", "train_seed"]

DEPTH = 20
GAIN = 2.34
STEPS = 150
LR = 0.01
BATCH = 16


def seed_network(depth: int = DEPTH, gain: float = GAIN, *, norm: bool = False) -> nn.Sequential:
    """``depth`` Linear(1, 1) layers, every weight ``gain``, biases 0, ReLU between them."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layer = nn.Linear(1, 1)
        nn.init.constant_(layer.weight, gain)
        nn.init.zeros_(layer.bias)
        layers.append(layer)
        if norm:
            layers.append(nn.BatchNorm1d(1))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Outcome(NamedTuple):
    """What one run did: its first gradient norm, its loss, and gradwatch's diagnosis."""

    name: str
    first_norm: float
    first_loss: float
    final_loss: float
    cause: str | None
    place: str
    finding: Any


def train_seed(name: str, model: nn.Module, steps: int = STEPS, **watch: Any) -> Outcome:
    """Train ``model`` to output 2x on inputs around 1 with SGD, watched by gradwatch."""
    import gradwatch as gw

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    watcher = gw.GradWatch(model, **{"sinks": [], **watch}).attach(opt)
    losses, first_norm = [], math.nan
    for step in range(steps):
        x = torch.rand(BATCH, 1, generator=gen) + 0.5
        loss = nn.functional.mse_loss(model(x), 2 * x)
        opt.zero_grad()
        with watcher.backward(loss=loss):
            loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 0:
            first_norm = watcher.history[-1].global_norm
    watcher.close()
    found = next((f for f in watcher.diagnose() if f.severity != "info"), None)
    place = found.params[0] if found is not None and found.params else ""
    return Outcome(
        name, first_norm, losses[0], losses[-1], found.cause if found else None, place, found
    )


REMEDIES: tuple[tuple[str, Callable[[], nn.Module], Callable[[Any], dict[str, Any]]], ...] = (
    ("none (the textbook network)", seed_network, lambda found: {}),
    (
        "gradient clipping (the suggested max_norm)",
        seed_network,
        lambda found: {"clip": _clip(found)},
    ),
    ("careful initialisation (gain 1 per layer)", lambda: seed_network(gain=1.0), lambda f: {}),
    ("batch normalisation after each layer", lambda: seed_network(norm=True), lambda f: {}),
    ("fewer layers (4)", lambda: seed_network(depth=4), lambda f: {}),
)
"""Each remedy the background texts name: label, model, watcher settings from the diagnosis."""


def _clip(found: Any) -> Any:
    import gradwatch as gw

    max_norm = found.suggested.get("max_norm", 1.0) if found is not None else 1.0
    return gw.ClipNorm(max_norm)


def remedies_table(console: Console) -> list[Outcome]:
    """Diagnose the textbook network at step 0, apply each remedy, print what each did."""
    console.rule("[bold]gradwatch demo, part 1: the textbook exploding network")
    console.print(
        f"{DEPTH} layers of one neuron, ReLU between them, every weight {GAIN}, inputs about 1: "
        f"the output is {GAIN}^{DEPTH} ≈ {GAIN**DEPTH:.2g} and the first layers' gradient "
        f"≈ 1e15. Plain SGD, lr {LR}, {STEPS} steps, target 2x."
    )
    outcomes: list[Outcome] = []
    first: Any = None
    for name, build, settings in REMEDIES:
        outcome = train_seed(name, build(), **settings(first))
        if first is None:
            first = outcome.finding
            if first is not None:
                console.print(
                    f"gradwatch at step {first.first_step}: [bold]{first.severity}[/], cause "
                    f"[bold]{first.cause}[/], starting at `{outcome.place}`: {first.evidence}",
                    markup=True,
                    highlight=False,
                )
                for remedy in first.remedies[:4]:
                    console.print(f"    -> {remedy}", markup=False, highlight=False)
        outcomes.append(outcome)
    table = Table(title="What each remedy did to the same run", title_justify="left")
    for column in ("remedy", "grad norm at step 0", "loss: start -> end", "gradwatch says"):
        table.add_column(column)
    for o in outcomes:
        said = (
            "healthy" if o.cause is None else f"{o.cause}" + (f" at `{o.place}`" if o.place else "")
        )
        table.add_row(
            o.name, f"{o.first_norm:.3g}", f"{o.first_loss:.3g} -> {o.final_loss:.3g}", said
        )
    console.print(table)
    return outcomes
