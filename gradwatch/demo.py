"""``gradwatch demo``: the textbook exploding network, unprotected and then clipped.

The network is the one every text on exploding gradients uses: a deep stack of Linear+ReLU layers
whose weights all start at the same constant above 1 (20 layers, 2.34 per layer). Its gradients are
geometric in depth: the bias of the first layer sees the output gradient multiplied by 2.34^19.

Both runs use the same data and the same learning-rate ramp (a geometric warm-up from 1e-9 to 1e-2
over the first 40 steps, as a learning-rate range test does). Unprotected, the run is steady while
the learning rate is tiny, then the gradient norm spikes and the weights overflow to Inf/NaN:
gradwatch flags the spike, names the parameters driving it, and names the parameter the NaN/Inf
started in. Protected by ``ClipNorm``, the same run converges.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

__all__ = ["exploding_mlp", "run_demo"]

DEPTH = 20
WEIGHT = 2.34


def exploding_mlp(depth: int = DEPTH, width: int = 4, weight: float = WEIGHT) -> nn.Sequential:
    """A stack of ``depth`` Linear+ReLU layers, each with gain ``weight``, biases zero.

    Every weight is ``weight / fan_in``, so each layer multiplies a uniform positive signal by
    ``weight``: with one unit per layer this is exactly the textbook chain of weights 2.34.
    """
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(width, width if i < depth - 1 else 1)
        nn.init.constant_(linear.weight, weight / width)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _data(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    scale = WEIGHT**-DEPTH  # inputs small enough that the first forward pass is O(1)
    x = (0.5 + torch.rand(512, width, generator=generator)) * scale
    y = 3.0 * x.mean(dim=1, keepdim=True) / scale
    return x, y


def _lr(step: int, ramp: int = 40, start: float = 1e-9, end: float = 1e-2) -> float:
    return end if step >= ramp else start * (end / start) ** (step / ramp)


def train(
    watch_kwargs: dict, steps: int, *, sinks: list, width: int = 4, seed: int = 0
) -> tuple[float, object]:
    """Train the exploding network with a GradWatch attached; returns (final loss, summary)."""
    import gradwatch as gw

    torch.manual_seed(seed)
    model = exploding_mlp(width=width)
    x, y = _data(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=_lr(0))
    generator = torch.Generator().manual_seed(2)
    loss = torch.tensor(math.nan)
    with gw.GradWatch(model, sinks=sinks, **watch_kwargs) as watch:
        watch.attach(optimizer)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr(step)
            batch = torch.randint(0, len(x), (32,), generator=generator)
            optimizer.zero_grad()
            with watch.backward(loss=(loss := nn.functional.mse_loss(model(x[batch]), y[batch]))):
                loss.backward()
            optimizer.step()
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    return final, watch.close()


def run_demo(steps: int = 60, log: str | None = "gradwatch-demo.jsonl") -> int:
    """Run both halves of the demo, printing what gradwatch reports; returns an exit code."""
    import gradwatch as gw

    console = Console(file=sys.stdout)
    console.rule("[bold]1. Unprotected: 20 Linear+ReLU layers, gain 2.34 per layer, SGD")
    sinks: list = [gw.ConsoleSink(every=20, console=console)]
    if log:
        from gradwatch.report.jsonl import JsonlSink

        path = Path(log)
        if path.exists():
            path.unlink()  # the demo owns its log file: each run starts a fresh one
        sinks.append(JsonlSink(path))
    loss, _ = train({}, steps, sinks=sinks)
    console.print(f"final loss without protection: [bold red]{loss:.4g}[/]\n")

    console.rule("[bold]2. Same run with gradwatch.ClipNorm(1.0) and on_nonfinite='skip'")
    loss_clipped, _ = train(
        {"clip": gw.ClipNorm(1.0), "on_nonfinite": "skip"},
        steps,
        sinks=[gw.ConsoleSink(every=20, console=console)],
    )
    console.print(f"final loss with clipping: [bold green]{loss_clipped:.4g}[/]")
    if log:
        console.print(f"\nRun log of the unprotected run: {log}\nView it with: gradwatch report {log}")
    return 0
