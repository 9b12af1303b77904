"""ConsoleSink: what it prints, asserted on captured text, alone and next to progress bars."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys

import pytest
import rich
import torch
from conftest import LONG_NAME, LongNames, train_steps
from rich.console import Console
from rich.progress import Progress
from torch import nn

import gradwatch as gw
from gradwatch.errors import ConfigTypeError
from gradwatch.records import Event

tqdm = pytest.importorskip("tqdm").tqdm


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(x)))


def _train(sink, steps=6, *, model=None, **kwargs):
    """``train_steps`` with one sink; returns the watcher's reports."""
    watch = train_steps(model if model is not None else _model(), [sink], steps, **kwargs)
    return list(watch.history)


def _logical(out: str) -> list[str]:
    """The printed lines, each window line whole again (its continuation lines are indented)."""
    lines: list[str] = []
    for line in out.splitlines():
        if lines and lines[-1].startswith("gradwatch steps") and line.startswith("  "):
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return lines


def _plain_console(**kwargs) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=100, **kwargs), buffer


def test_alerts_periodic_lines_and_final_table():
    console, buffer = _plain_console()
    history = _train(gw.ConsoleSink(every=3, console=console), nan_at=4)
    out = buffer.getvalue()
    lines = _logical(out)

    assert lines[0].startswith("gradwatch steps 0-2 | norm ")
    norms = [r.global_norm for r in history[:3]]
    assert f"max {max(norms):.4g})" in lines[0] and "nan steps 0" in lines[0]
    alert = next(line for line in lines if "⚠" in line)
    assert alert.startswith("gradwatch ⚠ step 4: NaN in the gradients")
    assert "first reached `2.weight`" in alert
    assert any(line.startswith("gradwatch steps 3-5 |") and "nan steps 1" in line for line in lines)
    assert "gradwatch summary: 6 steps" in out
    table_rows = [line for line in lines if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in table_rows] == ["0", "2"]
    assert "NaN/Inf started in: step 4: 2.weight" in out
    assert "\x1b[" not in out  # not a terminal: no colour or cursor codes


def test_terminal_output_is_coloured_and_ascii_output_is_plain():
    console, buffer = _plain_console(force_terminal=True, color_system="standard")
    _train(gw.ConsoleSink(every=0, console=console), nan_at=2, steps=3)
    assert "\x1b[1;31mgradwatch ⚠ step 2" in buffer.getvalue()  # bold red alert

    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    _train(gw.ConsoleSink(every=0, console=Console(file=stream, width=100)), nan_at=2, steps=3)
    stream.flush()
    text = raw.getvalue().decode("ascii")  # would raise on any non-ASCII byte
    assert "gradwatch ! step 2: NaN in the gradients" in text
    assert "gradwatch summary: 3 steps" in text and "| 2 " in text


def test_window_line_covers_every_step_not_the_last():
    console, buffer = _plain_console()
    history = _train(gw.ConsoleSink(every=5, console=console), steps=5, spike_at=1)
    line = next(x for x in _logical(buffer.getvalue()) if x.startswith("gradwatch steps"))
    assert f"norm {history[-1].global_norm:.4g} " in line
    assert f"max {history[1].global_norm:.4g})" in line  # the spike at step 1 of the window


def test_layer_depth_and_row_folding():
    console, buffer = _plain_console()
    _train(gw.ConsoleSink(every=2, console=console, layer_depth=1), steps=2, model=_Net())
    top = _logical(buffer.getvalue())[0].split("top: ")[1]
    assert {part.split(" ")[0] for part in top.split(", ")} == {"`encoder`", "`head`"}

    console, buffer = _plain_console()
    _train(gw.ConsoleSink(every=0, console=console, max_rows=2), steps=2, model=_Net())
    out = buffer.getvalue()
    assert "... 1 more layers" in out


def test_quiet_options():
    console, buffer = _plain_console()
    _train(gw.ConsoleSink(every=0, alerts=False, console=console), nan_at=1, steps=3)
    out = buffer.getvalue()
    assert "⚠" not in out and "gradwatch steps" not in out
    assert "gradwatch summary: 3 steps" in out


def test_tqdm_bar_is_cleared_and_redrawn_around_each_line():
    buffer = io.StringIO()
    console = Console(file=buffer, width=100)
    bar = tqdm(total=6, file=buffer, mininterval=0, ascii=True, ncols=60)
    _train(gw.ConsoleSink(every=3, console=console), nan_at=4, each_step=bar.update)
    bar.close()
    out = buffer.getvalue()
    alert = re.search(r"\r(gradwatch ⚠ step 4: [^\r\n]*)\n\r *\d+%\|", out)
    assert alert is not None, out  # on its own line, then the bar drawn again below it
    assert "|" not in alert.group(1).split("`2.weight`")[0]  # no bar text inside the line
    assert re.search(r"\rgradwatch steps 0-2 \| norm [^\r\n]*\n", out)


def test_rich_progress_shares_the_console():
    buffer = io.StringIO()
    console = Console(file=buffer, width=100, force_terminal=True, color_system=None)
    with Progress(console=console, auto_refresh=False) as progress:
        task = progress.add_task("training", total=6)
        _train(
            gw.ConsoleSink(every=3, console=progress.console),
            nan_at=4,
            each_step=lambda: progress.update(task, advance=1, refresh=True),
        )
    out = buffer.getvalue()
    # rich erases the bar line, prints ours whole, and draws the bar again after it
    assert re.search(r"\r\x1b\[2K(gradwatch ⚠ step 4: [^\r\n\x1b]*)\ntraining ", out), out
    # the window line may wrap (100 columns), its lines together before the bar again
    assert re.search(r"\r\x1b\[2Kgradwatch steps 3-5 \| [^\r\x1b]*\ntraining ", out)


def test_default_console_is_the_one_rich_progress_uses():
    assert gw.ConsoleSink().console is rich.get_console()
    with pytest.raises(ConfigTypeError, match=r"console must be a rich\.console\.Console"):
        gw.ConsoleSink(console=io.StringIO())  # type: ignore[arg-type]


def test_long_layer_names_wrap_whole_in_an_80_column_log():
    console, buffer = _plain_console()
    console.width = 80  # not a terminal, as in CI
    _train(gw.ConsoleSink(every=0, console=console), steps=3, nan_at=1, model=LongNames())
    out = buffer.getvalue()
    assert "…" not in out
    assert f"first reached `{LONG_NAME}.weight`" in out  # the name whole, never cut
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) > 2 and all(len(row) <= 80 for row in rows)  # the name folds over rows
    assert "".join(row.split("│")[1].strip() for row in rows) == "stem" + LONG_NAME
    assert rows[1].split("│")[2].strip() != ""  # numbers on the long name's first line
    assert rows[2].split("│")[2].strip() == ""  # continuation lines hold only the name


def _broken_pipe_console() -> Console:
    read, write = os.pipe()
    os.close(read)
    return Console(file=os.fdopen(write, "w"), width=100)


def test_broken_pipe_raises_and_leaves_stdout_and_the_console_handler_alone(tmp_path, monkeypatch):
    """rich's own handler would point stdout's descriptor at /dev/null and raise SystemExit."""
    stdout = open(tmp_path / "stdout.txt", "w")  # noqa: SIM115 (closed below)
    monkeypatch.setattr(sys, "stdout", stdout)  # a healthy stdout of its own, not pytest's
    before = os.fstat(stdout.fileno())
    plain, handled = _broken_pipe_console(), _broken_pipe_console()

    def users_handler() -> None:
        raise AssertionError("the sink's print reached the user's handler")

    handled.on_broken_pipe = users_handler  # type: ignore[method-assign]
    alert = Event(0, "spike", "step 0: gradient norm spike")
    for console in (plain, handled):
        with pytest.raises(BrokenPipeError):
            gw.ConsoleSink(console=console).write(alert)
        assert console.quiet  # nothing more goes to the dead pipe
        with contextlib.suppress(BrokenPipeError):
            console.file.close()
    assert os.path.samestat(os.fstat(stdout.fileno()), before)
    print("stdout alive", file=stdout, flush=True)
    monkeypatch.undo()
    stdout.close()
    assert (tmp_path / "stdout.txt").read_text() == "stdout alive\n"
    assert "on_broken_pipe" not in vars(plain)  # rich's handler again for the user's prints
    assert vars(handled)["on_broken_pipe"] is users_handler


def _deep(depth: int = 20) -> nn.Sequential:
    """``depth`` Linear layers with one constant weight: the middle layers' rows read alike."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(4, 4 if i < depth - 1 else 1, bias=False)
        nn.init.constant_(linear.weight, 0.25)  # a gain of 1 per layer: trains steadily
        layers += [linear, nn.ReLU()] if i < depth - 1 else [linear]
    return nn.Sequential(*layers)


def test_a_real_run_in_an_80_column_file_loses_nothing(tmp_path):
    """A 20-layer run with a spike and a NaN, printed to a file (not a terminal) at 80 columns."""
    path = tmp_path / "slurm.out"
    with open(path, "w", encoding="utf-8") as file:
        console = Console(file=file, width=80)
        detector = gw.SpikeDetector(warmup=3)
        sink = gw.ConsoleSink(every=5, console=console)
        _train(sink, steps=12, model=_deep(), spike_at=6, nan_at=9, spike_detector=detector)
    out = path.read_text(encoding="utf-8")
    lines = out.splitlines()
    assert "\x1b[" not in out
    assert not re.search(r"\d…|…\d|\d\.\.\.", out)  # no number cut short
    alerts = [line for line in lines if line.startswith("gradwatch ⚠")]
    assert any("spike" in a for a in alerts) and any("NaN" in a for a in alerts)
    # Every line fits, except alerts: one whole line each, so grep finds them complete.
    assert all(len(line) <= 80 for line in lines if line not in alerts)
    # Every number in the table parses.
    rows = [line for line in lines if line.startswith("│")]
    for row in rows:
        for cell in row.split("│")[2:-1]:
            if cell.strip():
                float(cell)
    # The alike middle layers fold into one row naming the first and the last.
    names: list[str] = []  # a name folded over several lines is one name again
    for row in rows:
        cells = row.split("│")
        if cells[2].strip() or not names:
            names.append(cells[1].strip())
        else:
            names[-1] += " " + cells[1].strip()
    folded = [re.sub(r"- ", "-", n) for n in names if "alike" in n]
    assert folded and re.fullmatch(r"layers \d+-\d+ \(\d+ alike\)", folded[0])
    first, last, count = map(int, re.findall(r"\d+", folded[0]))
    assert (last - first) // 2 + 1 == count >= 3  # Linear layers are every other module
    assert len(rows) < 20
    # Layer names in running text are quoted: "top: `38` 1.2", never "top: 38 1.2".
    window = _logical(out)
    tops = [line.split("top: ")[1] for line in window if "top: " in line]
    assert tops and all(part.startswith("`") for top in tops for part in top.split(", "))
