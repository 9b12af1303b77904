"""The stats ring's two host mirrors give the same reports.

On CPU the host reads the device buffer directly; on accelerators each row is copied to a host
buffer after it is written and read once the copy has landed. No GPU is needed to check that the
copying mirror's bookkeeping (claim, commit, value, drain order, wrap-around) is right: run it on
CPU and compare every report with the shared mirror's.
"""

from __future__ import annotations

import math

import torch
from conftest import mlp

import gradwatch as gw
from gradwatch.collect.ring import StatsRing


def _use_copying_mirror(watch: gw.GradWatch) -> None:
    ring: StatsRing = watch._path.bound.ring
    ring._shared = False
    ring._host_tensor = torch.zeros(ring.rows.shape, dtype=ring.rows.dtype)
    ring.host = ring._host_tensor.numpy()


def _run(copying: bool) -> list[tuple]:
    torch.manual_seed(0)
    model = mlp(depth=2)
    watch = gw.GradWatch(model, clip=gw.ClipNorm(0.4), sinks=[])
    if copying:
        _use_copying_mirror(watch)
    out = []
    for step in range(200):  # > 3 wraps of the 64-row ring
        model.zero_grad()
        gen = torch.Generator().manual_seed(step)
        loss = model(torch.randn(8, 8, generator=gen)).pow(2).mean()
        loss.backward()
        if step == 150:
            model[0].weight.grad[0, 0] = math.nan
        if step == 120:
            model[2].bias.grad.mul_(300.0)
        watch.check(loss=loss)
    for r in watch.history:
        out.append((r.step, r.global_norm, r.clip_coef, r.loss, r.spike, r.nonfinite))
    watch.close()
    return out


def test_copying_mirror_matches_shared_mirror() -> None:
    shared, copying = _run(False), _run(True)
    assert len(shared) == 200
    assert repr(shared) == repr(copying)  # repr: NaN equals NaN, floats compared exactly
    assert any(row[4] for row in shared) and any(row[5] for row in shared)
