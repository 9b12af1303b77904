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
    report = commands.add_parser("report", help="summarise a JSONL run log (and plot it)")
    report.add_argument("log", help="a run log written by gradwatch.JsonlSink")
    report.add_argument(
        "--plot",
        metavar="FIGURE",
        help="write a figure, PNG, SVG or PDF after the name's suffix (needs gradwatch[plot])",
    )
    report.add_argument("--html", metavar="HTML", help="write an HTML report")
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
    from gradwatch.report.view import run_report

    return run_report(args.log, plot=args.plot, html=args.html)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def _file_in_the_way(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included) when it is not a folder."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None
