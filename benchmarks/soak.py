"""Soak test: train a small model for many steps under gradwatch and print memory growth.

gradwatch promises memory O(parameters + window), flat over a run of any length: the history,
the statistics ring, the detectors, the aggregators and every sink are bounded. This script trains
a small MLP for ``--steps`` optimizer steps with everything switched on (clipping, NaN skipping,
spike detection, micro-batch norms, a JSONL log and a console sink), injecting a NaN every 997
steps and a gradient spike every 1009 steps, and prints every ``--every`` steps:

* the resident set size (RSS) of the process and its change over the window,
* the number of Python objects tracked by the garbage collector, and of live torch tensors.

The first window is warm-up (caches, allocator pools, bounded buffers filling up); the verdict
looks at the windows after it. Exit code 0 unless ``--max-growth-kib`` is given and the largest
RSS growth of a window after warm-up exceeds it (``tests/test_resources.py`` runs the 100k-step
soak that way behind ``-m slow``).

Usage::

    python benchmarks/soak.py                      # 100k steps, a report every 10k (minutes)
    python benchmarks/soak.py --steps 20000 --every 2000
    python benchmarks/soak.py --max-growth-kib 1024
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

import gradwatch as gw
from gradwatch.report.jsonl import JsonlSink


def rss_kib() -> float:
    """Current resident set size in KiB (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1024
    except (OSError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if sys.platform == "darwin" else float(peak)


def live_objects() -> tuple[int, int]:
    """(objects tracked by the garbage collector, live torch tensors) after a full collection."""
    gc.collect()
    objects = gc.get_objects()
    return len(objects), sum(1 for o in objects if issubclass(type(o), torch.Tensor))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100_000, help="optimizer steps (100000)")
    parser.add_argument("--every", type=int, default=10_000, help="steps per report (10000)")
    parser.add_argument("--width", type=int, default=32, help="MLP width (32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument(
        "--max-growth-kib",
        type=float,
        default=None,
        help="exit 1 if a window after warm-up grows RSS by more than this many KiB",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("steps", "every", "width", "threads"):
        if getattr(args, name) < 1:
            _parser().error(f"--{name} must be an int >= 1, got {getattr(args, name)}")
    if args.steps < 2 * args.every:
        _parser().error(
            f"--steps must be at least 2 * --every, got {args.steps} < {2 * args.every}"
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    width = args.width
    model = nn.Sequential(
        nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    data = torch.randn(64, width)
    tmp = tempfile.TemporaryDirectory(prefix="gradwatch-soak-")
    log = Path(tmp.name) / "soak.jsonl"
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed at the end
    watch = gw.GradWatch(
        model,
        clip=gw.ClipNorm(1.0),
        on_nonfinite="skip",
        track_micro_batches=True,
        sinks=[JsonlSink(log, every=10), gw.ConsoleSink(every=1000, console=Console(file=devnull))],
    ).attach(optimizer)

    print(
        f"gradwatch {gw.__version__}, torch {torch.__version__}, {args.steps} steps, width {width}"
    )
    print(f"{'steps':>8} {'s/10k':>7} {'RSS MiB':>9} {'dRSS KiB':>9} {'objects':>9} {'tensors':>8}")
    rows: list[tuple[int, float, int, int]] = []
    objects, tensors = live_objects()
    rows.append((0, rss_kib(), objects, tensors))
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        batch = data[(step * 8) % 64 : (step * 8) % 64 + 8]
        loss = model(batch).pow(2).mean()
        with watch.backward(loss=loss):
            loss.backward()
        if step % 997 == 0:
            model[0].weight.grad[0, 0] = math.nan
        elif step % 1009 == 0:
            model[2].weight.grad.mul_(100.0)
        optimizer.step()
        if step % args.every == 0:
            elapsed = time.perf_counter() - start
            objects, tensors = live_objects()
            rows.append((step, rss_kib(), objects, tensors))
            grown = rows[-1][1] - rows[-2][1]
            print(
                f"{step:>8} {elapsed / step * 10_000:>7.2f} {rows[-1][1] / 1024:>9.1f} "
                f"{grown:>9.0f} {objects:>9} {tensors:>8}",
                flush=True,
            )
    summary = watch.close()
    devnull.close()
    lines = log.read_text().count("\n")
    tmp.cleanup()

    after = rows[1:]  # windows after the first (warm-up) one
    growth = [b[1] - a[1] for a, b in itertools.pairwise(after)]
    per_10k = [g * 10_000 / args.every for g in growth]
    print(
        f"run: {summary.steps} steps, {summary.skipped_steps} skipped, {summary.spikes} spikes, "
        f"{lines} log lines"
    )
    objects = [row[2] for row in after]
    tensors = [row[3] for row in after]
    print(
        f"after warm-up: RSS growth per 10k steps mean {sum(per_10k) / len(per_10k):.0f} KiB, "
        f"max {max(per_10k):.0f} KiB; objects {min(objects)}..{max(objects)}; "
        f"tensors {min(tensors)}..{max(tensors)}"
    )
    if args.max_growth_kib is not None and max(per_10k) > args.max_growth_kib:
        print(f"FAIL: RSS grew by more than {args.max_growth_kib:g} KiB per 10k steps")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
