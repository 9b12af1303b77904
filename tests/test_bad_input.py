"""Bad input everywhere: each is rejected with an error naming the value and what is valid.

``test_errors.py`` covers the common GradWatch arguments; this file covers the rest of the public
surface (every clipper, detector and sink, the run-log reader, the methods, the CLI) and odd
models, each of which either works or fails with a clear message. Inputs that are accepted
silently or rejected with an unclear error are strict xfails naming the bug.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import clone_with_grads, mlp
from torch import nn

import gradwatch as gw
from gradwatch.cli import main
from gradwatch.report.jsonl import JsonlSink, RunLogExistsError
from gradwatch.report.logging import LoggingSink
from gradwatch.report.runlog import RunLogError, RunLogNotFoundError, read_run


def _linear() -> nn.Linear:
    return nn.Linear(2, 2)


def _watch(**kwargs) -> gw.GradWatch:
    return gw.GradWatch(_linear(), **{"sinks": [], **kwargs})


def _tensorboard(**kwargs):
    from gradwatch.report.tensorboard import TensorBoardSink

    return TensorBoardSink(**kwargs)


# (what, call, exception, pattern): the pattern names the argument and the value received.
REJECTED = [
    ("model None", lambda: gw.GradWatch(None), TypeError, r"model must be .*got NoneType"),
    ("model str", lambda: gw.GradWatch("linear"), TypeError, r"nn\.Module or an iterable.*got str"),
    ("model dict", lambda: gw.GradWatch({"w": 1}), TypeError, r"\(name, parameter\) pairs.*str"),
    ("on_nonfinite None", lambda: _watch(on_nonfinite=None), ValueError, r"'raise', got None"),
    ("on_spike case", lambda: _watch(on_spike="Warn"), ValueError, r"on_spike .*got 'Warn'"),
    ("norm_type 0", lambda: _watch(norm_type=0), ValueError, r"norm_type must be .*got 0"),
    ("norm_type nan", lambda: _watch(norm_type=math.nan), ValueError, r"norm_type .*got nan"),
    ("norm_type '2'", lambda: _watch(norm_type="2"), TypeError, r"norm_type .*got '2'"),
    ("norm_type bool", lambda: _watch(norm_type=True), TypeError, r"norm_type .*got True"),
    ("accumulation float", lambda: _watch(accumulation_steps=1.0), TypeError, r">= 1, got 1.0"),
    ("accumulation -3", lambda: _watch(accumulation_steps=-3), ValueError, r"steps .*got -3"),
    ("history 0", lambda: _watch(history=0), ValueError, r"history must be an int >= 1, got 0"),
    ("history bool", lambda: _watch(history=True), TypeError, r"history .*got True"),
    ("layer_depth 0", lambda: _watch(layer_depth=0), ValueError, r"layer_depth .*>= 1, got 0"),
    ("layer_depth str", lambda: _watch(layer_depth="2"), TypeError, r"layer_depth .*got '2'"),
    ("log_rank str", lambda: _watch(log_rank="0"), TypeError, r"log_rank must be an int .*'0'"),
    ("loss_detector", lambda: _watch(loss_detector=3), TypeError, r"loss_detector .*got int"),
    ("forensics 1", lambda: _watch(forensics=1), TypeError, r"forensics must be True or False"),
    ("health_detector", lambda: _watch(health_detector="x"), TypeError, r"HealthDetector .*str"),
    ("rank_blame, no DDP", lambda: _watch(rank_blame=True), ValueError, r"DistributedData"),
    ("attach None", lambda: _watch().attach(None), TypeError, r"Optimizer, got NoneType"),
    (
        "attach another model's optimizer",
        lambda: _watch().attach(torch.optim.SGD(_linear().parameters(), lr=0.1)),
        ValueError,
        r"optimizer \(SGD\) updates none of the 2 parameters this GradWatch watches",
    ),
    (
        "model.parameters()",
        lambda: gw.GradWatch(_linear().parameters()),
        TypeError,
        r"got a bare Parameter of shape \(2, 2\) .*GradWatch\(model\.named_parameters\(\)\)",
    ),
    (
        "lazy module",
        lambda: gw.GradWatch(nn.LazyLinear(2)),
        ValueError,
        r"parameter 'weight' is not initialised yet .*run one forward pass",
    ),
    (
        "backward loss vector",
        lambda: _watch().backward(loss=torch.ones(3)).__enter__(),
        ValueError,
        r"loss must be a scalar \(one element\), got a tensor of shape \(3,\)",
    ),
    (
        "check loss matrix",
        lambda: _watch().check(loss=torch.ones(2, 2)),
        ValueError,
        r"loss must be a scalar .*shape \(2, 2\): reduce it first",
    ),
    ("check loss list", lambda: _watch().check(loss=[1.0]), TypeError, r"number, got list"),
    ("check loss bool", lambda: _watch().check(loss=True), TypeError, r"number, got bool"),
    ("ClipNorm None", lambda: gw.ClipNorm(None), TypeError, r"max_norm\) .*got None"),
    ("ClipNorm norm -2", lambda: gw.ClipNorm(1.0, -2), ValueError, r"norm_type\) .*got -2"),
    ("ClipValue '0.5'", lambda: gw.ClipValue("0.5"), TypeError, r"clip_value\) .*got '0.5'"),
    ("ClipValue 0", lambda: gw.ClipValue(0), ValueError, r"clip_value\) .*> 0, got 0"),
    ("ZScore alpha 0", lambda: gw.ClipZScore(alpha=0), ValueError, r"alpha\) .*\(0, 1\), got 0"),
    ("ZScore z -1", lambda: gw.ClipZScore(z_threshold=-1), ValueError, r"z_threshold\) .*-1"),
    ("ZScore warmup", lambda: gw.ClipZScore(warmup=2.0), TypeError, r"warmup\) .*got 2.0"),
    ("ZScore mode", lambda: gw.ClipZScore(mode="x"), ValueError, r"'fixed', got 'x'"),
    ("ZScore max_norm", lambda: gw.ClipZScore(max_norm=0), ValueError, r"max_norm\) .*got 0"),
    ("ZScore norm_type", lambda: gw.ClipZScore(norm_type=0), ValueError, r"norm_type\) .*got 0"),
    ("Percentile 150", lambda: gw.ClipPercentile(150), ValueError, r"\[0, 100\], got 150"),
    ("Percentile nan", lambda: gw.ClipPercentile(math.nan), ValueError, r"\[0, 100\], got nan"),
    ("Percentile '10'", lambda: gw.ClipPercentile("10"), TypeError, r"percentile\) .*'10'"),
    ("Percentile history", lambda: gw.ClipPercentile(history=0), ValueError, r"history\) .*0"),
    ("Unitwise 0", lambda: gw.ClipUnitwise(0), ValueError, r"clipping\) .*> 0, got 0"),
    ("Unitwise eps", lambda: gw.ClipUnitwise(eps=-1), ValueError, r"eps\) .*got -1"),
    (
        "Unitwise unknown name",
        lambda: _watch(clip=gw.ClipUnitwise(exclude=["nope"])),
        ValueError,
        r"exclude\) name 'nope' matches no parameter; parameters are named weight, bias",
    ),
    ("Spike min_ratio", lambda: gw.SpikeDetector(min_ratio=0), ValueError, r"min_ratio .*got 0"),
    ("Spike z nan", lambda: gw.SpikeDetector(z_threshold=math.nan), ValueError, r"got nan"),
    ("Spike warmup", lambda: gw.SpikeDetector(warmup=1.5), TypeError, r"warmup .*got 1.5"),
    ("Spike alpha", lambda: gw.SpikeDetector(alpha=0.0), ValueError, r"alpha .*got 0.0"),
    ("Health 0", lambda: gw.HealthDetector(0), ValueError, r"dead_after .*>= 1, got 0"),
    ("Health str", lambda: gw.HealthDetector("x"), TypeError, r"dead_after .*got 'x'"),
    ("Console every", lambda: gw.ConsoleSink(every=-1), ValueError, r"every .*>= 0, got -1"),
    ("Console every 2.5", lambda: gw.ConsoleSink(every=2.5), TypeError, r"every .*got 2.5"),
    ("Console top_k", lambda: gw.ConsoleSink(top_k=-1), ValueError, r"top_k .*got -1"),
    ("Console rows", lambda: gw.ConsoleSink(max_rows=0), ValueError, r"max_rows .*got 0"),
    ("Console console", lambda: gw.ConsoleSink(console="out"), TypeError, r"Console or None.*str"),
    ("Logging logger", lambda: LoggingSink(3), TypeError, r"logger name, got int"),
    ("Logging level", lambda: LoggingSink(level="INFO"), TypeError, r"logging.INFO, got 'INFO'"),
    ("Logging every", lambda: LoggingSink(every=-1), ValueError, r"every .*got -1"),
    ("Logging alert", lambda: LoggingSink(alert_level=None), TypeError, r"alert_level .*None"),
    ("TensorBoard every", lambda: _tensorboard(log_dir="x", every=0), ValueError, r"every .*0"),
    ("TensorBoard none", lambda: _tensorboard(), ValueError, r"exactly one of log_dir .*None"),
    (
        "TensorBoard both",
        lambda: _tensorboard(log_dir="x", writer=object()),
        ValueError,
        r"exactly one of log_dir .*log_dir='x'",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "pattern"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED]
)
def test_rejected_with_a_clear_message(call, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern) as info:
        call()
    assert isinstance(info.value, gw.GradWatchError)  # one root, and the matching builtin


def test_bare_parameters_are_described_not_printed() -> None:
    model = nn.Linear(300, 200)
    for given in (model.parameters(), list(model.parameters())):
        with pytest.raises(TypeError) as info:
            gw.GradWatch(given)
        message = str(info.value)
        assert "tensor(" not in message and "Parameter containing" not in message
        assert len(message) < 300 and "shape (200, 300)" in message


def test_a_loss_of_one_element_in_any_shape_is_a_scalar() -> None:
    model = _linear()
    watch = gw.GradWatch(model, sinks=[])
    model(torch.ones(1, 2)).sum().backward()
    with watch.backward(loss=torch.full((1, 1), 2.5)):
        pass
    assert watch.history[-1].loss == 2.5


def test_jsonl_sink_arguments(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with pytest.raises(ValueError, match=r"mode must be one of 'x', 'a', got 'w'"):
        JsonlSink(path, mode="w")
    with pytest.raises(ValueError, match=r"every must be an int >= 1, got 0"):
        JsonlSink(path, every=0)
    path.write_text("")
    with pytest.raises(RunLogExistsError, match=r"run\.jsonl' already exists; .*mode=\"a\""):
        JsonlSink(path)
    JsonlSink(tmp_path / "missing" / "run.jsonl").close()  # a missing folder is created
    assert (tmp_path / "missing" / "run.jsonl").is_file()
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        JsonlSink(tmp_path, mode="a")
    with pytest.raises(TypeError, match=r"not NoneType"):
        JsonlSink(None)


def test_read_run_arguments(tmp_path: Path) -> None:
    with pytest.raises(RunLogNotFoundError, match=r"nope\.jsonl' does not exist"):
        read_run(tmp_path / "nope.jsonl")
    with pytest.raises(RunLogError, match=r"is a directory, not a run log file"):
        read_run(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RunLogError, match=r"empty\.jsonl"):
        read_run(empty)
    text = tmp_path / "notes.jsonl"
    text.write_text("hello\nworld\n")
    with pytest.raises(RunLogError, match=r"notes\.jsonl"):
        read_run(text)
    model = mlp(depth=1)
    with gw.GradWatch(model, sinks=[JsonlSink(tmp_path / "run.jsonl")]) as watch:
        model(torch.randn(2, 8)).sum().backward()
        watch.check()
    with pytest.raises(RunLogError, match=r"run must be in \[-1, 0\] .*got 5"):
        read_run(tmp_path / "run.jsonl", run=5)


def test_state_errors_after_close() -> None:
    model = _linear()
    watch = gw.GradWatch(model, sinks=[])
    watch.close()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for call in (watch.check, lambda: watch.attach(opt), lambda: watch.backward().__enter__()):
        with pytest.raises(gw.StateError, match=r"called after close\(\); create a new GradWatch"):
            call()


# ------------------------------------------------------------ accepted silently or unclear: bugs

_SILENT = [
    pytest.param(
        lambda: _watch(log_rank=-1),
        r"log_rank must be an int >= 0 or None, got -1",
        id="log_rank -1 accepted (no rank ever logs in a distributed run)",
    ),
    pytest.param(
        lambda: _watch(log_rank=True),
        r"log_rank .*got True",
        id="log_rank True accepted as rank 1",
    ),
    pytest.param(
        lambda: _watch(track_micro_batches="no"),
        r"track_micro_batches must be True or False, got 'no'",
        id="track_micro_batches='no' silently enables tracking",
    ),
    pytest.param(
        lambda: _watch(rank_blame="no"),
        r"rank_blame must be True or False, got 'no'",
        id="rank_blame='no' is read as True",
    ),
    pytest.param(
        lambda: _watch(sinks=[gw.ConsoleSink]),
        r"sinks\[0\] .*ConsoleSink.*instance",
        id="a sink class instead of an instance is accepted, then disabled at the first record",
    ),
    pytest.param(
        lambda: _watch(clip=gw.ClipNorm),
        r"clip .*got the class ClipNorm",
        id="clip=ClipNorm (the class) is reported as 'got type'",
    ),
    pytest.param(
        lambda: gw.GradWatch([("w", 3)]),
        r"pairs, got .*'w', 3",
        id="a (name, non-tensor) pair is reported as 'got an item of type tuple'",
    ),
    pytest.param(
        lambda: gw.ClipUnitwise(exclude=3),
        r"ClipUnitwise\(exclude\) .*got 3",
        id="ClipUnitwise(exclude=3) fails with a bare 'int object is not iterable'",
    ),
    pytest.param(
        lambda: _watch().load_state_dict("state"),
        r"state must be a dict .*got str",
        id="load_state_dict('state') fails with AttributeError",
    ),
    pytest.param(
        lambda: _watch().load_state_dict({}),
        r"missing .*'names'",
        id="load_state_dict({}) blames 'different parameters (0 names)'",
    ),
    pytest.param(
        lambda: _watch().load_state_dict({"names": ["weight", "bias"]}),
        r"missing .*'step'",
        id="load_state_dict with missing keys fails with KeyError",
    ),
]


@pytest.mark.parametrize(("call", "pattern"), _SILENT)
@pytest.mark.filterwarnings("ignore::gradwatch.GradWatchWarning")  # the disabled sink class
def test_accepted_silently_or_unclear(call, pattern) -> None:
    with pytest.raises((TypeError, ValueError), match=pattern) as info:
        call()
    assert isinstance(info.value, gw.GradWatchError)


def test_backward_rejects_a_bad_loss_before_backward_runs() -> None:
    model = _linear()
    watch = gw.GradWatch(model, sinks=[])
    with pytest.raises(TypeError, match=r"loss must be a tensor or a number, got str"):  # noqa: SIM117
        with watch.backward(loss="0.3"):
            model(torch.randn(2, 2)).sum().backward()
    assert model.weight.grad is None  # the body never ran


def test_read_run_rejects_a_run_of_the_wrong_type(tmp_path: Path) -> None:
    model = mlp(depth=1)
    with gw.GradWatch(model, sinks=[JsonlSink(tmp_path / "run.jsonl")]) as watch:
        model(torch.randn(2, 8)).sum().backward()
        watch.check()
    with pytest.raises(RunLogError, match=r"run must be an int .*got '0'"):
        read_run(tmp_path / "run.jsonl", run="0")


# ------------------------------------------------------------------------------------ CLI


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``gradwatch ARGV`` (``main`` returns it or raises SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["demo", "--steps", "abc"], r"argument --steps: invalid int value: 'abc'"),
        (["demo", "--steps"], r"argument --steps: expected one argument"),
        (["report"], r"the following arguments are required: log"),
        (["report", "x.jsonl", "--plot"], r"argument --plot: expected one argument"),
        (["bogus"], r"invalid choice: 'bogus' \(choose from 'demo', 'report'\)"),
        (["--nope"], r"unrecognized arguments: --nope|required: command"),
    ],
)
def test_cli_rejects_bad_arguments(argv, pattern, capsys) -> None:
    code, err = _cli(argv, capsys)
    assert code == 2
    assert re.search(pattern, err.strip().splitlines()[-1]), err


@pytest.mark.parametrize("steps", ["-1", "0"])
def test_cli_demo_rejects_non_positive_steps(steps: str, tmp_path: Path, capsys) -> None:
    code, err = _cli(["demo", "--steps", steps, "--log", str(tmp_path / "d.jsonl")], capsys)
    assert code == 2
    assert f"--steps must be an int >= 1, got {steps}" in err


def test_cli_report_missing_file_is_one_line(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "missing.jsonl"
    code, err = _cli(["report", str(missing)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and str(missing) in err


def test_cli_demo_unwritable_log_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    bad = tmp_path / "notes.txt" / "demo.jsonl"
    code, err = _cli(["demo", "--steps", "1", "--log", str(bad)], capsys)
    assert code == 2 and "notes.txt" in err and "is a file, not a folder" in err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cli_demo_log_into_a_missing_folder_creates_it(tmp_path: Path, capsys) -> None:
    log = tmp_path / "runs" / "new" / "demo.jsonl"  # as JsonlSink, which creates the folders
    code, _ = _cli(["demo", "--steps", "1", "--log", str(log)], capsys)
    assert code == 0 and log.is_file()


# ------------------------------------------------------------------------------ odd models


class _Grown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        return self.second(x) if hasattr(self, "second") else x


def test_odd_model_without_parameters() -> None:
    with pytest.raises(ValueError, match=r"model \(ReLU\) has no parameter with requires_grad"):
        gw.GradWatch(nn.ReLU())
    with pytest.raises(ValueError, match=r"named parameters has no parameter with requires_grad"):
        gw.GradWatch(iter([]))


def test_odd_model_only_frozen() -> None:
    model = mlp(depth=2).requires_grad_(False)
    with pytest.raises(ValueError, match=r"model \(Sequential\) has no parameter with requires"):
        gw.GradWatch(model)


def test_odd_model_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = mlp(depth=1)
    pattern = r"parameter '0.weight' is on the meta device .*model.to_empty"
    with pytest.raises(ValueError, match=pattern):
        gw.GradWatch(model)
    with pytest.raises(ValueError, match=pattern):
        gw.GradWatch(model.named_parameters())


def test_odd_model_complex_parameters() -> None:
    """Norms, NaN naming and ClipNorm work and match torch; ClipValue is refused up front."""
    torch.manual_seed(0)
    model = nn.Linear(3, 3, dtype=torch.complex64)
    model(torch.randn(4, 3, dtype=torch.complex64)).abs().sum().backward()
    reference = clone_with_grads(model)
    total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    report = gw.GradWatch(model, clip=gw.ClipNorm(0.1), sinks=[]).check()
    assert report.global_norm == total.item()
    assert all(
        torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters())
    )
    model.weight.grad[0, 0] = complex(math.nan, 0.0)
    assert gw.GradWatch(model, sinks=[]).check().nonfinite == ("weight",)
    with pytest.raises(
        ValueError,
        match=r"ClipValue cannot clamp the complex gradient of "
        r"parameter 'weight' \(complex64\).*use ClipNorm",
    ):
        gw.GradWatch(model, clip=gw.ClipValue(0.1), sinks=[])
    with pytest.raises(NotImplementedError, match=r"clamp is not supported for complex types"):
        torch.nn.utils.clip_grad_value_(reference.parameters(), 0.1)


def test_odd_model_sparse_gradients() -> None:
    """Sparse gradients work: the norm is that of the dense equivalent (duplicates summed)."""
    model = nn.Embedding(10, 4, sparse=True)
    watch = gw.GradWatch(model, sinks=[])
    model(torch.tensor([1, 2, 2, 7])).sum().backward()
    assert model.weight.grad.is_sparse and not model.weight.grad.is_coalesced()
    report = watch.check()
    expected = torch.linalg.vector_norm(model.weight.grad.to_dense()).item()
    assert report.global_norm == pytest.approx(expected, rel=1e-6)
    assert report.param_norms["weight"] == pytest.approx(expected, rel=1e-6)
    assert report.nonfinite == ()


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ("module added", "second.weight"),
        ("unfrozen", "second.weight"),
        ("replaced by load_state_dict(assign=True)", "first.weight"),
    ],
)
def test_odd_model_parameters_changed_after_construction(change: str, name: str) -> None:
    """Acceptable: the new parameter is watched, or a GradWatchWarning names it."""
    model = _Grown()
    if change == "unfrozen":
        model.second = nn.Linear(3, 1).requires_grad_(False)
    watch = gw.GradWatch(model, sinks=[])
    if change == "module added":
        model.second = nn.Linear(3, 1)
    elif change == "unfrozen":
        model.second.requires_grad_(True)
    else:
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(4, 3)).sum().backward()
        report = watch.check()
    warned = [w for w in caught if issubclass(w.category, gw.GradWatchWarning)]
    grads = [p.grad for p in model.parameters()]
    watched = report.global_norm == torch.nn.utils.get_total_norm(grads).item()
    assert watched or any(name in str(w.message) for w in warned)


def _steps(model: nn.Module, watch: gw.GradWatch, n: int) -> list[gw.StepReport]:
    reports = []
    for step in range(n):
        model.zero_grad()
        model(torch.randn(4, 3, generator=torch.Generator().manual_seed(step))).sum().backward()
        reports.append(watch.check())
    return reports


def test_parameters_added_or_unfrozen_warn_once_and_name_them() -> None:
    model = _Grown()
    model.frozen = nn.Linear(3, 3).requires_grad_(False)
    watch = gw.GradWatch(model, sinks=[])
    _steps(model, watch, 2)
    model.second = nn.Linear(3, 1)
    model.frozen.requires_grad_(True)
    with pytest.warns(gw.GradWatchWarning) as caught:
        reports = _steps(model, watch, 5)
    (warning,) = caught  # once, not once per step
    message = str(warning.message)
    for name in ("second.weight", "second.bias", "frozen.weight", "frozen.bias"):
        assert name in message
    assert "keep covering the original 2 parameters" in message
    assert all(set(r.param_norms) == {"first.weight", "first.bias"} for r in reports)
    watch.close()


def test_replaced_parameters_are_watched_again_and_clipped_exactly() -> None:
    model = _Grown()
    model.second = nn.Linear(3, 1)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(0.01), sinks=[])
    _steps(model, watch, 3)
    model.load_state_dict({k: v * 2 for k, v in model.state_dict().items()}, assign=True)
    model(torch.randn(4, 3)).sum().backward()
    reference = clone_with_grads(model)
    total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same names: followed silently
        report = watch.check()
    assert report.global_norm == total.item()
    assert all(
        torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters())
    )
    assert report.step == 3 and len(watch.history) == 4  # the run goes on, history kept
    watch.close()


def test_model_moved_between_dtypes_keeps_history_and_detectors() -> None:
    model = _Grown()
    watch = gw.GradWatch(model, sinks=[])
    _steps(model, watch, 30)
    threshold = watch.spike_detector.threshold
    model.double()
    model.zero_grad()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    report = watch.check()
    assert report.global_norm == expected.item()
    assert watch.spike_detector.count == 31 and threshold is not None
    assert [r.step for r in watch.history][-2:] == [29, 30]
    model.float()
    assert len(_steps(model, watch, 2)) == 2 and watch.step == 33
    watch.close()


def test_change_tracking_hooks_are_removed_and_never_keep_the_watcher_alive() -> None:
    import gc
    import weakref

    from torch.nn.modules import module as torch_module

    hooks = torch_module._global_parameter_registration_hooks
    model = _Grown()
    watch = gw.GradWatch(model, sinks=[])
    ids = [handle.id for handle in watch._path._changes._handles]
    assert ids and all(
        i in hooks or i in torch_module._global_module_registration_hooks for i in ids
    )
    watch.close()
    assert not any(i in hooks or i in torch_module._global_module_registration_hooks for i in ids)
    dropped = gw.GradWatch(model, sinks=[])
    ids = [handle.id for handle in dropped._path._changes._handles]
    ref = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert ref() is None
    assert not any(i in hooks or i in torch_module._global_module_registration_hooks for i in ids)
    nn.Linear(2, 2)  # registering parameters elsewhere is not an error after that


def test_odd_model_moved_to_another_dtype_after_construction() -> None:
    """model.double() / .half() after the watch was made: norms stay right (for float64, to
    float32 rounding: the statistics' dtype was chosen at construction)."""
    torch.manual_seed(0)
    model = mlp(depth=2)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(0.1), sinks=[])
    model.double()
    model(torch.randn(4, 8, dtype=torch.float64)).pow(2).mean().backward()
    reference = clone_with_grads(model)
    total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1).item()
    report = watch.check()
    assert report.global_norm == pytest.approx(total, rel=1e-6)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0.0)
    model.zero_grad()
    model.half()
    model(torch.randn(4, 8, dtype=torch.float16)).pow(2).mean().backward()
    upcast = torch.nn.utils.get_total_norm([p.grad.float() for p in model.parameters()])
    assert watch.check().global_norm == pytest.approx(upcast.item(), rel=1e-5)


def test_odd_model_moved_to_double_is_bit_exact() -> None:
    torch.manual_seed(0)
    model = mlp(depth=2)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(0.1), sinks=[])
    model.double()
    model(torch.randn(4, 8, dtype=torch.float64)).pow(2).mean().backward()
    reference = clone_with_grads(model)
    total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1).item()
    assert watch.check().global_norm == total
    assert all(
        torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters())
    )
