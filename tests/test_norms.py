"""Norms equal PyTorch's reference for every norm type, dtype and model shape."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from conftest import TiedModel, backward, mlp
from torch import nn

import gradwatch as gw

NORM_TYPES = [1.0, 2.0, 3.0, 0.5, math.inf]


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_norm_equals_get_total_norm(norm_type: float, dtype: torch.dtype) -> None:
    model = mlp(depth=4, dtype=dtype)
    backward(model)
    grads = [p.grad for p in model.parameters()]
    expected = torch.nn.utils.get_total_norm(grads, norm_type)
    watch = gw.GradWatch(model, norm_type=norm_type, sinks=[])
    report = watch.check()
    assert report.global_norm == expected.item()  # bit for bit
    assert report.clipped_norm == report.global_norm
    assert report.clip_coef == 1.0
    assert report.norm_type == norm_type


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms_accumulate_in_float32(dtype: torch.dtype) -> None:
    model = mlp(depth=2, dtype=dtype)
    backward(model)
    # Gradients large enough that their squares overflow fp16: accumulation must be float32.
    for p in model.parameters():
        p.grad.fill_(300.0)
    expected = torch.nn.utils.get_total_norm([p.grad.float() for p in model.parameters()])
    report = gw.GradWatch(model, sinks=[]).check()
    assert math.isfinite(report.global_norm)
    assert report.global_norm == pytest.approx(expected.item(), rel=1e-6)
    assert not report.nonfinite


def test_param_norms_are_per_parameter_l2_by_name() -> None:
    model = mlp(depth=2)
    backward(model)
    report = gw.GradWatch(model, norm_type=1.0, sinks=[]).check()
    names = [n for n, _ in model.named_parameters()]
    assert list(report.param_norms) == names
    for name, p in model.named_parameters():
        assert report.param_norms[name] == pytest.approx(p.grad.norm().item(), rel=1e-6)


def test_tied_frozen_unused_and_buffers() -> None:
    model = TiedModel()
    watch = gw.GradWatch(model, sinks=[])
    # Tied weight appears once (first name), frozen params and buffers are not watched.
    assert "decoder.weight" not in watch.names
    assert watch.names.count("embed.weight") == 1
    assert not any(n.startswith("frozen.") or n == "running" for n in watch.names)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    report = watch.check()
    # The unused branch has no gradient: absent from param_norms, not a NaN, not counted.
    assert "unused.weight" not in report.param_norms
    present = [p.grad for p in model.parameters() if p.grad is not None and p.requires_grad]
    assert report.global_norm == pytest.approx(torch.nn.utils.get_total_norm(present).item())
    assert report.nonfinite == ()


def test_mixed_dtypes_and_missing_grads() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).double())
    model[0].weight.grad = torch.randn(4, 4)
    model[1].weight.grad = torch.randn(4, 4, dtype=torch.float64)
    model[1].bias.grad = torch.randn(4, dtype=torch.float64)
    report = gw.GradWatch(model, sinks=[]).check()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    expected = torch.nn.utils.get_total_norm(grads)
    assert report.global_norm == pytest.approx(expected.item(), rel=1e-12)
    assert set(report.param_norms) == {"0.weight", "1.weight", "1.bias"}


def test_no_gradient_at_all_reports_zero() -> None:
    model = mlp()
    report = gw.GradWatch(model, sinks=[]).check()
    assert report.global_norm == 0.0
    assert len(report.param_norms) == 0
    assert report.nonfinite == ()


def test_check_sees_gradients_not_produced_by_a_hooked_backward() -> None:
    model = mlp(depth=1)
    watch = gw.GradWatch(model, sinks=[])
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    report = watch.check()
    n = sum(p.numel() for p in model.parameters())
    assert report.global_norm == pytest.approx(2.0 * math.sqrt(n))


# --------------------------------------------------------------------------- sparse gradients


class SparseEmbeddingNet(torch.nn.Module):
    """An embedding with sparse gradients feeding a dense layer (and, optionally, an unused one)."""

    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4, sparse=True)
        self.head = torch.nn.Linear(4, 3)
        self.unused = torch.nn.Linear(3, 3) if unused else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def sparse_backward(model: SparseEmbeddingNet, seed: int) -> None:
    """Backward with repeated tokens, so the embedding's gradient has duplicate indices."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([2, 2, 7, 1, 2, 7])
    target = torch.randn(6, 3, generator=gen)
    ((model(tokens) - target) ** 2).sum().backward()


def dense_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.to_dense() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("unused", [False, True], ids=["all-present", "one-absent"])
def test_sparse_and_dense_gradients_norms_equal_dense_equivalent(
    norm_type: float, unused: bool
) -> None:
    model = SparseEmbeddingNet(unused)
    watch = gw.GradWatch(model, norm_type=norm_type, sinks=[])
    for step in range(3):  # step 0 finds the sparse gradient; later steps use the new layout
        model.zero_grad()
        sparse_backward(model, seed=step)
        grad = model.embed.weight.grad
        assert grad.is_sparse and not grad.is_coalesced()  # duplicates: [2, 2, 7, 1, 2, 7]
        indices, values = grad._indices().clone(), grad._values().clone()
        dense = dense_grads(model)
        report = watch.check()
        expected = torch.nn.utils.get_total_norm(list(dense.values()), norm_type)
        assert report.global_norm == pytest.approx(expected.item(), rel=1e-6)
        assert list(report.param_norms) == list(dense)  # the unused layer is absent
        for name, g in dense.items():
            own = torch.linalg.vector_norm(g).item()
            assert report.param_norms[name] == pytest.approx(own, rel=1e-6), name
        assert report.nonfinite == ()
        # Reading left the gradient as it was: still sparse, same (uncoalesced) entries.
        assert model.embed.weight.grad is grad and not grad.is_coalesced()
        assert torch.equal(grad._indices(), indices) and torch.equal(grad._values(), values)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_sparse_gradient_is_named(bad: float) -> None:
    model = SparseEmbeddingNet()
    watch = gw.GradWatch(model, sinks=[])
    sparse_backward(model, seed=0)
    watch.check()  # a clean step first: the layout is learnt, the next step uses it
    model.zero_grad()
    sparse_backward(model, seed=1)
    model.embed.weight.grad._values()[3, 1] = bad
    report = watch.check()
    assert report.nonfinite == ("embed.weight",)
    assert not math.isfinite(report.global_norm)
    assert not math.isfinite(report.param_norms["embed.weight"])
    assert math.isfinite(report.param_norms["head.weight"])
    with pytest.raises(gw.NonFiniteGradientError, match=r"embed\.weight"):
        model.zero_grad()
        sparse_backward(model, seed=2)
        model.embed.weight.grad._values()[0, 0] = bad
        gw.GradWatch(model, on_nonfinite="raise", sinks=[]).check()


def test_sparse_only_model_and_empty_sparse_gradient() -> None:
    model = torch.nn.Embedding(10, 4, sparse=True)
    watch = gw.GradWatch(model, norm_type=math.inf, sinks=[])
    model(torch.tensor([3, 3, 3])).sum().backward()
    assert watch.check().global_norm == pytest.approx(3.0)  # three duplicates of 1.0 summed
    model.zero_grad()
    model(torch.tensor([], dtype=torch.long)).sum().backward()  # a sparse gradient storing nothing
    assert model.weight.grad.is_sparse and model.weight.grad._nnz() == 0
    report = watch.check()
    assert report.global_norm == 0.0 and report.param_norms["weight"] == 0.0


def test_parameter_of_a_sparse_group_may_get_a_dense_gradient() -> None:
    model = SparseEmbeddingNet()
    watch = gw.GradWatch(model, sinks=[])
    sparse_backward(model, seed=0)
    watch.check()
    model.embed.weight.grad = torch.full((10, 4), 0.5)
    report = watch.check()
    assert report.param_norms["embed.weight"] == pytest.approx(0.5 * math.sqrt(40))


def test_dense_model_keeps_the_direct_path() -> None:
    """Sparse support costs a dense model nothing: one plain group, the fast path, every step."""
    model = mlp(depth=2)
    watch = gw.GradWatch(model, sinks=[])
    collector = watch._path.bound.collector
    for step in range(2):
        backward(model, seed=step)
        watch.check()
        assert collector._direct and not collector._sparse
        (group,) = collector.gather().groups
        assert not group.sparse and group.positions == []  # the `_direct` batch, as before


def test_first_watch_does_not_import_torch_distributed_tensor() -> None:
    """``torch.distributed.tensor`` takes seconds to import; a run without DTensors never pays."""
    code = (
        "import sys, torch, gradwatch\n"
        "from torch import nn\n"
        "assert 'torch.distributed.tensor' not in sys.modules, 'imported by torch or gradwatch'\n"
        "model = nn.Linear(2, 2)\n"
        "watch = gradwatch.GradWatch(model, clip=gradwatch.ClipNorm(1.0), sinks=[])\n"
        "watch.check()\n"
        "model(torch.ones(1, 2)).sum().backward()\n"
        "watch.check()\n"
        "watch.close()\n"
        "print('torch.distributed.tensor' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_micro_batch_norms_and_post_clip_norm_accept_sparse_gradients() -> None:
    from gradwatch.integrations import post_clip_norm

    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    watch = gw.GradWatch(model, sinks=[], track_micro_batches=True, accumulation_steps=2)
    parts = []
    for tokens in (torch.tensor([1, 2, 2]), torch.tensor([7, 7])):
        with watch.backward():
            model(tokens).sum().backward()
        parts.append([p.grad.to_dense().clone() for p in model.parameters()])
    report = watch.history[-1]
    first = parts[0]
    second = [b - a for a, b in zip(parts[0], parts[1])]
    expected = [torch.nn.utils.get_total_norm(g).item() for g in (first, second)]
    assert report.micro_batch_norms == pytest.approx(expected, rel=1e-6)
    dense = torch.nn.utils.get_total_norm([p.grad.to_dense() for p in model.parameters()])
    assert post_clip_norm(list(model.parameters()), 2.0).item() == pytest.approx(dense.item())
    watch.close()
