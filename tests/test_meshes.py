"""HSDP, FSDP2 + tensor parallel and pipeline parallel on 4 CPU processes (gloo), one launch.

Every norm is compared with one process running the whole model on the same batches; the cost
of a step (collectives, host reads) is counted on each mesh.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import gradwatch as gw

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

WORLD = 4


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    import _mesh_workers  # one torchrun launch per session, shared with test_examples.py

    return _mesh_workers.launch(tmp_path_factory.mktemp("meshes"))[0]


def _collectives(counts: dict) -> int:
    return sum(counts.values())


@pytest.mark.parametrize("mesh", ["hsdp", "tp"])
def test_sharded_meshes_equal_one_process(ranks, mesh) -> None:
    for result in (r[mesh] for r in ranks):
        assert result["names"] == result["expected_names"]  # the user's names
        assert result["global"] == pytest.approx(result["expected"], rel=1e-5)
        assert result["param_err"] < 1e-5
        assert result["clip_coef"] == pytest.approx(result["expected_coef"], rel=1e-5)
        assert result["clip_coef"] < 1.0
        assert result["clipped_err"] < 1e-7  # clipped like clip_grad_norm_ on one process
    assert len({r[mesh]["global"] for r in ranks}) == 1  # the same number on every rank


def test_hsdp_is_two_dimensional_and_tp_mixes_placements(ranks) -> None:
    assert "Replicate()" in ranks[0]["hsdp"]["placements"]
    placements = ranks[0]["tp"]["placements"]
    assert "Replicate()" in placements["2.bias"]  # RowwiseParallel's bias: copied along tp
    assert placements["4.weight"].count("Shard") == 1  # FSDP2 only, on mesh["dp"]


def test_one_collective_no_host_read_and_no_sequential_warning(ranks) -> None:
    for result in ranks:
        for mesh in ("hsdp", "tp"):
            assert result[mesh]["collectives"] == {"c10d.allreduce_": 1}
            assert result[mesh]["reads"] == 0
            assert result[mesh]["warnings"] == []
        for norm_type, got in result["tp"]["norm_types"].items():
            expected = result["tp"]["expected_norm_types"][norm_type]
            assert got["global"] == pytest.approx(expected, rel=1e-5), norm_type
            assert _collectives(got["collectives"]) == 1, (norm_type, got["collectives"])
            assert got["warnings"] == []
    # DTensor's own reduction of the same gradients does warn: the check above can see it.
    assert any("sequential" in m for r in ranks for m in r["tp"]["control_warnings"])


def test_pipeline_global_norm_and_clipping_equal_one_process(ranks) -> None:
    names = [name for r in ranks for name in r["pipeline"]["names"]]
    assert names == [f"layers.{i}.{k}" for i in range(WORLD) for k in ("weight", "bias")]
    for step in (0, 2, 4):
        entries = [r["pipeline"]["steps"][step] for r in ranks]
        for entry in entries:
            assert entry["global"] == pytest.approx(entry["expected"], rel=1e-5)
            assert entry["param_err"] < 1e-5
            assert not entry["skipped"]
            assert entry["weights_err"] < 1e-6  # trained as one process with clip_grad_norm_
        assert len({e["global"] for e in entries}) == 1
        assert len({e["clip_coef"] for e in entries}) == 1  # one factor for every stage
        assert entries[0]["clip_coef"] < 1.0


def test_pipeline_nan_skips_every_stage_and_names_it(ranks) -> None:
    for result in ranks:
        entry = result["pipeline"]["steps"][1]
        assert entry["skipped"] and entry["unchanged"]  # every stage skips together
        assert entry["clip_coef"] == 1.0
        # Every stage's report names the parameter and the stage the NaN came from.
        assert entry["nonfinite"] == ["layers.2.weight"]
        assert entry["nonfinite_ranks"] == [2]


def test_pipeline_nan_from_the_last_stage_is_named_there_by_every_stage(ranks) -> None:
    # The NaN enters stage 3's output gradient and flows back through every stage: it met
    # stage 3's parameters first (bias, then weight, as backward reaches them).
    backward = [f"layers.{i}.{k}" for i in reversed(range(WORLD)) for k in ("bias", "weight")]
    for result in ranks:
        entry = result["pipeline"]["steps"][3]
        assert entry["skipped"] and entry["unchanged"]
        assert entry["nonfinite"] == backward
        assert entry["nonfinite_ranks"] == [0, 1, 2, 3]


def test_every_stage_reports_the_whole_model(ranks) -> None:
    everything = [f"layers.{i}.{k}" for i in range(WORLD) for k in ("weight", "bias")]
    for result in ranks:
        for step in (0, 2, 4):
            entry = result["pipeline"]["steps"][step]
            assert list(entry["reported"]) == everything  # every stage's names, stage order
            assert _relative_err(entry["reported"], entry["expected_all"]) < 1e-5
            # The loss only the last stage computes, on every stage.
            assert entry["loss"] == pytest.approx(entry["expected_loss"], rel=1e-5)
    # The logging rank's run log: every layer at every step, the NaN's parameter and stage.
    log = gw.read_run(ranks[0]["pipeline"]["log"])
    assert list(log.names) == everything
    assert [p.name for p in log.header.params] == everything
    assert log.nonfinite.tolist() == [False, True, False, True, False, False]  # + a cost check
    assert log.loss[[0, 2, 4]] == pytest.approx(
        [ranks[0]["pipeline"]["steps"][i]["expected_loss"] for i in (0, 2, 4)], rel=1e-5
    )
    assert log.names[log.first_nonfinite[1]] == "layers.2.weight"
    assert log.names[log.first_nonfinite[3]] == "layers.3.bias"
    assert log.nonfinite_ranks == ((1, (2,)), (3, (0, 1, 2, 3)))
    alert = next(e for e in log.events if e.kind == "nonfinite")
    assert "layers.2.weight" in alert.message and "from rank 2" in alert.message
    assert {layer.name for layer in log.summary.layers} == {f"layers.{i}" for i in range(WORLD)}


def test_stages_with_the_same_names_are_told_apart(ranks) -> None:
    for result in (r["pipeline"] for r in ranks):
        assert result["separate_own"] == ["weight", "bias"]  # the watcher's own names
        assert result["separate_names"] == [
            f"stage{i}.{k}" for i in range(WORLD) for k in ("weight", "bias")
        ]


def _relative_err(got: dict[str, float], expected: dict[str, float]) -> float:
    return max(abs(got[n] - expected[n]) / expected[n] for n in expected)


def test_pipeline_step_cost(ranks) -> None:
    for result in ranks:
        pipeline = result["pipeline"]
        assert pipeline["collectives"] == {"c10d.allreduce_": 1}
        assert pipeline["reads"] == 0
        # A policy that must decide now: one more collective and its two reads (the global
        # norm; the all-reduced decision), no more.
        assert pipeline["decision_collectives"] == {"c10d.allreduce_": 2}
        assert pipeline["decision_reads"] == 2


def test_pipeline_of_sharded_stages(ranks) -> None:
    # pp x dp: 2 stages, each FSDP-sharded over its dp slice; pipeline_group is mesh["pp"].
    names = {tuple(r["pipeline_fsdp"]["names"]) for r in ranks}
    assert names == {
        ("layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"),
        ("layers.2.weight", "layers.2.bias", "layers.3.weight", "layers.3.bias"),
    }
    for result in (r["pipeline_fsdp"] for r in ranks):
        assert result["global"] == pytest.approx(result["expected"], rel=1e-5)
        assert result["param_err"] < 1e-5
        assert result["clip_coef"] == pytest.approx(result["expected_coef"], rel=1e-5)
        # The stage's mesh, then the stages: two all-reduces.
        assert result["collectives"] == {"c10d.allreduce_": 2}
    assert len({r["pipeline_fsdp"]["global"] for r in ranks}) == 1


def test_sampled_weight_norms_one_collective_no_warning(ranks) -> None:
    for result in (r["tp"] for r in ranks):
        assert result["weight_norm_err"] < 1e-5
        assert result["weight_collectives"] == {"c10d.allreduce_": 1}
        assert result["weight_warnings"] == []


class _MainGradModel(torch.nn.Module):
    """Megatron-style: gradients accumulate into float32 ``main_grad`` buffers, not ``.grad``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        for p in self.parameters():
            p.main_grad = torch.zeros_like(p)
            p.register_post_accumulate_grad_hook(_into_main_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _into_main_grad(p: torch.Tensor) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None


@pytest.mark.parametrize("where", ["main_grad", "callable"])
def test_gradients_outside_p_grad(where) -> None:
    model = _MainGradModel()
    reference = _MainGradModel()
    grad_attr = "main_grad" if where == "main_grad" else (lambda p: p.main_grad)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(0.01), sinks=[], grad_attr=grad_attr)
    x = torch.randn(8, 6)
    for m in (model, reference):
        m(x).pow(2).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    report = watch.check()
    grads = [p.main_grad for p in reference.parameters()]
    expected = torch.nn.utils.get_total_norm(grads)
    torch._foreach_mul_(grads, (0.01 / (expected + 1e-6)).clamp(max=1.0))
    assert report.global_norm == pytest.approx(expected.item(), rel=1e-6)
    assert report.clip_coef < 1.0
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.main_grad, q.main_grad)  # clipped in place
    watch.close()


def test_bad_grad_attr_and_pipeline_group_are_named() -> None:
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="grad_attr must be the name"):
        gw.GradWatch(model, sinks=[], grad_attr="main grad")
    with pytest.raises(TypeError, match="grad_attr must be an attribute name"):
        gw.GradWatch(model, sinks=[], grad_attr=3)
    with pytest.raises(ValueError, match="pipeline_group needs an initialised"):
        gw.GradWatch(model, sinks=[], pipeline_group=object())
