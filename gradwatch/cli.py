"""The ``gradwatch`` command: ``gradwatch demo`` and ``gradwatch report RUN.jsonl``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gradwatch._version import __version__

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch", description="See and control your PyTorch gradients."
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train the textbook exploding network, unprotected then clipped"
    )
    demo.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    demo.add_argument(
        "--log", default="gradwatch-demo.jsonl", help="JSONL run log to write (default %(default)s)"
    )
    report = commands.add_parser(
        "report",
        help="summarise a JSONL run log (and plot it); several logs are compared",
        description="Summarise a run log written by gradwatch.JsonlSink, or compare several: "
        "gradwatch report before.jsonl after.jsonl --plot compare.png",
    )
    report.add_argument(
        "logs", nargs="+", metavar="log", help="a run log written by gradwatch.JsonlSink"
    )
    report.add_argument(
        "--plot",
        metavar="FIGURE",
        help="write a figure, PNG, SVG or PDF after the name's suffix (needs gradwatch[plot]); "
        "with several logs, their loss and gradient norm overlaid",
    )
    report.add_argument(
        "--html", metavar="HTML", help="write a self-contained HTML report (one log)"
    )
    report.add_argument(
        "--run",
        type=int,
        default=-1,
        metavar="N",
        help="which run of a log holding several (appended): 0 the first, -1 the last (default)",
    )
    report.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="name of a log in the comparison (once per log, in order; default: file names)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 1:
            parser.error(f"--steps must be an int >= 1, got {args.steps}")
        if args.log:  # missing folders are created (as JsonlSink does); a file in the way is not
            blocker = _file_in_the_way(Path(args.log).resolve().parent)
            if blocker is not None:
                parser.error(f"argument --log: {str(blocker)!r} is a file, not a folder")
        from gradwatch.demo import run_demo

        return run_demo(steps=args.steps, log=args.log)
    if len(args.logs) > 1:
        if args.html is not None:
            print(
                "gradwatch report: error: --html takes one run log; to compare "
                f"{len(args.logs)} logs use --plot",
                file=sys.stderr,
            )
            return 2
        from gradwatch.report.compare import run_compare

        return run_compare(args.logs, plot=args.plot, run=args.run, labels=args.label)
    if args.label is not None:
        print(
            "gradwatch report: error: --label names the logs of a comparison; "
            "give two or more logs",
            file=sys.stderr,
        )
        return 2
    from gradwatch.report.view import run_report

    return run_report(args.logs[0], plot=args.plot, html=args.html, run=args.run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included) when it is not a folder."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None
