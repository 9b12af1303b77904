"""Clipping is numerically identical to torch.nn.utils.clip_grad_norm_/clip_grad_value_."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import backward, clone_with_grads, mlp

import gradwatch as gw


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("max_norm", [1e-3, 0.1, 1e6])
def test_clip_norm_matches_torch_bit_for_bit(norm_type: float, max_norm: float) -> None:
    model = mlp(depth=4)
    backward(model, scale=50.0)
    reference = clone_with_grads(model)
    total = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, norm_type)
    report = gw.GradWatch(model, clip=gw.ClipNorm(max_norm, norm_type), sinks=[]).check()
    assert report.global_norm == total.item()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    expected_coef = min(max_norm / (total.item() + 1e-6), 1.0)
    assert report.clip_coef == pytest.approx(expected_coef, rel=1e-6)
    assert report.clipped_norm == pytest.approx(report.global_norm * report.clip_coef)
    assert report.clipped == (expected_coef < 1.0)


@pytest.mark.parametrize("clip_value", [1e-4, 0.05, 100.0])
def test_clip_value_matches_torch(clip_value: float) -> None:
    model = mlp(depth=3)
    backward(model, scale=10.0)
    reference = clone_with_grads(model)
    torch.nn.utils.clip_grad_value_(reference.parameters(), clip_value)
    before = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    report = gw.GradWatch(model, clip=gw.ClipValue(clip_value), sinks=[]).check()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert report.global_norm == pytest.approx(before)
    assert report.clipped_norm == pytest.approx(after, rel=1e-5)
    assert report.clip_coef == pytest.approx(after / before, rel=1e-5)


def test_clipping_changes_weights_like_torch_over_a_training_run() -> None:
    model = mlp(depth=3)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(0.5), sinks=[]).attach(opt)
    for step in range(10):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            backward(m, seed=step, scale=20.0)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        ref_opt.step()
        opt.step()
    watch.close()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert all(r.clipped for r in watch.history)


# --------------------------------------------------------------------------- sparse gradients
# torch 2.13's clip_grad_norm_ and clip_grad_value_ fail on sparse gradients (no sparse
# linalg.vector_norm or clamp kernel), so the reference is torch on the dense equivalents.


def sparse_model() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 3))


def with_dense_grads(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose gradients are the dense equivalents of ``model``'s."""
    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.to_dense().clone()  # to_dense() of a dense tensor is that tensor
    return twin


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("max_norm", [1e-3, 0.1, 1e6])
def test_clip_norm_sparse_matches_torch_on_dense_equivalent(
    norm_type: float, max_norm: float
) -> None:
    model = sparse_model()
    watch = gw.GradWatch(model, clip=gw.ClipNorm(max_norm, norm_type), sinks=[])
    for step in range(2):  # step 0 finds the sparse gradient and regroups; step 1 uses the layout
        model.zero_grad()
        gen = torch.Generator().manual_seed(step)
        out = model(torch.tensor([2, 2, 7, 1, 2]))  # duplicate indices: an uncoalesced gradient
        (out * torch.randn(out.shape, generator=gen) * 20.0).sum().backward()
        assert not model[0].weight.grad.is_coalesced()
        reference = with_dense_grads(model)
        total = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, norm_type)
        report = watch.check()
        assert report.global_norm == pytest.approx(total.item(), rel=1e-6)
        assert model[0].weight.grad.is_sparse  # scaled where it is, not densified
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad.to_dense(), q.grad, rtol=1e-6, atol=0)
        expected_coef = min(max_norm / (total.item() + 1e-6), 1.0)
        assert report.clip_coef == pytest.approx(expected_coef, rel=1e-6)


def test_clip_value_sparse_clamps_the_summed_duplicates() -> None:
    model = sparse_model()
    # Row 2 is stored twice (0.3 + 0.3): its dense value 0.6 must clamp to 0.5, which clamping
    # each stored entry (0.3 each) would miss.
    indices = torch.tensor([[2, 7, 2, 4]])
    values = torch.tensor([[0.3, -0.3, 0.1, 0.2], [-2.0, 0.4, 0.0, 9.0], [0.3, -0.3, 0.1, -0.3]])
    values = torch.cat([values, torch.full((1, 4), -0.7)])
    model[0].weight.grad = torch.sparse_coo_tensor(indices, values, (10, 4), check_invariants=True)
    model[1].weight.grad = torch.randn(3, 4) * 3.0
    model[1].bias.grad = torch.randn(3) * 3.0
    reference = with_dense_grads(model)
    before = torch.nn.utils.get_total_norm([q.grad for q in reference.parameters()]).item()
    torch.nn.utils.clip_grad_value_(reference.parameters(), 0.5)
    after = torch.nn.utils.get_total_norm([q.grad for q in reference.parameters()]).item()
    report = gw.GradWatch(model, clip=gw.ClipValue(0.5), sinks=[]).check()
    grad = model[0].weight.grad
    assert grad.is_sparse and grad.is_coalesced()  # coalesced in place, still sparse
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad.to_dense(), q.grad)
    assert grad.to_dense()[2, :2].tolist() == [0.5, -0.5]  # 0.6 and -0.6 clamped
    assert report.global_norm == pytest.approx(before, rel=1e-6)
    assert report.clipped_norm == pytest.approx(after, rel=1e-5)
    assert report.clip_coef == pytest.approx(after / before, rel=1e-5)
