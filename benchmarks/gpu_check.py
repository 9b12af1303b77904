"""What only a CUDA device can prove about gradwatch's hot path, checked and printed in one table.

On CPU a "host sync" can only be counted as a call that would read a device value (tests/
test_sync.py does that). On a GPU this script checks the real thing:

* **zero host syncs**: a default watcher (``GradWatch(model).attach(opt)``, console sink) runs a
  few hundred training steps of the small GPT under ``torch.cuda.set_sync_debug_mode("error")``,
  which raises on any synchronising call. The bare step is run the same way first, so a sync in
  torch's own step is not blamed on gradwatch.
* **every step delivered**: the stats rows reach the host through a pinned-memory mirror and
  CUDA events, without waiting. A counting sink sees every step, in order, before the run is
  flushed (all but the last few, still in flight), and each reported global norm equals
  ``torch.nn.utils.get_total_norm`` of that step's gradients, kept on the device.
* **cost**: ``check()`` with ``ClipNorm(1.0)`` vs ``clip_grad_norm_`` alone, and a monitored
  training step vs the bare step, on the four benchmark models of ``benchmarks/overhead.py``.

Run ``python benchmarks/gpu_check.py`` (``--quick`` for fewer repetitions, ``--steps N``,
``--models gpt,mlp``). Without a CUDA device it prints one line saying so and exits 0. On CUDA
it exits 1 if a sync or a lost step was found (the ratios are measurements and never fail it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

NO_CUDA = "gpu_check: no CUDA device found; nothing to check here (run on a GPU machine)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="steps under sync checking")
    parser.add_argument("--quick", action="store_true", help="few timing repetitions")
    parser.add_argument("--models", default="mlp,gpt,lstm,tiny", help="benchmark models to time")
    args = parser.parse_args(argv)
    if args.steps < 10:
        parser.error(f"--steps must be >= 10, got {args.steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    import overhead  # the benchmark models and the timing harness

    device = torch.device("cuda")
    timing = overhead.parse_args([*(["--quick"] * args.quick), "--models", args.models])
    rows: list[tuple[str, str, str, str, str]] = []
    failed = False
    spec = overhead.SPECS["gpt"]
    sync = _sync_free(overhead, spec, device, args.steps)
    rows.append(("zero host syncs (sync debug mode: error)", "gpt", *sync))
    delivery = _delivered(overhead, spec, device, args.steps)
    rows.append(("every step delivered (pinned mirror + events)", "gpt", *delivery))
    failed = sync[-1] == "FAIL" or delivery[-1] == "FAIL"
    for key in timing.models:
        spec = overhead.SPECS[key]
        model = overhead._make(spec, device)
        params = [p for p in model.parameters() if p.requires_grad]
        setup = overhead.Setup(spec, device, sum(p.numel() for p in params), len(params))
        del model, params
        for row in overhead.bench_check(setup, timing)[:1] + overhead.bench_step(setup, timing)[1:]:
            target = row.target if row.target is not None else row.info_target
            shown = "-" if target is None else f"<={target:.2f}" + ("" if row.target else "*")
            rows.append((row.measure, key, f"{row.ratio:.3f}x", shown, row.verdict()))
    print(f"gradwatch GPU check on {torch.cuda.get_device_name(device)}")
    head = f"{'check':<55} {'model':<5} {'result':<34} {'target':<7} verdict"
    print(head)
    print("-" * len(head))
    for check, model, result, target, verdict in rows:
        print(f"{check:<55} {model:<5} {result:<34} {target:<7} {verdict}")
    print("target * = for information only; ratio = median of paired per-round ratios")
    return 1 if failed else 0


def _sync_free(
    overhead: object, spec: object, device: torch.device, steps: int
) -> tuple[str, str, str]:
    """(result, target, verdict) for the default watcher's steps under sync debug mode."""
    import gradwatch

    model = overhead._make(spec, device)  # type: ignore[attr-defined]
    batch = spec.batch(device)  # type: ignore[attr-defined]
    opt, step = overhead._trainer(model, spec, batch)  # type: ignore[attr-defined]
    bare = _first_sync(step, 3)
    if bare is not None:
        return f"n/a: the bare step syncs ({bare})"[:34], "0", "n/a"
    with overhead._devnull_stdout():  # type: ignore[attr-defined]
        watch = gradwatch.GradWatch(model).attach(opt)
        for _ in range(3):  # warm-up outside the check (allocations, first emission)
            step()
        found = _first_sync(step, steps)
        watch.close()
    if found is None:
        return f"0 syncs in {steps} steps", "0", "PASS"
    return f"sync: {found}"[:34], "0", "FAIL"


def _first_sync(step: object, steps: int) -> str | None:
    """The first synchronising call's message within ``steps`` calls of ``step``, or None."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    done = 0
    try:
        for _ in range(steps):
            step()  # type: ignore[operator]
            done += 1
    except RuntimeError as error:
        return f"step {done}: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return None


def _delivered(
    overhead: object, spec: object, device: torch.device, steps: int
) -> tuple[str, str, str]:
    """(result, target, verdict): every step reached the sinks, on time and with true norms."""
    import gradwatch

    class Counting(gradwatch.Sink):
        def __init__(self) -> None:
            self.steps: list[int] = []
            self.norms: list[float] = []

        def write(self, record: object) -> None:
            if isinstance(record, gradwatch.StepReport):
                self.steps.append(record.step)
                self.norms.append(record.global_norm)

    model = overhead._make(spec, device)  # type: ignore[attr-defined]
    batch = spec.batch(device)  # type: ignore[attr-defined]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sink = Counting()
    watch = gradwatch.GradWatch(model, sinks=[sink], history=steps).attach(opt)
    expected = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        spec.loss(model(batch[0]), batch).backward()  # type: ignore[attr-defined]
        expected.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        opt.step()
    early = len(sink.steps)  # delivered without waiting, before any flush
    watch.close()
    truth = torch.stack(expected).tolist()
    in_order = sink.steps == list(range(steps))
    close = all(abs(a - b) <= 1e-5 * max(abs(b), 1e-12) for a, b in zip(sink.norms, truth))
    result = f"{len(sink.steps)}/{steps}, {early} before flush"
    ok = in_order and close and early >= steps - 8
    if not close:
        result += ", norms differ"
    return result, "all", "PASS" if ok else "FAIL"


if __name__ == "__main__":
    sys.exit(main())
