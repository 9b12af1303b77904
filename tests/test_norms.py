"""Norms equal PyTorch's reference for every norm type, dtype and model shape."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TiedModel, backward, mlp

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
