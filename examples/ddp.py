"""gradwatch under DistributedDataParallel, on CPU with gloo.

    torchrun --nproc-per-node 2 examples/ddp.py --steps 60

Every rank checks the synchronised (averaged) gradients, so the numbers are identical everywhere;
only rank 0 prints. ``rank_blame=True`` names the rank a NaN came from, and ``on_nonfinite="skip"``
skips the step on every rank together.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn

import gradwatch as gw


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    watch = gw.GradWatch(
        ddp,
        clip=gw.ClipNorm(1.0),
        on_nonfinite="skip",
        rank_blame=True,
        sinks=[gw.ConsoleSink(every=20)],
    ).attach(optimizer)
    generator = torch.Generator().manual_seed(rank)  # each rank its own data
    for _ in range(args.steps):
        x = torch.randn(32, 16, generator=generator)
        loss = nn.functional.mse_loss(ddp(x), x.sum(dim=1, keepdim=True))
        optimizer.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        optimizer.step()
    watch.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
