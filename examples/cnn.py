"""A small CNN classifier with adaptive gradient clipping (AGC, as in NFNets), watched by gradwatch.

    python examples/cnn.py --steps 300

Normalizer-free networks train without BatchNorm thanks to unit-wise adaptive gradient clipping:
each output channel's gradient is kept below 1% of its weight's norm, the classifier excepted.
``gw.ClipUnitwise`` is that rule; the summary table shows each layer's gradient norms and the
caption how often clipping acted. The images are synthetic: each class is a bar at its own place.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradwatch as gw

CLASSES, SIZE = 4, 16


def images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    x = 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    for i, label in enumerate(labels.tolist()):
        x[i, 0, 2 + 3 * label : 4 + 3 * label, :] += 1.0
    return x, labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 16, 3, padding=1))
    model.add_module("act1", nn.ReLU())
    model.add_module("conv2", nn.Conv2d(16, 32, 3, stride=2, padding=1))
    model.add_module("act2", nn.ReLU())
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(32, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    watch = gw.GradWatch(
        model,
        clip=gw.ClipUnitwise(0.01, exclude=model.head),
        on_nonfinite="skip",
        sinks=[gw.ConsoleSink(every=100)],
    ).attach(optimizer)

    for _ in range(args.steps):
        x, y = images(32, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # gradwatch checks, clips unit-wise, skips the step on NaN/Inf

    with torch.no_grad():
        x, y = images(256, generator)
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    summary = watch.close()
    print(f"accuracy {accuracy:.0%}; clipped {summary.clipped_steps} of {summary.steps} steps")


if __name__ == "__main__":
    main()
