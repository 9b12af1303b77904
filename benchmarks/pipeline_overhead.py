"""gradwatch's check() under pipeline parallelism vs clipping by hand the torchtitan way.

    torchrun --nproc-per-node 4 benchmarks/pipeline_overhead.py [--quick] [--tensors N]

Each rank is one pipeline stage holding ``--tensors`` parameter tensors (Linear layers). On the
same existing gradients, rounds alternate between

* ``manual``: what a pipeline trainer writes without gradwatch (torchtitan's
  ``clip_grad_norm_(..., pp_mesh)``): ``get_total_norm`` of the stage, an all-reduce of its square
  over the pipeline group, ``clip_grads_with_norm_``;
* ``check``: ``watch.check()`` with ``ClipNorm`` and ``pipeline_group`` (no sinks): the same
  clipping, plus every parameter's norm, NaN/Inf and spike detection, and every stage's
  per-parameter norms carried in the same all-reduce.

Rank 0 prints, for each pair timed side by side, the median time per call and the median ratio
with its interquartile range over the rounds:

* ``check`` vs ``manual``: the whole step cost;
* their local parts (``check()`` without ``pipeline_group``, ``manual`` without the all-reduce):
  what gradwatch itself adds;
* an all-reduce of gradwatch's payload (one number per stage, the loss and how many stages had
  one, every stage's parameter norms) vs of one number: what the exchange costs on this backend.

A measurement, not a test: it exits 0 whatever it measures. gloo on CPU is a poor model of NCCL
on GPUs, where an all-reduce of a few kilobytes costs what one of four bytes does (both are
latency-bound); on gloo the size matters, and on an oversubscribed machine wildly.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

import gradwatch as gw


def _stage(tensors: int, width: int) -> nn.Module:
    layers = [nn.Linear(width, width) for _ in range(max(1, tensors // 2))]
    return nn.Sequential(*layers)


def _manual(params: list[torch.Tensor], max_norm: float, group: dist.ProcessGroup | None) -> None:
    """torchtitan's pipeline clipping; without the all-reduce when ``group`` is None."""
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads).pow(2)
    if group is not None:
        dist.all_reduce(total, group=group)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=200, help="parameter tensors per stage")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=20, help="calls timed per round")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few rounds")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.calls = 3, 3
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    torch.manual_seed(dist.get_rank())
    model = _stage(args.tensors, args.width)
    params = list(model.parameters())
    model(torch.randn(8, args.width)).pow(2).mean().backward()
    saved = [p.grad.clone() for p in params]
    max_norm = 1e9  # never clips: the gradients stay the same in every round
    watch = gw.GradWatch(model, clip=gw.ClipNorm(max_norm), sinks=[], pipeline_group=group)
    local = gw.GradWatch(model, clip=gw.ClipNorm(max_norm), sinks=[])
    payload = dist.get_world_size() + 2 + dist.get_world_size() * len(params)  # + the loss
    one, sent = torch.zeros(1), torch.zeros(payload)
    variants: dict[str, Callable[[], object]] = {
        "check": watch.check,
        "manual": lambda: _manual(params, max_norm, group),
        "local check": local.check,
        "local manual": lambda: _manual(params, max_norm, None),
        f"all-reduce of {payload}": lambda: dist.all_reduce(sent, group=group),
        "all-reduce of 1": lambda: dist.all_reduce(one, group=group),
    }
    pairs = [tuple(list(variants)[i : i + 2]) for i in range(0, len(variants), 2)]

    def run(variant: str) -> float:
        call = variants[variant]
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.calls):
            call()
        watch.flush()
        local.flush()
        return (time.perf_counter() - start) / args.calls

    for variant in variants:  # warm-up
        run(variant)
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_ in range(args.rounds):
        for pair in pairs:
            for variant in pair if round_ % 2 == 0 else pair[::-1]:
                times[variant].append(run(variant))
    for p, g in zip(params, saved):
        assert torch.equal(p.grad, g), "the gradients changed: the benchmark would be unfair"
    watch.close()
    local.close()
    if dist.get_rank() == 0:
        stages = dist.get_world_size()
        print(
            f"pipeline parallel, {stages} stages x {len(params)} tensors, gloo, "
            f"{torch.get_num_threads()} thread(s), {args.rounds} rounds x {args.calls} calls"
        )
        for first, second in pairs:
            ratios = [a / b for a, b in zip(times[first], times[second])]
            q1, median, q3 = _quartiles(ratios)
            print(
                f"  {first:>22} {statistics.median(times[first]) * 1e3:8.3f} ms  vs  "
                f"{second:<16} {statistics.median(times[second]) * 1e3:8.3f} ms  "
                f"ratio {median:.2f}x (IQR {q1:.2f}-{q3:.2f})"
            )
    dist.destroy_process_group()


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4)
    return q1, median, q3


if __name__ == "__main__":
    main()
