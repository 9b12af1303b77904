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
