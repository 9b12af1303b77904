"""``gradwatch report RUN.jsonl --html PAGE``: one self-contained page to send a colleague.

The page reads top to bottom as a person asks: which run (header: file, steps, model,
configuration), how did it go (cards: steps, clipped, spikes, NaN/Inf, skipped, final loss),
what is wrong (findings with their cause, where, evidence and fix), when and where (the figure
of :mod:`gradwatch.report.plots`, embedded as a PNG when matplotlib is installed), which layers
(the per-layer table, highlighting only the rows that deserve it: where NaN/Inf started, spike
culprits, layers a finding names, layers without gradient) and what happened (the events
timeline, repeats folded). Every text is escaped (layer names come from user models); the page
needs no network and no script, and long names and messages wrap instead of widening the page.
"""

from __future__ import annotations

import base64
import io
import math
import os
import time
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

from gradwatch.layers import layer_of
from gradwatch.records import Finding, LayerSummary, RunSummary
from gradwatch.report.compare import RunTotals, run_totals
from gradwatch.report.runlog_arrays import RunLog
from gradwatch.report.text import fmt
from gradwatch.report.view import damage_lines, fold_events

__all__ = ["render_html", "write_html"]

_EVENT_ROWS = 60
"""Rows of the events timeline; the rest are counted."""

_KIND_NAME = {
    "nonfinite": "NaN/Inf",
    "spike": "spike",
    "loss_spike": "loss spike",
    "skip": "skipped",
}

_CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232a;
 background:#f4f5f7;margin:0}
main{max-width:1360px;margin:0 auto;padding:24px 28px 40px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 10px}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}
p,li,td,th,dd{overflow-wrap:anywhere}
.meta{color:#4a5561;margin:2px 0}
.config{display:flex;flex-wrap:wrap;gap:6px;margin:10px 0 0;padding:0;list-style:none}
.config li{background:#fff;border:1px solid #d8dde3;border-radius:4px;padding:2px 8px}
.notice{background:#fff8e1;border-left:4px solid #e0a800;padding:8px 12px;margin:12px 0}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px}
.card{background:#fff;border:1px solid #d8dde3;border-radius:8px;padding:10px 14px}
.card .value{font-size:24px;font-weight:600}
.card .label{color:#4a5561;font-size:13px}
.card .sub{color:#4a5561;font-size:12px}
.card.bad{border-color:#d62728;background:#fdecec}
.card.warn{border-color:#e0a800;background:#fff8e1}
.finding{background:#fff;border:1px solid #d8dde3;border-left:6px solid #999;border-radius:8px;
 padding:12px 16px;margin:0 0 12px}
.finding.error{border-left-color:#d62728}
.finding.warning{border-left-color:#e0a800}
.finding.info{border-left-color:#1f77b4}
.finding h3{font-size:16px;margin:0 0 6px}
.finding dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:6px 0}
.finding dt{color:#4a5561}
.finding dd{margin:0}
.finding ol{margin:4px 0 0;padding-left:22px}
.badge{display:inline-block;border-radius:4px;padding:0 6px;font-size:12px;font-weight:600;
 color:#fff;background:#6c757d;vertical-align:2px}
.badge.error,.badge.nonfinite{background:#d62728}
.badge.warning,.badge.spike,.badge.loss_spike{background:#b8860b}
.badge.info{background:#1f77b4}
.badge.skip{background:#9467bd}
.ok{color:#1e7b34}
figure{margin:0;background:#fff;border:1px solid #d8dde3;border-radius:8px;padding:8px}
figure img{display:block;max-width:100%;height:auto;margin:0 auto}
figcaption{color:#4a5561;font-size:13px;padding:6px 4px 0}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d8dde3}
th,td{padding:4px 10px;border-bottom:1px solid #e6e9ed;text-align:left;vertical-align:top}
th{background:#eef0f3;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.events{table-layout:fixed}
table.events col.steps{width:110px}
table.events col.kind{width:110px}
table.events col.count{width:70px}
tr.origin{background:#fdecec}
tr.culprit,tr.named{background:#fff8e1}
tr.dead{background:#eceff3}
td.bad{color:#b71c1c;font-weight:600}
footer{color:#6c757d;font-size:12px;margin-top:28px}
"""


def write_html(log: RunLog, path: str | os.PathLike[str]) -> None:
    """Write the page of ``log`` to ``path``, the figure embedded when matplotlib is installed.

    Raises:
        OSError: ``path`` cannot be written.
    """
    page = render_html(log, figure=_figure_png(log))
    with open(path, "w", encoding="utf-8") as file:
        file.write(page)


def render_html(log: RunLog, *, figure: bytes | str | None = None) -> str:
    """The page of ``log`` as one HTML document.

    Args:
        log: A run read by :func:`~gradwatch.report.runlog.read_run`.
        figure: The run figure as PNG bytes (embedded as base64), or a sentence saying why there
            is none (shown in its place), or None for no figure section.
    """
    summary = log.summary if log.summary is not None else log.summarize()
    totals = run_totals(log)
    title = f"gradwatch report: {log.path.name}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>",
        *_header(log, title),
        *_cards(totals, log),
        *_findings(summary),
        *_figure(figure),
        *_layers(summary, log),
        *_events(log),
        f"<footer>Written by gradwatch {escape(_version())} from {escape(str(log.path))}.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _header(log: RunLog, title: str) -> list[str]:
    start = log.header
    runs = f", run {log.run_index + 1} of {log.run_count}" if log.run_count > 1 else ""
    when = ""
    if math.isfinite(start.time) and start.time > 0:
        when = time.strftime(", started %Y-%m-%d %H:%M UTC", time.gmtime(start.time))
    values = sum(math.prod(p.shape) for p in start.params)
    layers = len(log.layer_names())
    model = (
        f"{len(start.params)} parameter tensors ({_count(values)} values) in {layers} layers"
        if start.params
        else "no parameters recorded"
    )
    lines = [
        f"<header><h1>{escape(title)}</h1>",
        f'<p class="meta mono">{escape(str(log.path))}{escape(runs)}</p>',
        f'<p class="meta">{escape(model)}; gradwatch {escape(start.gradwatch_version or "?")}, '
        f"torch {escape(start.torch_version or '?')}{escape(when)}</p>",
    ]
    config = [f"<li><code>{escape(k)}={escape(_setting(v))}</code></li>" for k, v in _config(log)]
    if config:
        lines.append(f'<ul class="config" aria-label="configuration">{"".join(config)}</ul>')
    lines.append("</header>")
    notices = [line.plain for line in damage_lines(log)]  # the terminal's wording
    if not len(log):
        notices.insert(0, "No step recorded (the run stopped before its first check).")
    lines += [f'<p class="notice">{escape(text)}</p>' for text in notices]
    return lines


def _config(log: RunLog) -> Iterable[tuple[str, Any]]:
    config = dict(log.header.config)
    if log.every > 1:
        config["every"] = log.every
    clip = config.pop("clip", None)
    yield "clip", clip if clip is not None else "none"
    yield from config.items()


def _setting(value: Any) -> str:
    """A configuration value as code: ``ClipNorm(max_norm=0.3)`` for a named object."""
    if isinstance(value, Mapping):
        name = value.get("name")
        inner = ", ".join(f"{k}={_setting(v)}" for k, v in value.items() if k != "name")
        return f"{name}({inner})" if name else f"({inner})"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cards(t: RunTotals, log: RunLog) -> list[str]:
    span = f"steps {t.first_step}-{t.last_step}" if t.steps else "none recorded"
    if log.every > 1:
        span += f", one record every {log.every}"
    cards = [
        _card("steps", str(t.steps), span),
        _card(
            "clipped",
            f"{t.clip_rate:.0%}",
            _plural(t.clipped, "step"),
            "warn" * (t.clip_rate > 0.5),
        ),
        _card(
            "spikes", str(t.spikes), _plural(t.loss_spikes, "loss spike"), "warn" * bool(t.spikes)
        ),
        _card("NaN/Inf steps", str(t.nonfinite), "gradients", "bad" * bool(t.nonfinite)),
        _card("skipped", str(t.skipped), "optimizer steps", "warn" * bool(t.skipped)),
        _card("global norm", fmt(t.final_norm), f"last; median {fmt(t.median_norm)}"),
    ]
    if t.final_loss is not None:
        bad = "bad" * (not math.isfinite(t.final_loss))
        cards.append(_card("final loss", fmt(t.final_loss), "last recorded", bad))
    if t.final_lr is not None:
        cards.append(_card("learning rate", fmt(t.final_lr), "last recorded"))
    return [
        '<section aria-label="summary"><h2>Summary</h2><div class="cards">',
        *cards,
        "</div></section>",
    ]


def _card(label: str, value: str, sub: str, tone: str = "") -> str:
    return (
        f'<div class="card {tone}"><div class="label">{escape(label)}</div>'
        f'<div class="value">{escape(value)}</div><div class="sub">{escape(sub)}</div></div>'
    )


def _findings(summary: RunSummary) -> list[str]:
    out = ['<section aria-label="findings"><h2>Findings</h2>']
    if not summary.findings:
        out.append('<p class="ok">No findings: nothing in this run needs a change.</p>')
    for f in summary.findings:
        where = _where(f, summary)
        rows = [("cause", f.cause.replace("_", " ")), ("where", where)]
        if f.first_step is not None:
            rows.append(("first seen", f"step {f.first_step}"))
        if f.suggested:
            rows.append(("suggested", ", ".join(f"{k}={v:g}" for k, v in f.suggested.items())))
        terms = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
        out += [
            f'<article class="finding {escape(f.severity)}">',
            f'<h3><span class="badge {escape(f.severity)}">{escape(f.severity)}</span> '
            f"{escape(f.kind.replace('_', ' '))}</h3>",
            f"<p>{escape(f.evidence)}</p><dl>{terms}</dl>",
        ]
        if f.remedies:
            fixes = "".join(f"<li>{escape(r)}</li>" for r in f.remedies)
            out.append(f"<strong>Fix</strong><ol>{fixes}</ol>")
        out.append("</article>")
    return [*out, "</section>"]


def _where(f: Finding, summary: RunSummary) -> str:
    if f.params:
        return ", ".join(f.params)
    if f.kind == "nonfinite" and summary.nonfinite_origins:
        step, name = summary.nonfinite_origins[0]
        return f"first NaN/Inf gradient in {name} (step {step}, first in backward order)"
    return "not pinned to a parameter (see the evidence)"


def _figure(figure: bytes | str | None) -> list[str]:
    if figure is None:
        return []
    out = ['<section aria-label="figure"><h2>Figure</h2>']
    if isinstance(figure, bytes):
        data = base64.b64encode(figure).decode("ascii")
        out.append(
            '<figure><img alt="loss, learning rate, global gradient norm and per-layer '
            f'gradient norms over steps" src="data:image/png;base64,{data}">'
            "<figcaption>Top: loss (loss spikes ◆) and learning rate. Middle: global gradient "
            "norm, spikes ▲, NaN/Inf steps shaded red, skipped steps ▼. Bottom: each layer's "
            "gradient norm; red cells are NaN/Inf, black zero, grey no gradient.</figcaption>"
            "</figure>"
        )
    else:
        out.append(f'<p class="notice">{escape(figure)}</p>')
    return [*out, "</section>"]


def _layers(summary: RunSummary, log: RunLog) -> list[str]:
    if not summary.layers:
        return []
    origins = {layer_of(name) for _, name in summary.nonfinite_origins}
    named = {layer_of(p) for f in summary.findings for p in f.params} | {
        p for f in summary.findings for p in f.params
    }
    head = "".join(
        f'<th class="num">{escape(c)}</th>' if i else f"<th>{escape(c)}</th>"
        for i, c in enumerate(
            ("layer", "min", "mean", "max", "last", "NaN/Inf steps", "spike culprit")
        )
    )
    rows = _folded_rows([_layer_cells(layer, origins, named) for layer in summary.layers])
    return [
        '<section aria-label="layers"><h2>Layers</h2>',
        '<p class="meta">Gradient norm of each layer over the run, in model order. Highlighted: '
        "where NaN/Inf started (red), spike culprits and layers a finding names (amber), layers "
        "whose gradient was always zero or absent (grey).</p>",
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>",
        "</section>",
    ]


def _layer_cells(
    layer: LayerSummary, origins: set[str], named: set[str]
) -> tuple[str, str, str, tuple[str, ...]]:
    """``(name, tone, badge, cells)`` of one layer's row (cells already HTML)."""
    badge = ""
    if layer.name in origins:
        tone, badge = "origin", '<span class="badge nonfinite">NaN/Inf started here</span>'
    elif layer.steps == 0 and layer.nonfinite_steps == 0:
        tone, badge = "dead", '<span class="badge">no gradient</span>'
    elif layer.max == 0:
        tone, badge = "dead", '<span class="badge">zero gradient</span>'
    elif layer.spike_culprit:
        tone = "culprit"
    elif layer.name in named:
        tone = "named"
    else:
        tone = ""
    numbers = [fmt(layer.min), fmt(layer.mean), fmt(layer.max), fmt(layer.last)]
    nan = " bad" * bool(layer.nonfinite_steps)
    cells = (
        *(f'<td class="num">{escape(c)}</td>' for c in numbers),
        f'<td class="num{nan}">{layer.nonfinite_steps}</td>',
        f'<td class="num">{layer.spike_culprit}</td>',
    )
    return layer.name, tone, badge, cells


def _folded_rows(rows: list[tuple[str, str, str, tuple[str, ...]]]) -> list[str]:
    """Table rows, consecutive layers with identical numbers folded into one (``fc2 … fc19``)."""
    out = []
    i = 0
    while i < len(rows):
        name, tone, badge, cells = rows[i]
        j = i + 1
        while j < len(rows) and not badge and rows[j][1:] == (tone, badge, cells):
            j += 1
        label = f"<code>{escape(name)}</code>"
        if j - i > 1:
            label += f" … <code>{escape(rows[j - 1][0])}</code> ({j - i} layers alike)"
        out.append(f'<tr class="{tone}"><td>{label} {badge}</td>{"".join(cells)}</tr>')
        i = j
    return out


def _events(log: RunLog) -> list[str]:
    out = ['<section aria-label="events"><h2>Events</h2>']
    if not log.events:
        out.append('<p class="ok">No events: no NaN/Inf, spike, loss spike or skipped step.</p>')
        return [*out, "</section>"]
    groups = fold_events(log.events)
    out.append(
        '<p class="meta">In step order; an event repeated at consecutive steps is one row.</p>'
        '<table class="events"><colgroup><col class="steps"><col class="kind">'
        '<col class="count"><col></colgroup><thead><tr><th class="num">steps</th><th>event</th>'
        '<th class="num">count</th><th>first message</th></tr></thead><tbody>'
    )
    for group in groups[:_EVENT_ROWS]:
        first, last, kind = group[0].step, group[-1].step, group[0].kind
        steps = str(first) if first == last else f"{first}-{last}"
        out.append(
            f'<tr><td class="num">{steps}</td><td><span class="badge {escape(kind)}">'
            f"{escape(_KIND_NAME.get(kind, kind))}</span></td>"
            f'<td class="num">{len(group)}</td><td>{escape(group[0].message)}</td></tr>'
        )
    if len(groups) > _EVENT_ROWS:
        hidden = sum(len(g) for g in groups[_EVENT_ROWS:])
        out.append(
            f'<tr><td class="num">...</td><td></td><td class="num">{hidden}</td>'
            f"<td>{len(groups) - _EVENT_ROWS} more runs of events</td></tr>"
        )
    return [*out, "</tbody></table></section>"]


def _figure_png(log: RunLog) -> bytes | str | None:
    """The run figure as PNG bytes, or why there is none."""
    if not len(log):
        return None
    from gradwatch._optional import MissingExtraError

    try:
        from gradwatch.report.plots import plot_run

        buffer = io.BytesIO()
        plot_run(log, buffer, format="png", dpi=120)  # 1320 px: sharp on a 1400 px page
    except MissingExtraError:
        return 'The figure needs matplotlib: pip install "gradwatch[plot]", then run again.'
    return buffer.getvalue()


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _version() -> str:
    from gradwatch._version import __version__

    return __version__
