"""gradwatch under FSDP2 (``fully_shard``), on CPU with gloo.

    torchrun --nproc-per-node 2 examples/fsdp2.py --steps 60

Parameters and gradients are DTensor shards; gradwatch reports the norms of the *full* gradients
(one all-reduce per step for all parameters) under the parameters' original names, and its
``ClipNorm`` equals ``torch.nn.utils.clip_grad_norm_`` on the sharded model.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import gradwatch as gw


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(4)])
    for block in model:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(1.0), sinks=[gw.ConsoleSink(every=20)])
    watch.attach(optimizer)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        x = torch.randn(16, 64, generator=generator)
        loss = nn.functional.mse_loss(model(x), x.roll(1, dims=1))
        optimizer.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        optimizer.step()
    watch.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
