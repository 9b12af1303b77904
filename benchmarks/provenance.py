"""What NaN/Inf provenance costs: gradwatch's forensics vs ``torch.autograd.detect_anomaly``.

On the same models as ``overhead.py`` (a deep MLP, a small GPT, an LSTM language model), it times a
full training step (zero_grad, forward, backward, AdamW step) four ways, interleaved:

* ``bare``: the step alone (the baseline);
* ``watch``: with ``GradWatch(model, sinks=[]).attach(opt)`` — provenance from the backward
  arrival order only (which parameter a NaN/Inf reached first);
* ``forensics``: with ``GradWatch(model, forensics=True, sinks=[]).attach(opt)`` — also the first
  module whose activation (forward order) or backpropagated signal (backward order) went
  non-finite, and per-module signal norms for the diagnosis;
* ``anomaly``: the bare step inside ``torch.autograd.detect_anomaly()``, torch's own tool for the
  same question (it records a traceback for every forward op and checks every backward output
  for NaN).

It prints the median of per-round ratios with their interquartile range, and
``forensics / watch``: what forensics adds to a monitored step. Target: forensics <= 1.10x the
monitored step (``watch``); anomaly mode is known to cost 1.2-2.4x. It also prints
``anomaly / forensics``: how many times cheaper gradwatch's answer is.

Then it checks what each tool *finds* on a step whose backward overflows to Inf (the loss is
finite; the 20-layer gain-2.34 network's backpropagated signal grows ×2.34 per layer until it
overflows): anomaly mode raises only on NaN, so it lets the Inf through; gradwatch names it.

Run ``python benchmarks/provenance.py`` (about 1-2 min on 2 CPU cores), ``--quick`` for a smoke
run, ``--models mlp`` for a subset, ``--threads N``. Always exits 0: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import (
    SPECS,
    Spec,
    _contention,
    _cpu_snapshot,
    _make,
    _quantile,
    interleaved,
)

import gradwatch
from gradwatch.demo import exploding_mlp

MODELS = ("mlp", "gpt", "lstm")
FORENSICS_TARGET = 1.10
ANOMALY_RANGE = (1.2, 2.4)


def _trainer(model: nn.Module, spec: Spec, batch: tuple[torch.Tensor, ...]) -> tuple:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        spec.loss(model(batch[0]), batch).backward()
        opt.step()

    return opt, step


def _anomaly(step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with torch.autograd.detect_anomaly():
            step()

    return run


def bench(key: str, args: argparse.Namespace) -> list[tuple[str, list[float], float, float]]:
    """Times the four variants on one model; returns (label, ratios, base ms, variant ms)."""
    spec = SPECS[key]
    device = torch.device("cpu")
    torch.manual_seed(2)
    batch = spec.batch(device)
    models = {name: _make(spec, device) for name in ("bare", "watch", "forensics", "anomaly")}
    steps = {}
    watches = []
    for name, model in models.items():
        opt, step = _trainer(model, spec, batch)
        if name == "watch":
            watches.append(gradwatch.GradWatch(model, sinks=[]).attach(opt))
        elif name == "forensics":
            watches.append(gradwatch.GradWatch(model, forensics=True, sinks=[]).attach(opt))
        steps[name] = _anomaly(step) if name == "anomaly" else step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode warns on every entry
        timing = interleaved(
            steps,
            device,
            budget=args.budget,
            min_rounds=args.min_rounds,
            max_rounds=200,
            block=0.05,
            warmup=args.warmup,
        )
    for watch in watches:
        watch.close()
    base = timing.median_ms("bare")
    rows = [
        (label, timing.ratios(label, "bare"), base, timing.median_ms(label))
        for label in ("watch", "forensics", "anomaly")
    ]
    rows.append(
        (
            "forensics/watch",
            timing.ratios("forensics", "watch"),
            timing.median_ms("watch"),
            timing.median_ms("forensics"),
        )
    )
    rows.append(
        (
            "anomaly/forensics",
            timing.ratios("anomaly", "forensics"),
            timing.median_ms("forensics"),
            timing.median_ms("anomaly"),
        )
    )
    return rows


def hook_share(key: str, steps: int) -> str:
    """Time spent inside gradwatch's forensics code per step, as a share of the step.

    Measured within the same steps (each hook and the per-check capture timed around its call),
    so unlike the paired ratios it barely depends on what else the machine is doing.
    """
    from gradwatch.collect import activations, forensics

    spent = [0.0]
    inside = [False]  # a timed call made by another timed call is counted once
    patched = []
    for cls, name in (
        (activations._Recorder, "record"),  # every module call of the model
        (activations._CallBuffer, "record"),  # and every backward signal
        (forensics.StepProbe, "capture"),
    ):
        original = getattr(cls, name)

        def timed(self, *args, _original=original, **kwargs):
            if inside[0]:
                return _original(self, *args, **kwargs)
            inside[0] = True
            start = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
                inside[0] = False

        patched.append((cls, name, original))
        setattr(cls, name, timed)
    try:
        spec = SPECS[key]
        torch.manual_seed(2)
        batch = spec.batch(torch.device("cpu"))
        model = _make(spec, torch.device("cpu"))
        opt, step = _trainer(model, spec, batch)
        watch = gradwatch.GradWatch(model, forensics=True, sinks=[]).attach(opt)
        for _ in range(2):
            step()
        spent[0] = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total = time.perf_counter() - start
        watch.close()
    finally:
        for cls, name, original in patched:
            setattr(cls, name, original)
    share = spent[0] / total
    return (
        f"{key:<5} time inside the forensics hooks and capture: {spent[0] / steps * 1e3:.2f} ms "
        f"of a {total / steps * 1e3:.1f} ms step = {share:.1%} (n={steps})"
    )


def inf_check() -> list[str]:
    """What each tool reports on a step whose backward overflows to Inf (finite loss)."""
    torch.manual_seed(0)
    model = exploding_mlp()
    x = torch.full((8, 4), 2.34**-20)
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.autograd.detect_anomaly():
                loss = model(x).square().mean() * 1e35
                loss.backward()
            bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
            lines.append(
                f"detect_anomaly: no error; loss {loss.item():.3g}, {len(bad)} parameters hold "
                "Inf gradients (anomaly mode checks for NaN only)"
            )
        except RuntimeError as err:
            lines.append(f"detect_anomaly: raised {str(err).splitlines()[0]}")
    model.zero_grad()
    events: list[gradwatch.Event] = []

    class Events(gradwatch.Sink):
        def write(self, record: object) -> None:
            if isinstance(record, gradwatch.Event):
                events.append(record)

    watch = gradwatch.GradWatch(model, forensics=True, sinks=[Events()])
    loss = model(x).square().mean() * 1e35
    with watch.backward(loss=loss):
        loss.backward()
    watch.close()
    lines.append("gradwatch (forensics=True): " + (events[0].message if events else "nothing"))
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {MODELS}")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8))
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.quick:
        args.budget, args.min_rounds, args.warmup = 1.0, 3, 1
    else:
        args.budget, args.min_rounds, args.warmup = 15.0, 9, 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load = _cpu_snapshot()
    print("gradwatch provenance benchmark" + (" (--quick: ratios are noisy)" * args.quick))
    print(
        f"  gradwatch {gradwatch.__version__} | torch {torch.__version__} | cpu, "
        f"{torch.get_num_threads()} threads | AdamW step, ratios are medians of paired rounds"
    )
    head = f"{'model':<5} {'variant':<44} {'base ms':>8} {'ms':>8}  {'ratio':>6} {'[p25-p75]':<13}"
    print("\n" + head + "\n" + "-" * len(head))
    names = {
        "watch": "GradWatch() vs bare step",
        "forensics": "GradWatch(forensics=True) vs bare step",
        "forensics/watch": "GradWatch(forensics=True) vs GradWatch()",
        "anomaly": "torch.autograd.detect_anomaly() vs bare step",
        "anomaly/forensics": "detect_anomaly vs GradWatch(forensics=True)",
    }
    for key in args.models:
        started = time.perf_counter()
        for label, ratios, base, ms in bench(key, args):
            lo, hi = _quantile(ratios, 0.25), _quantile(ratios, 0.75)
            note = ""
            if label == "forensics/watch":
                note = f"  target <={FORENSICS_TARGET:.2f}: " + (
                    "PASS" if hi <= FORENSICS_TARGET else "MISS" if lo > FORENSICS_TARGET else "~"
                )
            elif label == "anomaly":
                low, high = ANOMALY_RANGE
                note = f"  (known: {low}-{high}x)"
            print(
                f"{key:<5} {names[label]:<44} {base:>8.2f} {ms:>8.2f}  "
                f"{statistics.median(ratios):>5.3f}x [{lo:.3f}-{hi:.3f}]{note}  (n={len(ratios)})"
            )
        print(f"      ({time.perf_counter() - started:.0f}s)")
    print("\nForensics cost measured inside the step (robust to machine load):")
    for key in args.models:
        print("  " + hook_share(key, 3 if args.quick else (40 if key == "mlp" else 6)))
    print("\nInf in backward (finite loss), the 20-layer gain-2.34 network, loss x 1e35:")
    for line in inf_check():
        print("  " + line)
    contention = _contention(load)
    if contention:
        print("\n" + contention)
    return 0


if __name__ == "__main__":
    sys.exit(main())
