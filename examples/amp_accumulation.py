"""Mixed precision and gradient accumulation, single process on CPU.

    python examples/amp_accumulation.py --steps 30

bf16 autocast with a GradScaler (on CPU, ``GradScaler("cpu")``): ``attach(optimizer,
scaler=scaler)`` makes gradwatch check the *unscaled* gradients, once per optimizer step on the
accumulated gradient, and report the steps the scaler skips. ``track_micro_batches=True`` records
each micro-batch's gradient norm, so a single bad micro-batch can be found.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradwatch as gw

ACCUMULATION = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    watch = gw.GradWatch(
        model, clip=gw.ClipNorm(1.0), track_micro_batches=True, sinks=[gw.ConsoleSink(every=10)]
    ).attach(optimizer, scaler=scaler)
    for _ in range(args.steps):
        optimizer.zero_grad()
        for _ in range(ACCUMULATION):
            x = torch.randn(16, 32)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(x), x.mean(dim=1, keepdim=True))
            with watch.backward(loss=loss):
                scaler.scale(loss / ACCUMULATION).backward()
        scaler.step(optimizer)  # unscales, then gradwatch checks, then the optimizer steps
        scaler.update()
    last = watch.history[-1]
    print(
        f"last step: norm {last.global_norm:.3g}, scale {last.scale}, micro-batch norms "
        + ", ".join(f"{n:.3g}" for n in last.micro_batch_norms)
    )
    watch.close()


if __name__ == "__main__":
    main()
