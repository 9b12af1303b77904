"""GradWatchCallback in real Lightning runs: Trainer.fit on a tiny model, on CPU.

The module records reference norms with torch itself at the moments that matter (its own
``on_before_optimizer_step`` runs right after the callbacks' and before Lightning clips), so the
tests check that gradwatch looked at the right gradients, not only that it ran.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch._optional import MissingExtraError

L = pytest.importorskip("lightning.pytorch")

from gradwatch.integrations.lightning import GradWatchCallback  # noqa: E402

CLIP = 0.5


class Tiny(L.LightningModule):
    """Two linear layers; optionally a NaN in one gradient at one optimizer step."""

    def __init__(self, poison_step: int | None = None, out_dir: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.poison_step = poison_step
        self.out_dir = out_dir
        self.pre: list[float] = []  # global norm where the callback checks, by torch
        self.changed: list[bool] = []  # did the optimizer step change the weights?
        self._before: list[torch.Tensor] = []

    def on_fit_start(self) -> None:
        if self.poison_step is not None:
            self.net[2].weight.register_hook(self._poison)

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        if self.poison_step is not None and self.trainer.global_step == self.poison_step:
            return grad * math.nan
        return grad

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.pre.append(torch.nn.utils.get_total_norm(grads).item() if grads else 0.0)
        self._before = [p.detach().clone() for p in self.parameters()]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._before:
            after = list(self.parameters())
            self.changed.append(any(not torch.equal(a, b) for a, b in zip(after, self._before)))
            self._before = []

    def on_fit_end(self) -> None:  # runs after the callbacks' on_fit_end (watcher closed)
        if self.out_dir is None:
            return
        (cb,) = [c for c in self.trainer.callbacks if isinstance(c, GradWatchCallback)]
        result = {
            "names": list(cb.watch.names),
            "pre": [r.global_norm for r in cb.history],
            "post": [r.clipped_norm for r in cb.history],
            "reference": self.pre,
            "steps": cb.summary.steps,
        }
        path = Path(self.out_dir) / f"rank{self.global_rank}.json"
        path.write_text(json.dumps(result))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data(n: int = 48, batch_size: int = 4) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=gen)
    y = 3 * torch.randn(n, 1, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def _fit(
    model: Tiny,
    callback: GradWatchCallback,
    tmp_path: Path,
    ckpt_path: str | None = None,
    **trainer_kwargs,
):
    options = dict(
        max_steps=6,
        accelerator="cpu",
        devices=1,
        logger=L.loggers.CSVLogger(str(tmp_path), name="run"),
        log_every_n_steps=2,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    options.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=[callback], **options)
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return trainer


def _logged(trainer) -> list[dict[str, float]]:
    """The rows the CSV logger wrote, read back from its file."""
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in row.items() if v != ""} for row in rows]


def test_missing_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # None makes the import fail
    monkeypatch.delitem(sys.modules, "gradwatch.integrations.lightning")
    with pytest.raises(MissingExtraError, match=r'pip install "gradwatch\[lightning\]"'):
        import gradwatch.integrations.lightning  # noqa: F401


def test_pre_and_post_clip_norms_under_gradient_clip_val(tmp_path, capsys) -> None:
    model = Tiny()
    callback = GradWatchCallback(top_k=1)
    trainer = _fit(model, callback, tmp_path, gradient_clip_val=CLIP)

    reports = list(callback.history)
    assert [r.step for r in reports] == list(range(6))
    for report, pre in zip(reports, model.pre):
        # Checked before Lightning's clipping, where the module measured with torch:
        assert report.global_norm == pytest.approx(pre, rel=1e-6)
        assert pre > CLIP
        # ... and measured again after it: clip_grad_norm_ brought the norm to gradient_clip_val.
        assert report.clipped_norm == pytest.approx(CLIP, rel=1e-5)
        assert report.clip_coef == pytest.approx(CLIP / pre, rel=1e-5)
    assert all(model.changed)

    # One row per logging window of 2 steps, aggregated over both steps, read back from the file.
    rows = [r for r in _logged(trainer) if "grad_norm/global_mean" in r]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    for i, row in enumerate(rows):
        window = model.pre[2 * i : 2 * i + 2]
        assert row["grad_norm/global_mean"] == pytest.approx(sum(window) / 2, rel=1e-5)
        assert row["grad_norm/global_max"] == pytest.approx(max(window), rel=1e-5)
        assert row["grad_norm/clipped_max"] == pytest.approx(CLIP, rel=1e-5)
        assert row["grad_norm/clipped_steps"] == 2
        assert row["grad_norm/nan_steps"] == 0
        assert row["grad_norm/spikes"] == 0
        layer_keys = [k for k in row if k.startswith("grad_norm/net.")]
        assert len(layer_keys) == 1  # top_k=1

    out = capsys.readouterr().out
    assert "gradwatch summary: 6 steps" in out
    assert "clipped 6 steps (100.0%)" in out  # the steps Lightning clipped are counted
    assert callback.summary.clipped_steps == 6


def _layer_keys(rows: list[dict[str, float]]) -> set[str]:
    return {k for row in rows for k in row if k.startswith("grad_norm/net.")}


class Deep(Tiny):
    """Five linear layers: more than the default top_k."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        hidden = [m for _ in range(3) for m in (nn.Linear(8, 8), nn.Tanh())]
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), *hidden, nn.Linear(8, 1))


def test_layers_logged_by_name_top_k_all_or_a_filter(tmp_path) -> None:
    by_default = GradWatchCallback()
    rows = [r for r in _logged(_fit(Deep(), by_default, tmp_path / "a")) if "grad_norm/spikes" in r]
    assert all(len(_layer_keys([row])) == 3 for row in rows)  # the 3 largest of each window

    every = GradWatchCallback(top_k=None)
    rows = [r for r in _logged(_fit(Deep(), every, tmp_path / "b")) if "grad_norm/spikes" in r]
    names = ["net.0", "net.2", "net.4", "net.6", "net.8"]
    assert all(_layer_keys([row]) == {f"grad_norm/{n}" for n in names} for row in rows)
    for i, row in enumerate(rows):  # each the layer's largest norm over the window's 2 steps
        window = list(every.history)[2 * i : 2 * i + 2]
        norms = [
            math.hypot(r.param_norms["net.8.weight"], r.param_norms["net.8.bias"]) for r in window
        ]
        assert row["grad_norm/net.8"] == pytest.approx(max(norms), rel=1e-5)

    chosen = GradWatchCallback(layers=["net.0", "net.8"])
    rows = [r for r in _logged(_fit(Deep(), chosen, tmp_path / "c")) if "grad_norm/spikes" in r]
    assert _layer_keys(rows) == {"grad_norm/net.0", "grad_norm/net.8"}

    with pytest.raises(gw.ConfigError, match=r"'encoder\.\*' matches no layer.*'net\.0'"):
        _fit(Deep(), GradWatchCallback(layers="encoder.*"), tmp_path / "d")
    with pytest.raises(TypeError, match="layers must be a glob pattern"):
        GradWatchCallback(layers=[3])


def test_accumulated_gradient_checked_once_per_optimizer_step(tmp_path) -> None:
    model = Tiny()
    twin = copy.deepcopy(model)
    callback = GradWatchCallback()
    trainer = _fit(
        model,
        callback,
        tmp_path,
        accumulate_grad_batches=2,
        max_steps=3,
        gradient_clip_val=100.0,  # clips nothing
    )

    assert len(callback.history) == 3  # 6 batches, 3 optimizer steps
    assert [r.global_norm for r in callback.history] == pytest.approx(model.pre, rel=1e-6)
    # Step 0 saw the gradient accumulated over the first two batches, computed here by hand.
    (x0, y0), (x1, y1), *_ = list(_data())
    for x, y in ((x0, y0), (x1, y1)):
        (nn.functional.mse_loss(twin.net(x), y) / 2).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()]).item()
    assert callback.history[0].global_norm == pytest.approx(expected, rel=1e-6)
    # The loss given to gradwatch is the mean over the micro-batches.
    with torch.no_grad():
        mean_loss = sum(nn.functional.mse_loss(twin.net(x), y) for x, y in ((x0, y0), (x1, y1)))
    assert callback.history[0].loss == pytest.approx(mean_loss.item() / 2, rel=1e-5)
    # Lightning's clipping ran but changed nothing: measured again, the norm is the same.
    assert all(r.clip_coef == 1.0 and not r.clipped for r in callback.history)
    # Windows of 2 optimizer steps; the last, unfinished one is written when training ends.
    rows = [r for r in _logged(trainer) if "grad_norm/global_mean" in r]
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert rows[1]["grad_norm/global_mean"] == pytest.approx(model.pre[2], rel=1e-5)
    assert [r["grad_norm/clipped_steps"] for r in rows] == [0, 0]


def test_gradwatch_clips_instead_of_lightning(tmp_path) -> None:
    by_lightning = Tiny()
    _fit(by_lightning, GradWatchCallback(), tmp_path / "a", gradient_clip_val=CLIP)
    by_gradwatch = Tiny()
    callback = GradWatchCallback(clip=gw.ClipNorm(CLIP))
    _fit(by_gradwatch, callback, tmp_path / "b")

    assert [r.clipped_norm for r in callback.history] == pytest.approx([CLIP] * 6, rel=1e-5)
    # Same clipping, same training: clip_grad_norm_ and ClipNorm agree.
    for p, q in zip(by_lightning.parameters(), by_gradwatch.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert callback.summary.clipped_steps == 6


def test_both_clipping_raises_before_training(tmp_path) -> None:
    model = Tiny()
    callback = GradWatchCallback(clip=gw.ClipNorm(1.0))
    with pytest.raises(gw.ConfigError, match="gradient_clip_val"):
        _fit(model, callback, tmp_path, gradient_clip_val=CLIP)
    assert model.pre == []


def test_nan_step_found_named_skipped_and_logged(tmp_path, capsys) -> None:
    model = Tiny(poison_step=2)
    callback = GradWatchCallback(on_nonfinite="skip")
    trainer = _fit(model, callback, tmp_path, gradient_clip_val=CLIP)

    reports = list(callback.history)
    assert [r.skipped for r in reports] == [False, False, True, False, False, False]
    assert reports[2].nonfinite == ("net.2.weight",)
    assert model.changed == [True, True, False, True, True, True]  # the weights did not move
    rows = [r for r in _logged(trainer) if "grad_norm/global_mean" in r]
    assert [(r["grad_norm/nan_steps"], r["grad_norm/skipped_steps"]) for r in rows] == [
        (0, 0),
        (1, 1),
        (0, 0),
    ]
    out = capsys.readouterr().out
    alert = next(line for line in out.splitlines() if "step 2: NaN in the gradients" in line)
    assert "net.2.weight" in alert


def test_state_round_trips_through_a_lightning_checkpoint(tmp_path) -> None:
    callback = GradWatchCallback()
    trainer = _fit(Tiny(), callback, tmp_path, enable_checkpointing=True)
    ckpt = next(Path(trainer.logger.log_dir).glob("checkpoints/*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["callbacks"]["GradWatchCallback"]["watch"]
    assert saved["step"] == 6

    resumed = GradWatchCallback()
    _fit(Tiny(), resumed, tmp_path / "resumed", max_steps=8, ckpt_path=str(ckpt))
    assert [r.step for r in resumed.history] == [6, 7]  # continues the step count


def _spawn_trainer_fit(tmp_path: Path) -> None:
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        callbacks=[GradWatchCallback()],
        gradient_clip_val=0.05,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(Tiny(out_dir=str(tmp_path)), _data(n=32))


@pytest.mark.slow  # ~15 s: two spawned processes each import Lightning (run with -m slow)
def test_ddp_two_processes_see_the_synchronised_gradient(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _spawn_trainer_fit(tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["names"] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
        assert result["steps"] == 3
        assert result["pre"] == pytest.approx(result["reference"], rel=1e-6)
        assert result["post"] == pytest.approx([0.05] * 3, rel=1e-5)
    # Each rank computed its gradient on its own half of the batch; the checked gradient is the
    # all-reduced one, hence identical on both ranks.
    assert ranks[0]["pre"] == ranks[1]["pre"]
