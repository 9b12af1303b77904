"""``gradwatch report --html`` in a real browser: headless Chromium screenshots the page.

Skipped only where no Chromium binary is installed (CI installs Debian's ``chromium``).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess

import pytest
from conftest import LONG_NAME, LongNames, train_steps

import gradwatch as gw
from gradwatch.cli import main
from gradwatch.report.jsonl import JsonlSink

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary installed")
image = pytest.importorskip("matplotlib.image")

WIDTH, HEIGHT = 1400, 2000

_PROBE = (
    "<script>var d = document.documentElement; document.body.setAttribute("
    "'data-widths', d.scrollWidth + ' ' + d.clientWidth);</script>"
)
"""Added to a copy of the page only: the page itself has no script."""


def _chromium(page, screenshot, profile) -> str:
    """One headless Chromium run: a screenshot of ``page`` and its DOM after layout."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            f"--screenshot={screenshot}",
            f"--window-size={WIDTH},{HEIGHT}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"},  # no 10 s D-Bus wait
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_html_report_renders_in_chromium_at_1400_px(tmp_path, capsys):
    log_path = tmp_path / "run.jsonl"
    train_steps(
        LongNames(),  # a layer name wider than the page's columns: it must wrap, not widen it
        [JsonlSink(log_path)],
        30,
        nan_at=22,
        spike_at=12,
        clip=gw.ClipNorm(0.3),
        spike_detector=gw.SpikeDetector(warmup=5),
    )
    page = tmp_path / "run.html"
    assert main(["report", str(log_path), "--html", str(page)]) == 0
    capsys.readouterr()
    text = page.read_text(encoding="utf-8")
    findings = gw.read_run(log_path).summary.findings
    assert {f.kind for f in findings} >= {"nonfinite", "spike"}
    for finding in findings:
        assert html.escape(finding.evidence) in text
        assert all(html.escape(fix) in text for fix in finding.remedies)
    assert "figure written" not in text and "<script" not in text
    assert f"<code>{LONG_NAME}</code>" in text

    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    screenshot = tmp_path / "page.png"
    dom = _chromium(probe, screenshot, tmp_path / "profile")

    widths = re.search(r'data-widths="(\d+) (\d+)"', dom)
    assert widths is not None, dom[:500]
    scroll, client = map(int, widths.groups())
    assert 1300 <= client <= WIDTH and scroll <= client  # no horizontal overflow at 1400 px
    for finding in findings:  # laid out in the page, not only in the file
        assert html.escape(finding.evidence) in dom

    pixels = image.imread(screenshot)
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    assert pixels.std() > 0.05  # not a single colour
    colours = {tuple(p) for p in (pixels[::7, ::7, :3] * 255).astype(int).reshape(-1, 3).tolist()}
    assert len(colours) > 200  # text, cards, the embedded figure's colour map
