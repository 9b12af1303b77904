"""NaN/Inf provenance: forward or backward, which parameter and module, without anomaly mode.

Faults are injected at known places in small real models and must be found *and* named. The
forensics hooks must not read a device value on the host during a clean step.
"""

from __future__ import annotations

import io
import math
import warnings
import zipfile
from typing import Any

import pytest
import torch
from conftest import Events
from test_sync import count_host_reads
from torch import nn

import gradwatch as gw

GAIN = 2.34


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chain(depth: int = 20, width: int = 4) -> nn.Sequential:
    """Equal Linear layers (gain 2.34 each, no biases) with ReLUs: the signal grows ×2.34/layer."""
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(width, width if i < depth - 1 else 1, bias=False)
        nn.init.constant_(linear.weight, GAIN / width)
        layers += [linear, nn.ReLU()] if i < depth - 1 else [linear]
    return nn.Sequential(*layers)


def _overflowing_loss(model: nn.Module) -> torch.Tensor:
    """A finite loss whose backward overflows: the signal grows ×2.34 per layer past 3.4e38."""
    x = torch.full((8, 4), GAIN**-20)
    return model(x).square().mean() * 1e35


def _first_inf_signal(model: nn.Sequential) -> str:
    """Reference: the first module (in backward order) whose output gradient holds Inf."""
    outputs = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            outputs[name] = output

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_children()]
    _overflowing_loss(model).backward()
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)
    bad = [n for n in sorted(outputs, key=int, reverse=True) if torch.isinf(outputs[n].grad).any()]
    return bad[0]


def test_anomaly_mode_misses_inf_in_backward_that_gradwatch_names() -> None:
    model = chain()
    # The premise: a finite loss, Inf gradients, no NaN, and anomaly mode says nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anomaly mode warns that it is slow
        with torch.autograd.detect_anomaly():
            loss = _overflowing_loss(model)
            loss.backward()  # does not raise: anomaly mode only looks for NaN
    assert math.isfinite(loss.item())
    grads = [p.grad for p in model.parameters()]
    assert any(torch.isinf(g).any() for g in grads)
    assert not any(torch.isnan(g).any() for g in grads)
    model.zero_grad(set_to_none=True)
    expected = _first_inf_signal(model)

    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    loss = _overflowing_loss(model)
    with watch.backward(loss=loss):
        loss.backward()
    findings = watch.close().findings
    (event,) = sink.events
    assert event.kind == "nonfinite"
    assert event.data["stage"] == "backward"
    assert event.data["first_signal"] == expected
    assert event.data["first_activation"] is None  # the forward pass was finite
    kind = type(model[int(expected)]).__name__  # a ReLU's output gradient counts too
    assert f"the gradient of `{expected}` ({kind})'s output was the first to go non-finite" in (
        event.message
    )
    (finding,) = [f for f in findings if f.kind == "nonfinite"]
    # At step 0 the signal grows x2.34 per layer until it overflows: the initialisation, named
    # at the input end of the chain; never the learning rate (no update yet).
    assert (finding.cause, finding.first_step) == ("initialization", 0)
    assert "in backward" in finding.evidence
    assert not any("learning rate" in r for r in finding.remedies)


class LogLayer(nn.Module):
    """``log`` of a learned affine map: NaN in forward once the argument goes negative."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x * self.scale)


def _log_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 4), nn.Sigmoid(), LogLayer(4), nn.Linear(4, 4), nn.Linear(4, 1)
    )


def test_forward_nan_names_the_first_module_whose_output_went_nan() -> None:
    model = _log_model()
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    x = torch.rand(8, 4)
    for step in range(4):
        if step == 2:
            with torch.no_grad():
                model[2].scale[1] = -1.0  # log of a negative number at layer 2
        model.zero_grad()
        loss = model(x).pow(2).mean()
        with watch.backward(loss=loss):
            loss.backward()
    watch.close()
    event = sink.events[0]
    assert event.step == 2
    assert event.data["stage"] == "forward"
    assert event.data["first_activation"] == "2"  # the LogLayer, not the Linears after it
    assert "from `2`: the output of `2` (LogLayer) was the first to go non-finite" in (
        event.message
    )
    assert event.cause == "forward_numerics"


def test_nan_in_the_input_is_blamed_on_the_input() -> None:
    model = _log_model()
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    x = torch.rand(8, 4)
    x[3, 1] = math.nan
    loss = model(x).pow(2).mean()
    with watch.backward(loss=loss):
        loss.backward()
    watch.close()
    (event,) = sink.events
    assert event.data["first_activation"] == "<input>"
    assert "the model's input already held NaN/Inf" in event.message


def test_evaluation_forwards_are_not_recorded() -> None:
    model = _log_model()
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    with torch.no_grad():  # a validation batch full of NaN between training steps
        model(torch.full((2, 4), math.nan))
    model.zero_grad()
    loss = model(torch.rand(8, 4)).pow(2).mean()
    with watch.backward(loss=loss):
        loss.backward()
    watch.close()
    assert sink.events == []


def test_nan_made_in_backward_is_named_at_the_module_it_entered() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(6, 6) for _ in range(5)), nn.Linear(6, 1))
    poison = [False]

    def hook(module, args, output):
        if poison[0]:
            output.register_hook(lambda g: torch.full_like(g, math.nan))

    model[3].register_forward_hook(hook)  # registered before gradwatch's: runs first
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    for step in range(3):
        poison[0] = step == 1
        model.zero_grad()
        loss = model(torch.randn(8, 6)).pow(2).mean()
        with watch.backward(loss=loss):
            loss.backward()
    watch.close()
    (event,) = sink.events
    assert event.step == 1
    assert event.data["stage"] == "backward"
    assert event.data["first_signal"] == "3"
    assert event.data["first"] in ("3.weight", "3.bias")  # first poisoned in backward order
    assert event.data["module"] == "3" and event.data["module_type"] == "Linear"
    assert event.data["shape"] in ("(6, 6)", "(6,)")


def test_without_forensics_provenance_still_says_forward_or_backward() -> None:
    model = chain()
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink])
    loss = _overflowing_loss(model)
    with watch.backward(loss=loss):
        loss.backward()
    watch.close()
    (event,) = sink.events
    assert event.data["stage"] == "backward" and event.data["first_signal"] is None
    assert "(Linear `" in event.message and "shape (" in event.message


def _sgd_steps(watch: gw.GradWatch, model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    """``n`` training steps on random 8-feature batches, the watcher around each backward."""
    for _ in range(n):
        opt.zero_grad()
        loss = model(torch.randn(8, 8)).pow(2).mean()
        with watch.backward(loss=loss):
            loss.backward()
        opt.step()


def test_forensics_makes_no_host_reads_on_clean_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, sinks=[], forensics=True).attach(opt)

    _sgd_steps(watch, model, opt, 3)  # warm up outside the counter (call patterns, caches)
    with count_host_reads() as counts:  # 70 steps cross emission, health and weight batches
        _sgd_steps(watch, model, opt, 70)
    assert counts == dict.fromkeys(counts, 0), counts
    watch.flush()
    health = watch.health_detector.report()
    assert health.steps == 73 and health.finite_steps == 73
    assert all(math.isfinite(v) for v in health.signal_log)  # the hooks did record
    assert all(math.isfinite(v) for v in health.update_log)  # and the learning rate was known


def _global_hooks() -> int:
    module = torch.nn.modules.module
    return sum(
        len(getattr(module, name))
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )


def _module_state(model: nn.Module) -> list[tuple[int, int, bool]]:
    """What gradwatch could leave on the modules: hooks, and a routed call slot."""
    return [
        (len(m._forward_hooks), len(m._forward_pre_hooks), "_compiled_call_impl" in vars(m))
        for m in model.modules()
    ]


def test_close_removes_the_forensics_hooks() -> None:
    model = _log_model()
    before = _module_state(model)
    hooks = _global_hooks()
    watch = gw.GradWatch(model, sinks=[], forensics=True)
    assert _global_hooks() == hooks  # no global hook: other models run untouched
    assert [state[:2] for state in _module_state(model)] == [state[:2] for state in before]
    assert all(routed for _, _, routed in _module_state(model))  # every call slot is routed
    watch.close()
    assert _global_hooks() == hooks
    assert _module_state(model) == before


def test_finite_outputs_with_an_overflowing_loss_blame_the_loss() -> None:
    model = chain()
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    x = torch.full((8, 4), 1e21 * GAIN**-20)  # outputs ~1e21: finite, their square is not
    loss = nn.functional.mse_loss(model(x), torch.zeros(8, 1))
    with watch.backward(loss=loss):
        loss.backward()
    findings = watch.close().findings
    (event,) = sink.events
    assert math.isinf(loss.item())
    assert event.data["stage"] == "forward" and event.data["first_activation"] is None
    assert "from the loss: the loss was inf while every module's output was finite" in (
        event.message
    )
    (finding,) = [f for f in findings if f.kind == "nonfinite"]
    # The loss is where it showed; the huge outputs come from the 20-layer x2.34 chain at step 0.
    assert finding.params[0] == "loss" and finding.cause == "initialization"


# --------------------------------------------------------------- every module, nothing stored


def _train_step(watch: gw.GradWatch, model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    loss = model(x).pow(2).mean()
    with watch.backward(loss=loss):
        loss.backward()


def _first_activation(model: nn.Module, x: torch.Tensor) -> tuple[str | None, str | None]:
    """What forensics names for one step: from the probe itself and from the watcher's record."""
    sink = Events()
    watch = gw.GradWatch(model, sinks=[sink], forensics=True)
    acts = watch._path.bound.probe.activations
    probe = []
    original = acts.capture
    acts.capture = lambda *args: probe.append(original(*args)) or probe[-1]
    _train_step(watch, model, x)
    watch.flush()
    first, _ = acts.first_nonfinite(probe[0])
    named = None if first is None else (*acts.names, "<input>")[first]
    (origin,) = watch.health_detector.report().nonfinite
    watch.close()
    assert sink.events[0].data["first_activation"] == origin.first_activation
    return named, origin.first_activation


class Log(nn.Module):
    """``log`` of its input: parameter-free, -inf on a zero feature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class Standardise(nn.Module):
    """(x - mean) / std over the batch, without epsilon: NaN on a constant feature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0)) / x.std(0)


def test_a_parameter_free_module_that_makes_the_nan_is_named() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Log(), nn.Linear(4, 4), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = 0.0  # feature 1 is exactly 0 after the ReLU: log gives -inf
    assert _first_activation(model, torch.rand(8, 4)) == ("2", "2")  # not the next Linear


def test_a_standardisation_without_epsilon_on_a_constant_feature_is_named() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Standardise(), nn.Linear(4, 4), nn.Linear(4, 1))
    x = torch.rand(8, 4)
    with torch.no_grad():
        model[0].weight[2] = 0.0  # feature 2 is the bias for every row: std 0, 0/0 = NaN
    assert _first_activation(model, x) == ("1", "1")


class LogRoot(nn.Module):
    """The root's own forward makes the NaN: ``log`` of what its children computed."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.log(self.features(x)))


class LogBetween(nn.Module):
    """A container whose own code (between two children) makes the NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.log(self.first(x)))


def test_a_nan_made_by_the_roots_own_forward_blames_the_root() -> None:
    torch.manual_seed(0)
    model = LogRoot()
    with torch.no_grad():
        model.features[0].weight[0] = -1.0  # feature 0 is 0 after the ReLU: log gives -inf
        model.features[0].bias[0] = 0.0
    assert _first_activation(model, torch.rand(8, 4)) == ("LogRoot", "LogRoot")


def test_a_nan_made_between_two_children_blames_their_parent() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), LogBetween(), nn.Linear(4, 1))
    with torch.no_grad():
        model[1].first.weight[3] = -1.0  # negative feature: log gives NaN
        model[1].first.bias[3] = 0.0
    assert _first_activation(model, torch.rand(8, 4)) == ("1", "1")  # not `1.second`


def test_a_nan_in_the_input_is_not_blamed_on_the_root_that_passes_it_on() -> None:
    torch.manual_seed(0)
    model = LogRoot()
    x = torch.rand(8, 4)
    x[2, 0] = math.nan
    assert _first_activation(model, x) == ("<input>", "<input>")


def test_a_sequential_does_not_steal_the_blame_from_its_child() -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Log())
    model = nn.Sequential(nn.Sequential(inner), nn.Identity(), nn.Linear(4, 1))
    with torch.no_grad():
        inner[0].weight[1] = 0.0
        inner[0].bias[1] = 0.0
    named = _first_activation(model, torch.rand(8, 4))
    assert named == ("0.0.2", "0.0.2")  # the Log, not the Sequentials that return its output


def test_containers_returning_a_childs_output_share_its_record() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Identity())
    watch = gw.GradWatch(model, sinks=[], forensics=True)
    acts = watch._path.bound.probe.activations
    x = torch.rand(8, 4)
    _train_step(watch, model, x)
    watch.flush()
    row = acts.read(acts._ring.written - 1)
    watch.close()
    names = dict(zip(acts.names, range(len(acts.names))))
    assert acts.names == ("Sequential", "0", "0.0", "0.1", "1")
    tanh = float(row.forward[names["0.1"]])
    expected = torch.tanh(model[0][0](x)).abs().max().item()
    assert tanh == pytest.approx(expected)
    # The containers and the Identity return the Tanh's output: same value, recorded once.
    assert [float(row.forward[names[n]]) for n in ("Sequential", "0", "1")] == [tanh] * 3
    assert row.forward[-1] == pytest.approx(x.abs().max().item())  # the input
    grads = [float(row.backward[names[n]]) for n in ("Sequential", "0", "0.1", "1")]
    assert grads[0] > 0 and grads == [grads[0]] * 4  # the output gradient, shared


class LogThroughIdentity(nn.Module):
    """The container's own ``log`` passes through an ``nn.Identity`` child, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.wrap = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.second = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.act(self.wrap(torch.log(self.first(x)))))


def test_an_identity_passing_its_parents_nan_on_is_not_blamed() -> None:
    torch.manual_seed(0)
    model = LogThroughIdentity()
    with torch.no_grad():
        model.first.weight[0] = -1.0  # negative feature: log gives NaN in the root's own code
        model.first.bias[0] = 0.0
    root = "LogThroughIdentity"
    assert _first_activation(model, torch.rand(8, 4)) == (root, root)


def test_an_in_place_activation_is_recorded_after_its_change() -> None:
    torch.manual_seed(0)
    model = LogThroughIdentity()
    with torch.no_grad():
        model.first.weight.abs_()
        model.first.bias.abs_()  # positive outputs: log finite, of either sign
    watch = gw.GradWatch(model, sinks=[], forensics=True)
    acts = watch._path.bound.probe.activations
    x = torch.rand(8, 4)
    _train_step(watch, model, x)
    watch.flush()
    row = acts.read(acts._ring.written - 1)
    watch.close()
    names = dict(zip(acts.names, range(len(acts.names))))
    logged = torch.log(model.first(x))
    assert float(row.forward[names["wrap"]]) == pytest.approx(logged.abs().max().item())
    assert logged.min() < 0 < logged.max()  # the premise: the ReLU changes something
    relu = logged.clamp(min=0).abs().max().item()
    assert float(row.forward[names["act"]]) == pytest.approx(relu)  # after the in-place ReLU


def test_relu_records_are_the_max_abs_of_what_they_returned() -> None:
    """A ReLU's record is derived from its input's (relu of its min and max), never reduced
    again: exact, -inf and NaN included, and not derived where a hook changed the call."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(inplace=True), nn.ReLU(),
        nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
    )  # fmt: skip
    with torch.no_grad():
        model[0].weight[0] = -3e38  # feature 0 is -inf, made 0 by the ReLU
        model[7].weight[1] = math.nan  # feature 1 is NaN through the ReLU
    model[6].register_forward_hook(lambda m, args, out: out * 3)  # another output
    model[8].register_forward_pre_hook(lambda m, args: (args[0] - 1,))  # another input
    expected: dict[str, float] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            expected.setdefault(name, out.abs().max().item())

        return hook

    for name, child in model.named_children():  # after those hooks: sees what flows on
        child.register_forward_hook(keep(name))
    watch = gw.GradWatch(model, sinks=[], forensics=True)
    acts = watch._path.bound.probe.activations
    recorder = acts._recorder
    loss = model(torch.rand(8, 4)).sum()
    derived = {acts.names[recorder.forward.calls[p]] for p in recorder.derived}
    with watch.backward(loss=loss):
        loss.backward()
    watch.flush()
    row = acts.read(acts._ring.written - 1)
    watch.close()
    assert derived == {"1", "3", "4", "10"}  # not the ReLUs whose call a hook changed
    assert math.isinf(expected["0"]) and math.isnan(expected["7"])  # the premise
    names = dict(zip(acts.names, range(len(acts.names))))
    recorded = {name: float(row.forward[names[name]]) for name in expected}
    assert recorded == pytest.approx(expected, rel=0, abs=0, nan_ok=True)


class WordModel(nn.Module):
    """A model saved whole, as pytorch/examples' word_language_model does."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize(
    "options",
    [{}, {"forensics": True}, {"forensics": True, "track_micro_batches": True}],
    ids=["default", "forensics", "forensics+micro"],
)
def test_the_whole_model_saves_and_loads_weights_only_while_watched(tmp_path, options) -> None:
    torch.manual_seed(0)
    model = WordModel()
    watch = gw.GradWatch(model, sinks=[], **options)
    x = torch.rand(8, 4)
    for _ in range(2):
        _train_step(watch, model, x)
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with torch.serialization.safe_globals([WordModel, nn.Sequential, nn.Linear, nn.Tanh]):
        loaded = torch.load(path)  # weights_only=True: fails on any pickled hook
    assert all(not m._forward_hooks for m in loaded.modules())
    torch.testing.assert_close(loaded(x), model(x))
    _train_step(watch, model, x)  # the watcher goes on
    watch.close()
    assert len(watch.history) == 3


def _pickled(model: nn.Module) -> bytes:
    """The pickle ``torch.save(model)`` writes (the archive's other records carry a fresh id)."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    with zipfile.ZipFile(buffer) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


def test_torch_save_writes_the_same_pickle_while_watched() -> None:
    torch.manual_seed(0)
    model = WordModel()
    bare = _pickled(model)
    watch = gw.GradWatch(model, sinks=[], forensics=True)
    _train_step(watch, model, torch.rand(8, 4))
    assert _pickled(model) == bare  # gradwatch routes the calls through nothing torch pickles
    watch.close()


_GRAPHS: list[object] = []


def _counting_backend(gm, example_inputs):
    """A dynamo backend that counts the graphs it compiles. At module level, so a model whose
    compile arguments are kept on it (Lightning, once imported, records them) still pickles."""
    _GRAPHS.append(gm)
    return gm.forward


def _compile_counter() -> tuple[list[object], Any]:
    _GRAPHS.clear()
    return _GRAPHS, _counting_backend


@pytest.mark.parametrize("forensics", [False, True], ids=["default", "forensics"])
def test_a_compiled_model_watched_makes_torch_warn_about_nothing(tmp_path, forensics) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = WordModel()
    graphs, backend = _compile_counter()
    compiled = torch.compile(model, backend=backend)
    x = torch.rand(8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = gw.GradWatch(compiled, sinks=[], forensics=forensics)
        for _ in range(3):
            _train_step(watch, compiled, x)
        torch.save(model, tmp_path / "model.pt")  # the watcher open
        # (the backend too: once Lightning is imported, it keeps compile arguments on the model)
        allowed = [WordModel, nn.Sequential, nn.Linear, nn.Tanh, _counting_backend]
        with torch.serialization.safe_globals(allowed):
            loaded = torch.load(tmp_path / "model.pt")
        watch.close()
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert len(graphs) == 1  # compiled once: nothing of gradwatch's is traced or guarded on
    assert len(watch.history) == 3
    torch.testing.assert_close(loaded(x), model(x))


def test_an_eager_model_watched_beside_a_compiled_one_is_recorded_quietly() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, other = WordModel(), WordModel()
    graphs, backend = _compile_counter()
    fast = torch.compile(other, backend=backend)
    x = torch.rand(8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch = gw.GradWatch(model, sinks=[], forensics=True)
        acts = watch._path.bound.probe.activations
        for _ in range(3):
            fast(x).sum().backward()  # e.g. a compiled teacher, or a loss network
            _train_step(watch, model, x)
        watch.flush()
        row = acts.read(acts._ring.written - 1)
        watch.close()
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert len(graphs) == 1
    assert (row.forward > 0).all() and (row.backward > 0).all()  # every module recorded


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_model_compiled_in_place_keeps_its_compiled_call(when) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = WordModel()
    graphs, backend = _compile_counter()
    x = torch.rand(8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if when == "before":
            model.compile(backend=backend)
        watch = gw.GradWatch(model, sinks=[], forensics=True)
        if when == "after":
            model.compile(backend=backend)  # replaces the root's routed call slot
        compiled_call = model._compiled_call_impl
        for _ in range(3):
            _train_step(watch, model, x)
        watch.close()
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert len(graphs) == 1  # the routed children are traced through, not recompiled
    assert model._compiled_call_impl is compiled_call  # close() leaves the user's slot
    assert not any("_compiled_call_impl" in vars(m) for m in model.modules() if m is not model)
    assert len(watch.history) == 3


def test_the_children_of_a_data_parallel_are_left_alone() -> None:
    model = nn.DataParallel(WordModel())  # its replicas would copy the children's call slots
    watch = gw.GradWatch(model, sinks=[], forensics=True)
    routed = [name for name, m in model.named_modules() if "_compiled_call_impl" in vars(m)]
    assert routed == [""]
    _train_step(watch, model, torch.rand(8, 4))
    watch.close()
    assert not any("_compiled_call_impl" in vars(m) for m in model.modules())


def test_other_models_are_neither_recorded_nor_changed() -> None:
    torch.manual_seed(0)
    model = _log_model()
    other = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    watch = gw.GradWatch(model, sinks=[], forensics=True)
    recorder = watch._path.bound.probe.activations._recorder
    x = torch.rand(8, 4)
    expected = other(x)
    out = other(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    assert recorder.forward.calls == [] and recorder.backward.calls == []  # nothing recorded
    model(x).sum()
    assert len(recorder.forward.calls) == 6  # the input, then the five children
    watch.close()
    model(x).sum()
    assert len(recorder.take().forward_calls) == 0  # closed: the calls are routed no more


def test_a_dropped_watcher_unroutes_the_modules() -> None:
    import gc
    import weakref

    model = _log_model()
    before = _module_state(model)
    watch = gw.GradWatch(model, sinks=[], forensics=True)
    _train_step(watch, model, torch.rand(8, 4))
    ref = weakref.ref(watch)
    del watch
    gc.collect()
    assert ref() is None and _module_state(model) == before


def test_forensics_on_a_deep_model_makes_no_host_reads() -> None:
    """The same sync check as test_sync's, with forensics on, on a model with containers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()), LogBetween8(), nn.Identity(), nn.Linear(8, 1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, sinks=[], forensics=True).attach(opt)

    _sgd_steps(watch, model, opt, 3)
    with count_host_reads() as counts:
        _sgd_steps(watch, model, opt, 40)
    assert counts == dict.fromkeys(counts, 0), counts
    watch.close()


class LogBetween8(nn.Module):
    """Math between two children that stays finite (softplus before log)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.log1p(nn.functional.softplus(self.first(x))))


class _LanguageModel(nn.Module):
    """word_language_model's shape: the hidden state is the forward's second argument."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.rnn = nn.LSTM(16, 16)
        self.decoder = nn.Linear(16, 20)

    def forward(self, tokens: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]) -> Any:
        out, hidden = self.rnn(self.embed(tokens), hidden)
        return self.decoder(out), hidden


def test_a_nan_in_any_argument_of_the_model_is_the_input() -> None:
    """A NaN in the hidden state handed to the model (not its first argument) is the input's,
    not the LSTM's that received it."""
    torch.manual_seed(0)
    model = _LanguageModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    events = Events()
    watch = gw.GradWatch(model, forensics=True, sinks=[events]).attach(opt)
    for step in range(20):
        tokens, targets = torch.randint(0, 20, (10, 4)), torch.randint(0, 20, (10, 4))
        hidden = (torch.zeros(1, 4, 16), torch.zeros(1, 4, 16))
        if step == 12:
            hidden[0][0, 1, 3] = float("nan")
        out, _ = model(tokens, hidden)
        loss = nn.functional.cross_entropy(out.view(-1, 20), targets.view(-1))
        opt.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        opt.step()
    finding = next(f for f in watch.diagnose() if f.kind == "nonfinite")
    watch.close()
    assert finding.params[:1] == ("input",) and finding.cause == "data"
    first = next(e for e in events.events if e.kind == "nonfinite")
    assert first.step == 12 and "from the input" in first.message and first.cause == "data"
