"""How good is ``watch.diagnose()``? The diagnosis zoo: cause, place, live alert and fix, per run.

For every scenario of ``benchmarks/diagnosis_zoo.py`` (small real CPU training runs with a known
root cause, healthy runs among them) it

* validates the scenario with torch alone: the failure really happened (a gradient norm above
  1e14 at step 0, a loss non-finite by step k, zero gradients before a dead layer, a healthy loss
  that fell...). A scenario whose failure did not happen is ``INVALID``, never counted right;
* trains it again with ``GradWatch(model, sinks=[collector]).attach(opt)`` (or the loop's own
  ``watch.backward(loss=...)`` / ``watch.check(loss=...)``) and reads ``watch.diagnose()``;
* judges it: a failing run is right when its first ``"error"``/``"warning"`` finding names the
  expected cause (and one of the acceptable places, where the place is judged); a healthy run is
  right when there is no such finding and no alarm event (NaN/Inf, spike, loss spike, dead,
  unused); a redundant-bias run also needs an ``"info"`` finding naming the bias;
* ``live``: the first alarm event of the run and its ``Event.cause`` (``ok`` when it is the
  expected cause): what a person watching the console learns while it happens;
* ``fix``: for scenarios with a fix check, re-runs with the diagnosis's ``suggested`` setting
  (``lr``, ``max_norm`` as ``ClipNorm``, ``on_spike="skip"``) and says whether the run then
  recovers (finite, loss falling, measured with torch).

It prints one row per scenario, a confusion table (expected cause x diagnosed cause), the false
alarms on healthy runs, the wrong ones with why, and ``N/M right``.

Run ``python benchmarks/diagnosis.py`` (about 40 s on one CPU thread), ``--fast`` for the scenarios
the tests run, ``--only NAME ...`` for some, ``--signatures`` to also print what each scenario
validated (its numbers). Exits 0 whatever it measures (a measurement, not a test); ``--strict``
exits 1 if any scenario is wrong or invalid.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diagnosis_zoo import SCENARIOS, Invalid, Scenario, judge

import gradwatch as gw


def _warm_up() -> None:
    """Pay torch's one-time costs (the first optimizer imports torch._dynamo) outside the rows."""
    p = torch.nn.Parameter(torch.zeros(1))
    torch.optim.SGD([p], lr=0.1).step()


def _measure(sc: Scenario) -> dict[str, str]:
    start = time.perf_counter()
    row = {
        "name": sc.name,
        "model": f"{sc.arch} / {sc.optimizer}",
        "expected": sc.expected_cause or "healthy",
    }
    try:
        row["signature"] = sc.validate()
    except Invalid as exc:
        row.update(
            diagnosed="-",
            severity="-",
            place="-",
            verdict="INVALID",
            live="-",
            fix="-",
            why=str(exc),
            signature=f"INVALID: {exc}",
        )
        row["seconds"] = f"{time.perf_counter() - start:.1f}"
        return row
    out = sc.run()
    verdict = judge(sc, out)
    row.update(
        diagnosed=verdict.cause or "none",
        severity=verdict.severity or "-",
        place=verdict.place or "-",
        verdict="right" if verdict.right else "WRONG",
        live=verdict.live,
        why=verdict.why,
        fix=sc.fix_result(out.diagnosis),
    )
    row["seconds"] = f"{time.perf_counter() - start:.1f}"
    return row


SHORT = {
    "learning_rate": "lr",
    "data": "data",
    "initialization": "init",
    "saturation": "satur",
    "recurrence": "recur",
    "forward_numerics": "fwd",
    "precision": "prec",
    "dead_units": "dead",
    "unused": "unusd",
    "redundant_bias": "rbias",
    "unknown": "unkn",
    "none": "none",
}
"""Short cause names for the confusion table's columns."""


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def _rows_text(rows: list[dict[str, str]]) -> str:
    """Two lines per scenario, so it reads at 100 columns: the verdict, then where and how."""
    sev = {"error": "err", "warning": "warn", "info": "info"}
    lines = [
        f"{'scenario':<33}{'expected':<17}{'diagnosed':<17}{'sev':<5}{'verdict':<8}{'fix':<16}"
        f"{'s':>4}",
        f"{'  arch / optimizer':<33}{'place named':<30}first alert event (live)",
        "-" * 100,
    ]
    for r in rows:
        fix = r["fix"].replace("max_norm", "clip").replace("no suggestion", "no sugg")
        fix = fix.replace(", ", ",")
        lines.append(
            f"{_fit(r['name'], 32):<33}{r['expected']:<17}{r['diagnosed']:<17}"
            f"{sev.get(r['severity'], '-'):<5}{r['verdict']:<8}{_fit(fix, 15):<16}"
            f"{r['seconds']:>4}"
        )
        lines.append(f"  {_fit(r['model'], 30):<31}{_fit(r['place'], 29):<30}{_fit(r['live'], 37)}")
    return "\n".join(lines)


def _confusion(rows: list[dict[str, str]]) -> str:
    valid = [r for r in rows if r["verdict"] != "INVALID"]
    expected = [c for c in (*gw.CAUSES, "healthy") if any(r["expected"] == c for r in valid)]
    diagnosed = [c for c in gw.CAUSES if any(r["diagnosed"] == c for r in valid)] + ["none"]
    counts = Counter((r["expected"], r["diagnosed"]) for r in valid)
    head = "".join(f"{SHORT.get(c, c):>6}" for c in diagnosed)
    lines = ["expected (rows) x diagnosed (columns)", f"{'':<17}{head}", "-" * (17 + len(head))]
    for e in expected:
        lines.append(f"{e:<17}" + "".join(f"{counts[(e, d)] or '.':>6}" for d in diagnosed))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="scenarios to run")
    parser.add_argument("--fast", action="store_true", help="only the scenarios tests run")
    parser.add_argument("--strict", action="store_true", help="exit 1 if anything is wrong")
    parser.add_argument("--signatures", action="store_true", help="print validated numbers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    chosen = [
        sc
        for sc in SCENARIOS
        if (not args.only or sc.name in args.only) and (sc.fast or not args.fast)
    ]
    if args.only and len(chosen) < len(args.only):
        known = {sc.name for sc in SCENARIOS}
        print(f"unknown scenario(s): {', '.join(sorted(set(args.only) - known))}")
        return 2
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # torch's and gradwatch's own warnings would drown the rows
    console = Console(width=100, highlight=False, markup=False, emoji=False)
    console.print(
        f"gradwatch {gw.__version__}, torch {torch.__version__}, {len(chosen)} scenarios, "
        f"{args.threads} thread(s)"
    )
    _warm_up()
    start = time.perf_counter()
    rows = []
    for sc in chosen:
        rows.append(_measure(sc))
        if not console.is_terminal:
            continue
        console.print(f"  {sc.name}: {rows[-1]['verdict']}", style="dim")
    console.print(_rows_text(rows))
    console.print(_confusion(rows))

    healthy_alarms = [
        r
        for r in rows
        if r["expected"] in ("healthy", "redundant_bias") and r["verdict"] == "WRONG"
    ]
    console.print(f"false alarms on healthy runs: {len(healthy_alarms)}")
    for r in healthy_alarms:
        console.print(f"  {r['name']}: {r['why']}")
    wrong = [r for r in rows if r["verdict"] != "right" and r not in healthy_alarms]
    if wrong:
        console.print("wrong or invalid:")
        for r in wrong:
            console.print(f"  {r['name']}: {r['verdict']} - {r['why']}")
    if args.signatures:
        console.print("validated (torch alone):")
        for r in rows:
            console.print(f"  {r['name']}: {r['signature']}")
    right = sum(r["verdict"] == "right" for r in rows)
    invalid = sum(r["verdict"] == "INVALID" for r in rows)
    fixes = [r["fix"] for r in rows if r["fix"] != "-"]
    fixed = sum(all(p.endswith("ok") for p in f.split(", ")) for f in fixes)
    live = [r for r in rows if r["expected"] not in ("healthy", "redundant_bias")]
    live_ok = sum(r["live"].startswith("ok") for r in live)
    console.print(
        f"{right}/{len(rows)} right ({invalid} invalid); live cause right {live_ok}/{len(live)}; "
        f"fixes that work {fixed}/{len(fixes)}; {time.perf_counter() - start:.0f} s"
    )
    return 1 if args.strict and right < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
