"""JsonlSink and read_run: real runs written, read back and compared with what the watcher saw."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import train_steps
from torch import nn

import gradwatch as gw
from gradwatch.errors import ConfigError, GradWatchError
from gradwatch.records import ParamInfo, ParamNorms, RunStart, StepReport
from gradwatch.report.jsonl import JsonlSink, RunLogExistsError
from gradwatch.report.logformat import decode_float, encode_value
from gradwatch.report.runlog import RunLogError, RunLogNotFoundError, read_run


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def _train(sinks, steps=30, *, model=None, **kwargs):
    """A real GradWatch run (``train_steps``); returns the watcher and its summary."""
    watch = train_steps(model if model is not None else _model(), sinks, steps, **kwargs)
    return watch, watch.close()


def _same(a: float, b: float) -> bool:
    """Equal as float32 (the log keeps float32 statistics exactly), NaN equal to NaN."""
    return (math.isnan(a) and math.isnan(b)) or np.float32(a) == np.float32(b)


def _reject_constants(token: str) -> None:
    raise AssertionError(f"non-standard JSON constant {token} in the log")


def test_round_trip_matches_what_the_watcher_saw(tmp_path):
    path = tmp_path / "run.jsonl"
    watch, summary = _train([JsonlSink(path)], nan_at=12, clip=gw.ClipNorm(0.2))
    history = list(watch.history)
    log = read_run(path)

    model = _model()
    assert log.names == tuple(n for n, _ in model.named_parameters())
    assert [p.shape for p in log.header.params] == [tuple(p.shape) for p in model.parameters()]
    assert {p.dtype for p in log.header.params} == {"float32"}
    assert log.header.config["clip"] == {"name": "ClipNorm", "max_norm": 0.2, "norm_type": 2.0}
    assert log.header.torch_version == torch.__version__

    assert log.step.tolist() == list(range(30))
    expected = np.stack([r.param_norms.values for r in history])
    np.testing.assert_array_equal(log.norms.astype(np.float32), expected)  # NaN == NaN here
    for i, report in enumerate(history):
        assert _same(log.global_norm[i], report.global_norm)
        assert _same(log.clip_coef[i], report.clip_coef)
        assert np.float32(log.loss[i]) == np.float32(report.loss)
        assert log.nonfinite[i] == bool(report.nonfinite)
    assert np.nanmin(log.clip_coef) < 1.0  # clipping happened and is recorded

    assert log.first_nonfinite[12] == log.names.index("2.weight")
    assert np.isnan(log.norms[12, log.names.index("2.weight")])
    assert [e.kind for e in log.events] == ["nonfinite"]
    assert log.events[0].step == 12
    assert log.events[0].params[0] == "2.weight"

    assert log.summary is not None
    assert log.summary.steps == summary.steps == 30
    assert log.summary.nonfinite_origins == summary.nonfinite_origins == ((12, "2.weight"),)
    assert log.summary.clipped_steps == summary.clipped_steps
    for read, written in zip(log.summary.layers, summary.layers, strict=True):
        assert read.name == written.name
        assert _same(read.max, written.max) and _same(read.mean, written.mean)
        assert read.nonfinite_steps == written.nonfinite_steps
    assert not log.truncated and log.bad_lines == 0


def test_every_line_is_standard_json_with_nan_as_strings(tmp_path):
    path = tmp_path / "run.jsonl"
    _train([JsonlSink(path)], steps=15, nan_at=5)
    lines = path.read_text().splitlines()
    records = [json.loads(line, parse_constant=_reject_constants) for line in lines]
    assert [r["type"] for r in records[:2]] == ["header", "step"]
    assert records[-1]["type"] == "summary"
    nan_step = next(r for r in records if r["type"] == "step" and r["step"] == 5)
    assert nan_step["global_norm"] == "NaN"
    assert "NaN" in nan_step["norms"]
    assert nan_step["nonfinite"] == [2]  # a position in the header's parameter list
    assert decode_float("NaN") != decode_float("NaN")  # NaN
    assert decode_float("-Infinity") == -math.inf and decode_float(None) != decode_float(None)
    assert encode_value({"a": (math.inf, np.float32(2.5), None)}) == {"a": ["Infinity", 2.5, None]}


def test_existing_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text("precious\n")
    with pytest.raises(RunLogExistsError) as info:
        JsonlSink(path)
    message = str(info.value)
    assert str(path) in message and 'mode="a"' in message and "new path" in message
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, GradWatchError)
    assert path.read_text() == "precious\n"


def test_append_mode_refuses_a_file_that_is_not_a_run_log(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"note": "mine"}\n')
    with pytest.raises(RunLogExistsError, match="is not a gradwatch run log"):
        JsonlSink(path, mode="a")
    assert path.read_text() == '{"note": "mine"}\n'
    JsonlSink(tmp_path / "new.jsonl", mode="a").close()  # a new file is fine in append mode


def test_append_mode_adds_a_run_and_the_reader_picks_one(tmp_path):
    path = tmp_path / "run.jsonl"
    _train([JsonlSink(path)], steps=5)
    _train([JsonlSink(path, mode="a")], steps=7)
    assert read_run(path).run_count == 2
    assert len(read_run(path)) == 7 and read_run(path).run_index == 1
    assert len(read_run(path, run=0)) == 5
    with pytest.raises(RunLogError, match=r"run must be in \[-2, 1\]"):
        read_run(path, run=2)


def test_truncated_last_line_is_skipped(tmp_path):
    path = tmp_path / "run.jsonl"
    _train([JsonlSink(path)], steps=10)
    lines = path.read_bytes().splitlines(keepends=True)
    killed = b"".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2]  # killed mid-step, no summary
    path.write_bytes(killed)
    log = read_run(path)
    assert log.truncated and log.bad_lines == 0
    assert len(log) == 9 and log.summary is None
    computed = log.summarize()
    assert computed.steps == 9 and computed.last_step == 8
    assert [layer.name for layer in computed.layers] == ["0", "2", "4"]


def test_appending_after_a_killed_run_starts_on_a_fresh_line(tmp_path):
    path = tmp_path / "run.jsonl"
    _train([JsonlSink(path)], steps=6)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the summary line cut short
    _train([JsonlSink(path, mode="a")], steps=4)
    assert len(read_run(path)) == 4
    first = read_run(path, run=0)
    assert len(first) == 6 and first.bad_lines == 1 and first.summary is None


def test_every_n_keeps_window_statistics(tmp_path):
    path = tmp_path / "run.jsonl"
    detector = gw.SpikeDetector(warmup=3)
    watch, _ = _train(
        [JsonlSink(path, every=4)], steps=25, spike_at=9, spike_detector=detector, history=64
    )
    history = list(watch.history)
    log = read_run(path)
    assert log.every == 4
    assert log.step.tolist() == [3, 7, 11, 15, 19, 23, 24]  # the last, partial window is kept
    assert log.window_steps.tolist() == [4, 4, 4, 4, 4, 4, 1]
    norms = np.array([r.global_norm for r in history])
    # the spike at step 9 is the peak of the window 8-11 although step 11 was the one written
    assert log.peak_global_norm[2] == pytest.approx(norms[8:12].max(), rel=1e-6)
    assert log.global_norm[2] == pytest.approx(norms[11], rel=1e-6)
    per_param = np.stack([r.param_norms.values for r in history])
    np.testing.assert_allclose(log.peak_norms[2], per_param[8:12].max(axis=0), rtol=1e-6)
    assert [e.step for e in log.events if e.kind == "spike"] == [9]  # events are never sampled
    computed = log.summarize()  # every step counts, though every 4th was written
    assert computed.steps == 25 and computed.spikes == 1
    assert computed.global_max == pytest.approx(norms.max(), rel=1e-6)


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _model()
        self.unused = nn.Linear(2, 2)  # never in the forward pass: no gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_parameter_without_gradient_is_null_not_nan(tmp_path):
    path = tmp_path / "run.jsonl"
    _train([JsonlSink(path)], steps=3, model=_WithUnused())
    step = json.loads(path.read_text().splitlines()[1])
    assert step["norms"][-2:] == [None, None]
    log = read_run(path)
    column = log.names.index("unused.weight")
    assert not log.present[:, column].any() and np.isnan(log.norms[:, column]).all()
    assert log.present[:, 0].all()
    assert np.isnan(log.layer_norms()[:, log.layer_names().index("unused")]).all()


def test_long_log_reads_back_exactly(tmp_path):
    """More rows than one parsing chunk (4096), with NaN and Inf among them."""
    names = tuple(f"layers.{i}.weight" for i in range(6))
    path = tmp_path / "long.jsonl"
    sink = JsonlSink(path)
    sink.write(RunStart("test", "test", tuple(ParamInfo(n, (3,), "float32") for n in names), {}, 0))
    values = np.random.default_rng(0).random((5000, 6)).astype(np.float32)
    values[4500, 3], values[1000, 1] = np.nan, np.inf
    for i, row in enumerate(values):
        finite = bool(np.isfinite(row).all())
        sink.write(
            StepReport(
                i,
                global_norm=float(np.linalg.norm(row)),
                clipped_norm=float(np.linalg.norm(row)),
                clip_coef=1.0,
                param_norms=ParamNorms(names, row),
                nonfinite=() if finite else (names[int(np.argmin(np.isfinite(row)))],),
                spike=False,
                loss_spike=False,
                skipped=False,
                loss=None,
            )
        )
    sink.close()
    log = read_run(path)
    np.testing.assert_array_equal(log.norms.astype(np.float32), values)
    assert log.nonfinite.sum() == 2 and np.isnan(log.loss).all()


def _step(step: int, names: tuple[str, ...], values: np.ndarray, **fields) -> StepReport:
    """A StepReport as the watcher makes one, for a log written without a model."""
    norm = float(np.linalg.norm(values))
    bad = tuple(n for n, v in zip(names, values) if not np.isfinite(v))
    return StepReport(
        step,
        global_norm=norm,
        clipped_norm=norm,
        clip_coef=1.0,
        param_norms=ParamNorms(names, values),
        nonfinite=bad,
        spike=False,
        loss_spike=False,
        skipped=False,
        loss=None,
        **fields,
    )


def test_nonfinite_ranks_round_trip_and_stay_out_of_normal_lines(tmp_path):
    names = ("a.weight", "b.weight")
    path = tmp_path / "ddp.jsonl"
    sink = JsonlSink(path)
    sink.write(RunStart("test", "test", tuple(ParamInfo(n, (2,), "float32") for n in names), {}, 0))
    finite, broken = np.array([1.0, 2.0], np.float32), np.array([1.0, np.nan], np.float32)
    sink.write(_step(0, names, finite))
    sink.write(_step(1, names, broken, nonfinite_ranks=(1, 3)))
    sink.write(_step(2, names, broken, nonfinite_ranks=(np.int64(2),)))  # numpy ints too
    sink.write(_step(3, names, finite))
    sink.close()
    steps = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert [s.get("nonfinite_ranks") for s in steps] == [None, [1, 3], [2], None]
    log = read_run(path)
    assert log.nonfinite_ranks == ((1, (1, 3)), (2, (2,)))  # (row, ranks)
    assert log.step[1] == 1 and log.first_nonfinite[1] == names.index("b.weight")


def test_old_logs_nonfinite_label_value_reads_as_what(tmp_path):
    path = tmp_path / "old.jsonl"
    sink = JsonlSink(path)
    sink.write(RunStart("test", "test", (ParamInfo("a.weight", (2,), "float32"),), {}, 0))
    data = {"first": "a.weight", "what": "NaN", "global_norm": math.nan}
    sink.write(gw.Event(3, "nonfinite", "step 3: NaN in `a.weight`", ("a.weight",), data))
    sink.close()
    old = {"first": "a.weight", "value": "Inf", "global_norm": "Infinity"}  # before the rename
    lines = [
        {"type": "event", "step": 5, "kind": "nonfinite", "params": ["a.weight"], "data": old},
        {"type": "event", "step": 6, "kind": "skip", "data": {"value": "kept"}},
    ]
    with open(path, "a", encoding="utf-8") as file:
        file.writelines(json.dumps(line) + "\n" for line in lines)
    events = read_run(path).events
    assert [e.data.get("what") for e in events] == ["NaN", "Inf", None]
    assert "value" not in events[1].data and events[1].data["global_norm"] == "Infinity"
    assert events[0].data["global_norm"] == "NaN"  # a number in data stays its string
    assert events[2].data == {"value": "kept"}  # only a non-finite event's label is renamed


@pytest.mark.parametrize("damage", ['"nonfinite":["x"]', '"nonfinite_ranks":["x"]'])
def test_step_with_an_unreadable_sparse_field_is_skipped_whole(tmp_path, damage):
    path = tmp_path / "damaged.jsonl"
    _train([JsonlSink(path)], steps=5)
    lines = path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace('"skipped":false', f'"skipped":false,{damage}', 1)  # step 2
    path.write_text("".join(lines))
    log = read_run(path)
    assert log.bad_lines == 1
    assert log.step.tolist() == [0, 1, 3, 4] and log.norms.shape == (4, 6)
    assert not log.nonfinite.any() and log.nonfinite_ranks == ()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b"\n\n", "is empty"),
        (b"hello world\n", "not a gradwatch run log"),
        (b'{"type": "step", "step": 0}\n', "not a gradwatch run log"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not a gradwatch run log"),
        (b'{"type":"header","format":"gradwatch.jsonl","params":[{"na', "ends inside its header"),
        (b'{"type":"header","format":"gradwatch.jsonl","format_version":99}\n', "newer"),
    ],
)
def test_unreadable_logs_raise_one_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(RunLogError, match=match) as info:
        read_run(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_log(tmp_path):
    with pytest.raises(RunLogNotFoundError, match="does not exist") as info:
        read_run(tmp_path / "nope.jsonl")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(RunLogError, match="is a directory"):
        read_run(tmp_path)


def test_invalid_arguments_name_the_argument(tmp_path):
    with pytest.raises(ConfigError, match="every must be an int >= 1, got 0"):
        JsonlSink(tmp_path / "a.jsonl", every=0)
    with pytest.raises(ConfigError, match="mode"):
        JsonlSink(tmp_path / "b.jsonl", mode="w")  # type: ignore[arg-type]
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()


# ------------------------------------------------------------------------------ where the log goes


def test_missing_folders_are_created_and_earlier_runs_kept(tmp_path):
    path = tmp_path / "out" / "run 1" / "grads.jsonl"  # e.g. a Trainer's output_dir, not made yet
    _train([JsonlSink(path)], steps=3)
    first = path.read_bytes()
    _train([JsonlSink(path, mode="a")], steps=4)
    assert path.read_bytes().startswith(first)  # appending never rewrites what was there
    assert len(read_run(path, run=0)) == 3 and len(read_run(path)) == 4


def test_a_path_through_a_file_names_the_argument_and_the_file(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("precious\n")
    for path in (blocker / "run.jsonl", blocker / "deeper" / "run.jsonl"):
        with pytest.raises(NotADirectoryError) as info:
            JsonlSink(path)
        message = str(info.value)
        assert f"path={str(path)!r}" in message
        assert f"{str(blocker)!r} is a file, not a folder" in message
    assert blocker.read_text() == "precious\n"


@pytest.mark.parametrize("mode", ["x", "a"])
def test_a_folder_as_path_is_refused_clearly(tmp_path, mode):
    with pytest.raises(IsADirectoryError, match="JsonlSink path is a directory") as info:
        JsonlSink(tmp_path, mode=mode)
    assert str(tmp_path) in str(info.value)


# ------------------------------------------------------------------------------ mistyped records

_DELETE = object()


@pytest.fixture(scope="module")
def clean_lines(tmp_path_factory):
    """A 6-step log with a NaN at step 3: header, steps 0-2, step 3, its event, 4, 5, summary."""
    path = tmp_path_factory.mktemp("clean") / "run.jsonl"
    _train([JsonlSink(path)], steps=6, nan_at=3)
    lines = path.read_text().splitlines(keepends=True)
    assert json.loads(lines[5])["type"] == "event" and json.loads(lines[-1])["type"] == "summary"
    return lines


def _damage(tmp_path, lines, index, changes):
    """The log with line ``index`` re-encoded after ``changes`` (a key set, or deleted)."""
    record = json.loads(lines[index])
    for key, value in changes.items():
        if value is _DELETE:
            del record[key]
        else:
            record[key] = value  # an existing key keeps its place: norms stays last
    lines = list(lines)
    lines[index] = json.dumps(record, separators=(",", ":")) + "\n"
    path = tmp_path / "damaged.jsonl"
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize(
    ("index", "changes", "reason"),
    [
        (3, {"step": "x"}, "step record: field 'step' must be an integer, got \"x\""),
        (3, {"step": 2.5}, "step record: field 'step' must be an integer, got 2.5"),
        (3, {"step": True}, "step record: field 'step' must be an integer, got true"),
        (3, {"step": _DELETE}, "step record: field 'step' is missing"),
        (3, {"global_norm": "abc"}, "step record: field 'global_norm' must be a number, "),
        (3, {"loss": [1]}, "step record: field 'loss' must be a number"),
        (3, {"spike": "maybe"}, "step record: field 'spike' must be true or false, got \"maybe\""),
        (3, {"norms": [[1], 2, 3, 4, 5, 6]}, "field 'norms' must be a list of numbers or null"),
        (3, {"norms": [1, "1.5", 1, 1, 1, 1]}, "field 'norms' must be a list of numbers or null"),
        (3, {"norms": [1.0]}, "field 'norms' must hold one value per parameter of the header (6)"),
        (3, {"norms": "abc"}, "step record: field 'norms' must be a list of numbers or null"),
        (4, {"nonfinite": [9]}, "step record: field 'nonfinite' must hold positions"),
        (5, {"step": "3"}, "event record: field 'step' must be an integer, got \"3\""),
        (5, {"kind": _DELETE}, "event record: field 'kind' is missing"),
        (5, {"params": "2.weight"}, "event record: field 'params' must be a list of strings"),
        (-1, {"layers": [{"name": "0", "steps": "many"}]}, "field 'layers[0].steps' must be an"),
        (-1, {"steps": None}, "summary record: field 'steps' must be an integer, got null"),
    ],
)
def test_a_mistyped_record_is_skipped_whole_and_named(
    tmp_path, clean_lines, index, changes, reason
):
    path = _damage(tmp_path, clean_lines, index, changes)
    log = read_run(path)
    ((line, why),) = log.skipped_lines
    assert line == (index % len(clean_lines)) + 1  # numbered from 1, as editors do
    assert reason in why, why
    steps = [0, 1, 2, 3, 4, 5]
    if index in (3, 4):
        steps.remove(index - 1)
    assert log.step.tolist() == steps and log.norms.shape == (len(steps), 6)
    assert np.isfinite(log.norms[log.step != 3]).all()  # nothing of a bad row leaks in as NaN
    assert len(log.events) == (0 if index == 5 else 1)
    assert (log.summary is None) == (index == -1) and log.bad_lines == 1


def test_a_step_written_by_another_tool_is_read(tmp_path, clean_lines):
    record = json.loads(clean_lines[3])
    norms = record.pop("norms")
    moved = json.dumps({"norms": norms, **record})  # norms first, default separators
    lines = [*clean_lines[:3], moved + "\n", *clean_lines[4:]]
    path = tmp_path / "other.jsonl"
    path.write_text("".join(lines))
    log = read_run(path)
    assert log.skipped_lines == () and log.step.tolist() == [0, 1, 2, 3, 4, 5]
    assert log.norms[2].tolist() == pytest.approx(norms)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"params": "x"}, "field 'params' must be a list of JSON objects, got \"x\""),
        ({"params": [{"shape": [2]}]}, "field 'params[0].name' is missing"),
        ({"every": "2"}, "field 'every' must be an integer, got \"2\""),
        ({"every": 0}, "field 'every' must be an integer >= 1, got 0"),
        ({"config": [1]}, "field 'config' must be a JSON object, got [1]"),
    ],
)
def test_a_mistyped_header_is_one_error_naming_line_and_field(
    tmp_path, clean_lines, changes, field
):
    path = _damage(tmp_path, clean_lines, 0, changes)
    with pytest.raises(RunLogError) as info:
        read_run(path)
    message = str(info.value)
    assert message.startswith(f"{str(path)!r} line 1: unreadable run header: ")
    assert field in message and "\n" not in message


def test_learning_rate_of_the_attached_optimizer_is_recorded_and_read_back(tmp_path):
    path = tmp_path / "run.jsonl"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    watch = gw.GradWatch(model, sinks=[JsonlSink(path)]).attach(opt)
    for i in range(5):
        model(torch.randn(3, 4, generator=torch.Generator().manual_seed(i))).sum().backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    seen = [r.lr for r in watch.history]
    watch.close()
    assert seen == [0.1, 0.1, 0.05, 0.05, 0.025]  # the rate each step was taken with
    assert read_run(path).lr.tolist() == seen
    unattached, _ = _train([JsonlSink(tmp_path / "plain.jsonl")], steps=2)
    assert all(r.lr is None for r in unattached.history)  # no optimizer: no key, NaN on read
    assert np.isnan(read_run(tmp_path / "plain.jsonl").lr).all()
