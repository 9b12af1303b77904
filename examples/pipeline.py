"""gradwatch under pipeline parallelism (``torch.distributed.pipelining``), on CPU with gloo.

    torchrun --nproc-per-node 4 examples/pipeline.py --steps 60

Each rank holds one stage: the model's layers it owns, under their model-wide names
(``layers.2.weight`` on stage 2). With ``pipeline_group`` the watchers exchange their norms in
one all-reduce per step, so every stage reports the global norm over the whole model,
``ClipNorm`` scales every stage by the same factor (as ``clip_grad_norm_`` on one process
running the whole model), and ``on_nonfinite="skip"`` skips the step on every stage together.
Rank 0 (the default ``log_rank``) prints every stage's layers.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

import gradwatch as gw


class Stack(nn.Module):
    """A layer stack that keeps its layers' names when split into stages (torchtitan's way)."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): nn.Linear(width, width) for i in range(depth)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = torch.tanh(layer(x))
        return x


def train(steps: int) -> None:
    """Train for ``steps`` steps in the running process group (one per rank)."""
    stage_index, stages = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same full model everywhere; each stage keeps its part
    model = Stack(32, 2 * stages)
    for name in list(model.layers):
        if int(name) // 2 != stage_index:
            del model.layers[name]
    stage = PipelineStage(model, stage_index, stages, torch.device("cpu"))
    schedule = ScheduleGPipe(stage, n_microbatches=4, loss_fn=nn.functional.mse_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = gw.GradWatch(
        model,
        clip=gw.ClipNorm(1.0),
        on_nonfinite="skip",
        pipeline_group=dist.group.WORLD,  # or mesh["pp"] on a pp × dp mesh
        sinks=[gw.ConsoleSink(every=20)],  # on rank 0, with every stage's layers
    ).attach(optimizer)
    generator = torch.Generator().manual_seed(0)  # the first stage feeds, the last scores
    for _ in range(steps):
        x = torch.randn(16, 32, generator=generator)
        target = x.roll(1, dims=1)
        optimizer.zero_grad()
        if stage_index == 0:
            schedule.step(x)
        elif stage_index == stages - 1:
            schedule.step(target=target)
        else:
            schedule.step()
        optimizer.step()
    summary = watch.close()
    if stage_index == 0:
        print(f"global norm over {stages} stages at the last step: {summary.global_last:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    train(args.steps)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
