"""gradwatch under FSDP2 + tensor parallel on a 2-D dp × tp mesh, on CPU with gloo.

    torchrun --nproc-per-node 4 examples/fsdp2_tp.py --steps 60

Each block's first ``Linear`` is split by columns and its second by rows over ``tp``
(``parallelize_module``), then every block is sharded over ``dp`` (``fully_shard``); the output
layer is only FSDP-sharded. Parameters thus live on two meshes with mixed placements (a
row-parallel bias is replicated over ``tp``). gradwatch reduces them all to the full gradients'
norms in one all-reduce per step, counting each shard once, so DTensor never warns about
sequential all-reduces; the tensor-parallel ranks of a ``dp`` group see the same batch.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import gradwatch as gw


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(x)))


def train(steps: int) -> None:
    """Train for ``steps`` steps in the running process group (one per rank)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = nn.Sequential(Block(32), Block(32), nn.Linear(32, 1))
    for block in model[:2]:
        parallelize_module(block, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(1.0), sinks=[gw.ConsoleSink(every=20)])
    watch.attach(optimizer)
    generator = torch.Generator().manual_seed(mesh["dp"].get_local_rank())  # per dp group
    for _ in range(steps):
        x = torch.randn(16, 32, generator=generator)
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
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
