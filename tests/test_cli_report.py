"""``gradwatch report``: terminal summary, figure and page from real run logs; bad logs exit 2."""

from __future__ import annotations

import base64
import html
import io
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import LONG_NAME, LongNames, train_steps
from rich.console import Console
from torch import nn

import gradwatch as gw
from gradwatch.cli import main
from gradwatch.records import ParamInfo, ParamNorms, RunStart, StepReport
from gradwatch.report.jsonl import JsonlSink
from gradwatch.report.text import fmt
from gradwatch.report.view import run_report

image = pytest.importorskip("matplotlib.image")


def _train(path, steps=40, *, every=1, model=None, **kwargs):
    """``train_steps`` (clipped at 0.3, spike warm-up 5) writing a run log to ``path``."""
    torch.manual_seed(0)
    if model is None:
        model = nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)
        )
    return train_steps(
        model,
        [JsonlSink(path, every=every)],
        steps,
        clip=gw.ClipNorm(0.3),
        spike_detector=gw.SpikeDetector(warmup=5),
        **kwargs,
    )


@pytest.fixture(scope="module")
def run_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("logs") / "run.jsonl"
    _train(path, nan_at=25, spike_at=15)
    return path


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("gradwatch report: error: ")
    return lines[0]


def test_terminal_report(run_log, capsys):
    assert main(["report", str(run_log)]) == 0
    out = capsys.readouterr().out
    assert f"gradwatch run log {run_log}" in out
    assert "6 parameters in 3 layers; clip ClipNorm(max_norm=0.3, norm_type=2.0)" in out
    assert "40 steps recorded, 0-39" in out
    assert "gradwatch summary: 40 steps" in out
    assert re.search(r"│ 2 +│", out)  # a row of the per-layer table
    assert "NaN/Inf started in: step 25: 2.weight" in out
    timeline = out[out.index("events") :]
    assert re.search(r"\b15 +│ spike +│ +1 │ step 15: gradient norm spike", timeline)
    assert re.search(r"\b25 +│ NaN/Inf +│ +1 │ step 25: NaN in the gradients", timeline)
    assert f"plot it: gradwatch report {run_log} --plot run.png" in out


def test_plot_is_a_png_of_the_reported_size(run_log, tmp_path, capsys):
    png = tmp_path / "run.png"
    assert main(["report", str(run_log), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    size = re.search(r"figure written to .*run\.png \((\d+)x(\d+) px\)", out)
    assert size is not None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(png)
    assert pixels.shape[:2] == (int(size.group(2)), int(size.group(1)))
    assert pixels.shape[1] == 1100 and pixels.shape[0] >= 380
    assert pixels.std() > 0.05  # a drawn figure, not a blank canvas
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.25) & (pixels[..., 2] < 0.25)
    assert red.sum() > 20  # the NaN/Inf cells of the heatmap are drawn in red
    assert png.stat().st_size < 200_000


def test_html_page_is_a_report_not_a_terminal_dump(run_log, tmp_path, capsys):
    page = tmp_path / "run.html"
    assert (
        main(["report", str(run_log), "--html", str(page), "--plot", str(tmp_path / "f.png")]) == 0
    )
    assert f"HTML report written to {page}" in capsys.readouterr().out
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "figure written" not in text and "HTML report written" not in text and "━" not in text
    summary = gw.read_run(run_log).summary
    assert summary.findings
    for finding in summary.findings:  # each finding with its evidence, cause and every fix
        assert html.escape(finding.evidence) in text
        assert f"<dt>cause</dt><dd>{finding.cause.replace('_', ' ')}</dd>" in text
        assert all(f"<li>{html.escape(fix)}</li>" in text for fix in finding.remedies)
    cards = dict(re.findall(r'<div class="label">([^<]+)</div><div class="value">([^<]+)<', text))
    assert cards["steps"] == "40" and cards["NaN/Inf steps"] == "1" and cards["spikes"] == "1"
    assert cards["clipped"] == f"{summary.clip_rate:.0%}"
    # one NaN step in layer 2: only its row is red, not every row with a NaN step
    assert re.findall(r'<tr class="origin"><td><code>([^<]+)</code>', text) == ["2"]
    timeline = text[text.index('aria-label="events"') :]
    assert re.search(r'<td class="num">15</td><td><span class="badge spike">spike</span>', timeline)
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert embedded is not None
    assert base64.b64decode(embedded.group(1))[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_escapes_names_from_the_model(run_log, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the page's text only: no figure
    hostile = tmp_path / "hostile.jsonl"  # layer "<i>2</i>": a module name is the user's text
    text = run_log.read_text().replace("2.weight", "<i>2</i>.weight")
    hostile.write_text(text.replace('"name":"2",', '"name":"<i>2</i>",'))  # summary layers
    page = tmp_path / "hostile.html"
    assert main(["report", str(hostile), "--html", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert "<i>" not in text
    assert "<code>&lt;i&gt;2&lt;/i&gt;</code>" in text  # its row in the layer table
    assert "&lt;i&gt;2&lt;/i&gt;.weight" in text  # in the events and the findings


def test_html_without_matplotlib_says_how_to_get_the_figure(run_log, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    page = tmp_path / "run.html"
    assert main(["report", str(run_log), "--html", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert "<img" not in text and "pip install &quot;gradwatch[plot]&quot;" in text
    assert 'aria-label="layers"' in text and 'aria-label="events"' in text


def test_log_of_a_killed_run_still_reports(tmp_path, capsys):
    path = tmp_path / "killed.jsonl"
    _train(path, steps=20, nan_at=12, close=False)  # no summary record: the run never closed
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 25])  # killed in the middle of writing step 19
    png = tmp_path / "killed.png"
    assert main(["report", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "ends in the middle of a line" in out
    assert "no final summary (the run did not close)" in out
    assert "gradwatch summary: 19 steps" in out
    assert "NaN/Inf started in: step 12: 2.weight" in out
    width, height = map(int, re.search(r"\((\d+)x(\d+) px\)", out).groups())
    assert image.imread(png).shape[:2] == (height, width)


def test_sampled_log_reports(tmp_path, capsys):
    path = tmp_path / "sampled.jsonl"
    _train(path, steps=30, every=7, spike_at=10)
    png = tmp_path / "sampled.png"
    assert main(["report", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "30 steps recorded, 6-29, one record every 7 steps" in out
    assert "gradwatch summary: 30 steps" in out and png.exists()


def test_long_names_wrap_whole_in_an_80_column_report(tmp_path):
    path = tmp_path / "long_names.jsonl"
    _train(path, steps=8, nan_at=5, model=LongNames())
    buffer = io.StringIO()
    assert run_report(path, console=Console(file=buffer, width=80)) == 0  # not a terminal
    out = buffer.getvalue()
    assert "…" not in out
    lines = out.splitlines()
    table = [line for line in lines if line.startswith("│")]  # the per-layer table's rows
    assert "".join(row.split("│")[1].strip() for row in table) == "stem" + LONG_NAME
    after = lines[next(i for i, line in enumerate(lines) if line.startswith("events")) :]
    timeline = [line for line in after if "│" in line]  # the event table's rows
    messages = "".join(line.split("│")[-1].strip() for line in timeline)
    assert f"`{LONG_NAME}.weight`" in messages  # folded, never cut
    assert all(len(line) <= 80 for line in table + timeline)


def _train_with_optimizer(path, steps=30, *, spike_at=20, mode="x"):
    """A run with an attached optimizer and a decaying learning rate, one bad batch at
    ``spike_at`` (inputs 30x: a gradient spike and a loss spike), clipped at 1.0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.85**step)
    watch = gw.GradWatch(
        model,
        sinks=[JsonlSink(path, mode=mode)],
        clip=gw.ClipNorm(1.0),
        spike_detector=gw.SpikeDetector(warmup=5),
    )
    watch.attach(opt)
    for step in range(steps):
        x = torch.randn(16, 4) * (30.0 if step == spike_at else 1.0)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        opt.step()
        schedule.step()
    watch.close()


def test_figure_shows_loss_with_its_spikes_on_the_curve_and_the_learning_rate(tmp_path):
    from gradwatch.report.plots import run_figure

    path = tmp_path / "lr.jsonl"
    _train_with_optimizer(path)
    log = gw.read_run(path)
    spikes = [e for e in log.events if e.kind == "loss_spike"]
    assert [e.step for e in spikes] == [20]
    fig = run_figure(log)
    loss, norm, _heat = (
        ax for ax in fig.axes if ax.get_ylabel() in ("loss", "global grad norm", "layer")
    )
    assert loss.get_yscale() == "log"  # the spike is 100x the loss around it: log scale
    curve = loss.get_lines()[0]
    x, y = curve.get_xdata(), curve.get_ydata()
    assert y[list(x).index(20)] == pytest.approx(spikes[0].data["loss"])  # the curve has the spike
    marker = next(c for c in loss.collections if c.get_label().startswith("loss spike"))
    assert marker.get_offsets().tolist() == [[20, pytest.approx(spikes[0].data["loss"])]]
    assert not any(c.get_label().startswith("loss spike") for c in norm.collections)
    twin = next(ax for ax in fig.axes if ax.get_ylabel() == "learning rate")
    assert twin.get_yscale() == "log"  # 0.05 * 0.85**29: two decades
    lr = twin.get_lines()[0].get_ydata() if twin.get_lines() else None
    assert lr is None or np.nanmax(lr) == pytest.approx(0.05)
    assert np.allclose(log.lr, 0.05 * 0.85 ** np.arange(30))


def test_figure_without_a_learning_rate_says_so(run_log):
    from gradwatch.report.plots import run_figure

    fig = run_figure(gw.read_run(run_log))  # train_steps attaches no optimizer
    loss = next(ax for ax in fig.axes if ax.get_ylabel() == "loss")
    assert "learning rate not recorded" in [t.get_text() for t in loss.get_legend().get_texts()]
    assert not any(ax.get_ylabel() == "learning rate" for ax in fig.axes)


def test_two_logs_are_compared_side_by_side_and_overlaid(run_log, tmp_path, capsys):
    other = tmp_path / "after.jsonl"
    _train_with_optimizer(other)
    png = tmp_path / "cmp.png"
    argv = ["report", str(run_log), str(other), "--plot", str(png), "--label", "before"]
    assert main([*argv, "--label", "after"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[0].strip(): line for line in out.splitlines() if "│" in line}
    header = next(line for line in out.splitlines() if "before" in line and "after" in line)
    assert header.index("before") < header.index("after")
    assert re.search(r"40 \(0-39\) +│ +30 \(0-29\)", rows["steps"])
    assert re.search(r"│ +1 +│ +0$", rows["NaN/Inf steps"])
    for key in ("clipped", "spikes", "skipped", "final norm", "median norm", "final loss"):
        assert key in rows
    size = re.search(r"figure written to .*cmp\.png \((\d+)x(\d+) px\)", out)
    pixels = image.imread(png)
    assert pixels.shape[:2] == (int(size.group(2)), int(size.group(1)))
    assert pixels.std() > 0.05


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--label", "only one"], "--label given 1 time(s) for 2 run logs"),
        (["--html", "x.html"], "--html takes one run log"),
    ],
)
def test_a_comparison_with_bad_options_is_one_line_and_exit_code_2(
    run_log, tmp_path, capsys, extra, reason
):
    assert main(["report", str(run_log), str(run_log), *extra]) == 2
    assert reason in _one_error_line(capsys)


def test_a_missing_log_in_a_comparison_is_one_line_and_exit_code_2(run_log, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["report", str(run_log), str(missing), "--plot", str(tmp_path / "c.png")]) == 2
    assert f"run log {str(missing)!r} does not exist" in _one_error_line(capsys)
    assert not (tmp_path / "c.png").exists()


def test_run_picks_one_of_the_appended_runs(tmp_path, capsys):
    path = tmp_path / "two.jsonl"
    _train_with_optimizer(path, steps=8, spike_at=None)
    _train_with_optimizer(path, steps=12, spike_at=None, mode="a")
    for run, steps, which in ((0, 8, 1), (-1, 12, 2), (-2, 8, 1)):
        assert main(["report", str(path), "--run", str(run)]) == 0
        out = capsys.readouterr().out
        assert f"(run {which} of 2)" in out and f"{steps} steps recorded" in out
    for run in (2, -3):
        assert main(["report", str(path), "--run", str(run)]) == 2
        line = _one_error_line(capsys)
        assert f"--run {run}: {str(path)!r} holds 2 runs: use 0 to 1, or -1 to -2" in line


HEADER = b'{"type":"header","format":"gradwatch.jsonl","format_version":1,"params":[]}'


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"epoch,loss\n1,0.5\n", "not a gradwatch run log"),
        (b'{"loss": 0.5}\n', "not a gradwatch run log"),
        (HEADER[:40], "ends inside its header"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, capsys, content, reason):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_bytes(content)
    assert main(["report", str(path), "--plot", str(tmp_path / "x.png")]) == 2
    line = _one_error_line(capsys)
    assert reason in line and str(path) in line
    assert not (tmp_path / "x.png").exists()


def test_nothing_to_plot_is_an_error_but_the_summary_is_not(tmp_path, capsys):
    path = tmp_path / "header_only.jsonl"
    path.write_bytes(HEADER + b"\n")
    assert main(["report", str(path), "--plot", str(tmp_path / "x.png")]) == 2
    assert "the run recorded no step" in _one_error_line(capsys)
    assert main(["report", str(path)]) == 0
    assert "no step recorded" in capsys.readouterr().out


def _long_log(path, steps: int) -> float:
    """A long log in JsonlSink's format, written in bulk (the sink itself writes the first step)."""
    names = tuple(f"blocks.{i}.weight" for i in range(8))
    values = (np.random.default_rng(0).random((steps, 8)) + 0.5).astype(np.float32)
    values[70_000:70_010] *= 1e4  # a burst in a long run must survive downsampling
    global_norms = np.sqrt((values.astype(np.float64) ** 2).sum(axis=1))
    sink = JsonlSink(path)
    sink.write(RunStart("test", "test", tuple(ParamInfo(n, (4,), "float32") for n in names), {}, 0))
    report = StepReport(
        0,
        global_norm=float(global_norms[0]),
        clipped_norm=float(global_norms[0]),
        clip_coef=1.0,
        param_norms=ParamNorms(names, values[0]),
        nonfinite=(),
        spike=False,
        loss_spike=False,
        skipped=False,
        loss=None,
    )
    sink.write(report)
    sink.close()
    text = io.StringIO()
    np.savetxt(text, values, fmt="%.9g", delimiter=",")
    lines = [
        f'{{"type":"step","step":{i},"global_norm":{g:.9g},"clipped_norm":{g:.9g},'
        f'"clip_coef":1,"loss":null,"spike":false,"loss_spike":false,"skipped":false,'
        f'"norms":[{row}]}}\n'
        for i, (g, row) in enumerate(zip(global_norms.tolist(), text.getvalue().splitlines()))
    ]
    written = path.read_text().splitlines(keepends=True)
    assert written[1] == lines[0]  # the bulk lines are exactly what the sink writes
    path.write_text(written[0] + "".join(lines))
    return float(global_norms.max())


def test_hundred_thousand_steps_in_seconds(tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    peak = _long_log(path, 100_000)
    png = tmp_path / "long.png"
    start = time.perf_counter()
    assert main(["report", str(path), "--plot", str(png)]) == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "100000 steps recorded, 0-99999" in out
    assert f"max {fmt(peak)}  last" in out  # the burst at step 70000 is the run's maximum
    width, height = map(int, re.search(r"\((\d+)x(\d+) px\)", out).groups())
    assert image.imread(png).shape[:2] == (height, width)
    assert elapsed < 30, f"report of 100k steps took {elapsed:.1f}s"


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_python_dash_m_entry_point(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch", "report", str(tmp_path / "missing.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0
    assert "does not exist" in done.stderr


def _damaged_copy(run_log, tmp_path, line: int, old: str, new: str):
    lines = run_log.read_text().splitlines(keepends=True)
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    path = tmp_path / "damaged.jsonl"
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ('"step":2,', '"step":"x",', "field 'step' must be an integer, got \"x\""),
        ('"global_norm":', '"global_norm":"abc","was":', "field 'global_norm' must be a number"),
        ('"skipped":false', '"skipped":[1]', "field 'skipped' must be true or false, got [1]"),
    ],
)
def test_a_mistyped_line_is_named_and_the_report_goes_on(
    run_log, tmp_path, capsys, old, new, reason
):
    path = _damaged_copy(run_log, tmp_path, 4, old, new)  # line 4: step 2
    assert main(["report", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert f"{path}:4: line skipped: step record: {reason}" in captured.out
    assert "39 steps recorded, 0-39" in captured.out  # the other 39 are all there


def test_a_mistyped_header_is_one_line_and_exit_code_2(run_log, tmp_path, capsys):
    path = _damaged_copy(run_log, tmp_path, 1, '"every":1', '"every":"1"')
    assert main(["report", str(path), "--plot", str(tmp_path / "x.png")]) == 2
    line = _one_error_line(capsys)
    assert f"{str(path)!r} line 1: unreadable run header: field 'every' must be an integer" in line
    assert not (tmp_path / "x.png").exists()


def test_plot_format_follows_the_suffix(run_log, tmp_path, capsys):
    svg, pdf = tmp_path / "run.svg", tmp_path / "RUN.PDF"
    assert main(["report", str(run_log), "--plot", str(svg)]) == 0
    assert f"figure written to {svg} (SVG)" in capsys.readouterr().out
    text = svg.read_text(encoding="utf-8")
    assert text.startswith("<?xml") and "<svg" in text and "PNG" not in text[:200]
    assert main(["report", str(run_log), "--plot", str(pdf)]) == 0
    assert pdf.read_bytes().startswith(b"%PDF-")


@pytest.mark.parametrize("name", ["run.jpg", "run", "run.png.txt"])
def test_unknown_plot_suffix_fails_before_any_output(run_log, tmp_path, capsys, name):
    target = tmp_path / "figs" / name
    assert main(["report", str(run_log), "--plot", str(target)]) == 2
    line = _one_error_line(capsys)  # nothing on stdout: the report was not printed first
    assert line.startswith("gradwatch report: error: --plot: ")
    assert str(target) in line and ".png, .svg, .pdf" in line
    assert not (tmp_path / "figs").exists()


def test_outputs_into_missing_folders_are_written(run_log, tmp_path, capsys):
    png, page = tmp_path / "a" / "b" / "run.png", tmp_path / "c" / "run.html"
    assert main(["report", str(run_log), "--plot", str(png), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert f"figure written to {png}" in out and f"HTML report written to {page}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and page.read_text().startswith("<!DOC")


@pytest.mark.parametrize("option", ["--plot", "--html"])
def test_an_output_folder_that_cannot_be_made_fails_before_any_output(
    run_log, tmp_path, capsys, option
):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("precious\n")
    target = blocker / "out" / "run.png"
    assert main(["report", str(run_log), option, str(target)]) == 2
    line = _one_error_line(capsys)
    assert f"{option} {str(target)!r}: cannot create the folder" in line
    assert f"{str(blocker)!r} is a file" in line and blocker.read_text() == "precious\n"


def test_plot_without_matplotlib_fails_before_any_output(run_log, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # None makes the import fail
    assert main(["report", str(run_log), "--plot", str(tmp_path / "run.png")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and 'pip install "gradwatch[plot]"' in captured.err


_NO_TORCH = """
import sys
from gradwatch.cli import main
for argv in (["--version"], ["--help"], ["report", "--help"]):
    try:
        main(argv)
    except SystemExit as done:
        assert done.code == 0, (argv, done.code)
loaded = sorted(m for m in ("torch", "numpy", "rich", "matplotlib") if m in sys.modules)
assert not loaded, loaded
assert main(["report", sys.argv[1]]) == 0
assert "torch" not in sys.modules, "gradwatch report imported torch"
"""


def test_help_and_version_import_neither_torch_nor_numpy(run_log):
    done = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(run_log)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert f"gradwatch {gw.__version__}" in done.stdout
    assert "usage: gradwatch report" in done.stdout
    assert "gradwatch summary: 40 steps" in done.stdout  # and reading a log needs no torch either


def test_lazy_package_still_exports_every_name():
    namespace: dict[str, object] = {}
    exec("from gradwatch import *", namespace)
    assert {n for n in namespace if not n.startswith("__")} | {"__version__"} == set(gw.__all__)
    assert namespace["GradWatch"] is gw.GradWatch and namespace["read_run"] is gw.read_run
    assert set(gw.__all__) <= set(dir(gw))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        gw.Nope  # noqa: B018
