"""Precision, accumulation and compilation modes give true numbers (single process)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mlp

import gradwatch as gw


def _batch(i: int) -> torch.Tensor:
    return torch.randn(8, 8, generator=torch.Generator().manual_seed(i))


def test_per_micro_batch_norms_find_the_bad_micro_batch() -> None:
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, sinks=[], track_micro_batches=True).attach(opt)
    expected = []
    for micro in range(4):
        probe = mlp(depth=2)
        probe.load_state_dict(model.state_dict())
        scale = 100.0 if micro == 2 else 1.0
        probe(_batch(micro)).pow(2).mean().mul(scale).backward()
        expected.append(torch.nn.utils.get_total_norm([p.grad for p in probe.parameters()]))
        with watch.backward():
            model(_batch(micro)).pow(2).mean().mul(scale).backward()
    opt.step()
    report = watch.history[-1]
    assert len(watch.history) == 1  # one report for the optimizer step
    assert report.micro_batch_norms == pytest.approx([e.item() for e in expected], rel=1e-5)
    assert max(range(4), key=lambda i: report.micro_batch_norms[i]) == 2
    watch.close()


def test_amp_unscale_then_check_sees_unscaled_gradients() -> None:
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(0.5), sinks=[])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(_batch(0)).pow(2).mean()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    unscaled = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    report = watch.check(loss=loss)
    scaler.step(opt)
    scaler.update()
    assert report.global_norm == pytest.approx(unscaled)
    assert report.loss == pytest.approx(loss.float().item(), rel=1e-2)
    watch.close()


def test_bf16_parameters_norms_in_float32_without_overflow() -> None:
    model = mlp(depth=2, dtype=torch.bfloat16)
    model(_batch(0).bfloat16()).pow(2).mean().backward()
    for p in model.parameters():
        p.grad.mul_(1e15)  # bf16 holds it; its squares need float32 accumulation to be exact
    report = gw.GradWatch(model, sinks=[]).check()
    expected = torch.nn.utils.get_total_norm([p.grad.double() for p in model.parameters()])
    assert math.isfinite(report.global_norm)
    assert report.global_norm == pytest.approx(expected.item(), rel=1e-2)


@pytest.mark.parametrize("mode", ["attach", "backward", "check"])
def test_torch_compile_all_patterns_without_recompiles(mode: str) -> None:
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = mlp(depth=2)
    compiled = torch.compile(model, backend=counting_backend)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.01)
    watch = gw.GradWatch(compiled, clip=gw.ClipNorm(1.0), sinks=[])
    assert watch.names[0] == "0.weight"  # not "_orig_mod.0.weight"
    if mode == "attach":
        watch.attach(opt)
    for step in range(6):
        opt.zero_grad()
        loss = compiled(_batch(step)).pow(2).mean()
        if mode == "backward":
            with watch.backward(loss=loss):
                loss.backward()
        else:
            loss.backward()
            if mode == "check":
                watch.check(loss=loss)
        opt.step()
        reference = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert watch.history[-1].clipped_norm == pytest.approx(min(reference.item(), 1.0), 1e-4)
    assert len(compiles) == 1  # compiled once, no recompilation per step
    assert len(watch.history) == 6
    watch.close()
