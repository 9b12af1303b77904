"""gradwatch in a Hugging Face Accelerate loop, single process on CPU (the README pattern).

``accelerator.backward`` accumulates; under ``accelerator.accumulate(model)``,
``accelerator.sync_gradients`` is True on the micro-batch that completes an optimizer step. The
check goes there, before ``accelerator.clip_grad_norm_`` (whose return value, the norm before
clipping, is the reference), or gradwatch clips instead of it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch as gw

accelerate = pytest.importorskip("accelerate")

ACCUMULATION = 2
CLIP = 0.1


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(48, 6, generator=gen), torch.randn(48, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return accelerator, model, optimizer, loader


def test_check_before_accelerate_clipping() -> None:
    accelerator, model, optimizer, loader = _setup()
    watch = gw.GradWatch(model, sinks=[])
    returned = []
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                watch.check(loss=loss)  # accumulated, not yet clipped
                returned.append(accelerator.clip_grad_norm_(model.parameters(), CLIP).item())
            optimizer.step()
            optimizer.zero_grad()
    summary = watch.close()

    assert summary.steps == len(loader) // ACCUMULATION == 6  # one check per optimizer step
    assert [r.global_norm for r in watch.history] == pytest.approx(returned, rel=1e-6)
    assert all(r.loss is not None for r in watch.history)


def test_gradwatch_clips_instead_of_accelerate() -> None:
    reference = _setup()
    accelerator, model, optimizer, loader = reference
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad()

    accelerator, watched, optimizer, loader = _setup()
    watch = gw.GradWatch(watched, clip=gw.ClipNorm(CLIP), sinks=[])
    for x, y in loader:
        with accelerator.accumulate(watched):
            accelerator.backward(nn.functional.mse_loss(watched(x), y))
            if accelerator.sync_gradients:
                accelerator.unscale_gradients(optimizer)  # fp16: unscale first (no-op here)
                watch.check()  # replaces accelerator.clip_grad_norm_
            optimizer.step()
            optimizer.zero_grad()
    watch.close()

    assert [r.clipped_norm for r in watch.history] == pytest.approx([CLIP] * 6, rel=1e-5)
    for p, q in zip(reference[1].parameters(), watched.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
