"""state_dict()/load_state_dict() resume a run exactly."""

from __future__ import annotations

import torch
from conftest import mlp

import gradwatch as gw


def _train(watch, model, steps, start):
    out = []
    for step in range(start, start + steps):
        model.zero_grad()
        gen = torch.Generator().manual_seed(step)
        model(torch.randn(8, 8, generator=gen)).pow(2).mean().backward()
        if step % 17 == 16:
            model[0].weight.grad.mul_(40.0)
        r = watch.check()
        out.append((r.step, r.global_norm, r.spike, r.spike_threshold, r.spike_params))
    return out


def test_resume_continues_detectors_exactly() -> None:
    torch.manual_seed(0)
    model = mlp(depth=2)
    straight = gw.GradWatch(model, sinks=[])
    expected = _train(straight, model, 60, 0)

    torch.manual_seed(0)
    model = mlp(depth=2)
    first = gw.GradWatch(model, sinks=[])
    got = _train(first, model, 35, 0)
    state = first.state_dict()
    first.close()
    resumed = gw.GradWatch(model, sinks=[])
    resumed.load_state_dict(state)
    got += _train(resumed, model, 25, 35)
    assert got == expected
    assert any(spike for _, _, spike, _, _ in expected[35:])  # the continuation had spikes
