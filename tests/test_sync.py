"""The step path makes no host synchronisation in the default configuration.

Without a GPU, a sync is visible as a call that reads a tensor's value on the host: ``.item()``,
``.tolist()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``.cpu()``, ``.numpy()``. We count them
during steps. (On CPU gradwatch reads the stats ring through a numpy view created once at
construction, which is what an accelerator's pinned host mirror does after a non-blocking copy.)
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import mlp

import gradwatch as gw

_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy", "__index__")


@contextlib.contextmanager
def count_host_reads():
    counts = dict.fromkeys(_READS, 0)
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def wrap(name):
        original = originals[name]

        def counting(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return counting

    for name in _READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _steps(watch, model, opt, n, loss_to_watch=True):
    for _ in range(n):
        opt.zero_grad()
        loss = model(torch.randn(8, 8)).pow(2).mean()
        if loss_to_watch:
            with watch.backward(loss=loss):
                loss.backward()
        else:
            loss.backward()
        opt.step()


@pytest.mark.parametrize("clip", [None, gw.ClipNorm(1.0)], ids=["monitor", "clipnorm"])
def test_default_configuration_never_reads_device_values_in_the_step(clip) -> None:
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, clip=clip, sinks=[]).attach(opt)
    _steps(watch, model, opt, 3)  # warm up outside the counter
    with count_host_reads() as counts:
        _steps(watch, model, opt, 30)
    assert counts == dict.fromkeys(_READS, 0), counts
    assert len(watch.history) == 33 and watch.history[-1].loss is not None


def test_decision_policies_read_one_value_per_step() -> None:
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, on_nonfinite="skip", sinks=[]).attach(opt)
    _steps(watch, model, opt, 2)
    with count_host_reads() as counts:
        _steps(watch, model, opt, 10)
    assert counts["__float__"] == 10  # exactly the one decision per step
    assert sum(counts.values()) == 10


def test_reports_materialise_without_torch_reads() -> None:
    model = mlp(depth=2)
    watch = gw.GradWatch(model, sinks=[])
    model(torch.randn(2, 8)).sum().backward()
    with count_host_reads() as counts:
        report = watch.check()
        assert math.isfinite(report.global_norm) and len(report.param_norms) == 6
    assert sum(counts.values()) == 0
