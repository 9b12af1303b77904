"""Shared fixtures: small real models and a quiet watcher factory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradwatch as gw


class TiedModel(nn.Module):
    """Embedding and decoder share one weight; a frozen layer; a buffer; an unused branch."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.body = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(6, 6)
        self.decoder = nn.Linear(6, 10, bias=False)
        self.decoder.weight = self.embed.weight
        self.register_buffer("running", torch.zeros(6))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.frozen(self.body(self.embed(tokens))))


def mlp(depth: int = 3, width: int = 8, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers).to(dtype)


def backward(model: nn.Module, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """One forward/backward on random data; returns the loss."""
    gen = torch.Generator().manual_seed(seed)
    first = next(p for p in model.parameters())
    x = torch.randn(16, model[0].in_features, generator=gen).to(first.dtype)
    loss = model(x).pow(2).mean() * scale
    loss.backward()
    return loss


class Events(gw.Sink):
    """Keeps every event a watcher emits."""

    def __init__(self) -> None:
        self.events: list[gw.Event] = []

    def write(self, record: object) -> None:
        if isinstance(record, gw.Event):
            self.events.append(record)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def clone_with_grads(model: nn.Module) -> nn.Module:
    """A deep copy that also copies ``.grad`` (``copy.deepcopy`` of a Parameter drops it)."""
    import copy

    twin = copy.deepcopy(model)
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    return twin


class PendingCopy:
    """Stands in for a CUDA event on this CPU-only machine: the copy lands only when waited on."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def defer_host_copies(watch) -> None:
    """Make ``watch`` behave as on an accelerator whose device->host copies are still in flight.

    Rows go through a separate host buffer (as pinned memory does) and become readable only when
    the watcher waits for them, so reports stay unresolved until something reads them.
    """
    ring = watch._path.bound.ring
    ring._shared = False
    ring._host_tensor = torch.zeros(ring.rows.shape, dtype=ring.rows.dtype)
    ring.host = ring._host_tensor.numpy()
    commit = ring.commit

    def deferred_commit(number: int) -> None:
        commit(number)
        ring._events[number % ring.capacity] = PendingCopy()

    ring.commit = deferred_commit


def train_steps(
    model: nn.Module,
    sinks: list,
    steps: int,
    *,
    nan_at: int | None = None,
    spike_at: int | None = None,
    each_step: Callable[[], object] | None = None,
    close: bool = True,
    **watch_kwargs: Any,
):
    """A real GradWatch run: ``model`` (4 input features) trained with SGD, checked every step.

    At step ``nan_at`` one gradient entry of the third parameter (``2.weight`` of an
    ``nn.Sequential``) is set to NaN; at step ``spike_at`` every gradient is scaled by 1000. The
    optimizer skips those steps, so each fault stays in one step, at a known place.

    Args:
        model: The model; seed torch before building it for a reproducible run.
        sinks: Passed to ``GradWatch(sinks=...)``.
        steps: Steps to run.
        nan_at, spike_at: Steps to inject the faults at (None: never).
        each_step: Called after every step (e.g. to advance a progress bar).
        close: Close the watcher at the end; False only flushes it, as a killed process would
            have left it (every record so far reached the sinks, no summary).
        watch_kwargs: Passed to ``GradWatch``.

    Returns:
        The watcher (``watch.history``; ``watch.close()`` returns the summary again).
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.GradWatch(model, sinks=sinks, **watch_kwargs)
    for step in range(steps):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        params = list(model.parameters())
        if step == nan_at:
            params[2].grad[0, 0] = float("nan")
        if step == spike_at:
            for p in params:
                p.grad.mul_(1000.0)
        watch.check(loss=loss)
        if step not in (nan_at, spike_at):
            opt.step()
        if each_step is not None:
            each_step()
    if close:
        watch.close()
    else:
        watch.flush()
    return watch


LONG_NAME = "encoder_block_eleven_self_attention_query_key_value_projection_without_bias_or_dropout"


class LongNames(nn.Module):
    """A layer whose name alone is wider than an 80-column CI log; its weight is the third
    parameter, where ``train_steps(nan_at=...)`` puts the NaN."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(4, 8)
        setattr(self, LONG_NAME, nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, LONG_NAME)(torch.relu(self.stem(x)))
