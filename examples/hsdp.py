"""gradwatch under HSDP (FSDP2 ``fully_shard`` on a 2-D replicate × shard mesh), on CPU with gloo.

    torchrun --nproc-per-node 4 examples/hsdp.py --steps 60

Each parameter is sharded over the ``shard`` dimension and replicated over ``replicate``.
gradwatch reports the norms of the *full* gradients under the original names, equal to one
process on the four ranks' batches, in one all-reduce per step: a shard is counted once, by
the replica at coordinate 0 of the ``replicate`` dimension. ``ClipNorm`` clips every shard by
the same factor.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gradwatch as gw


def train(steps: int) -> None:
    """Train for ``steps`` steps in the running process group (one per rank)."""
    rank = dist.get_rank()
    mesh = init_device_mesh(
        "cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard")
    )
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(4)])
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(1.0), sinks=[gw.ConsoleSink(every=20)])
    watch.attach(optimizer)
    generator = torch.Generator().manual_seed(rank)  # each rank its own data
    for _ in range(steps):
        x = torch.randn(16, 64, generator=generator)
        loss = nn.functional.mse_loss(model(x), x.roll(1, dims=1))
        optimizer.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        optimizer.step()
    watch.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    train(args.steps)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
