"""GradWatchCallback in real Hugging Face Trainer runs: a tiny GPT-2 built from a config, on CPU.

No hub access: the model is randomly initialised from a config written here and the data set is
a list of random token sequences. The Trainer's own ``grad_norm`` log (the norm its
``clip_grad_norm_`` returns, before clipping) is the reference the reports are compared with.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

import gradwatch as gw
from gradwatch._optional import MissingExtraError

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from gradwatch.integrations.transformers import GradWatchCallback  # noqa: E402

CLIP = 0.05
POISONED = "transformer.h.0.mlp.c_fc.weight"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared machine: threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _data(n: int = 64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (16,), generator=gen)
        rows.append({"input_ids": ids, "labels": ids})
    return rows


class _Poison(transformers.TrainerCallback):
    """Puts a NaN into one parameter's gradient at one optimizer step; records weight changes."""

    def __init__(self, model: torch.nn.Module, step: int | None) -> None:
        self.step = step
        self.active = False
        self.changed: list[bool] = []
        self._before: list[torch.Tensor] = []
        self.model = model
        dict(model.named_parameters())[POISONED].register_hook(self._hook)

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.nan if self.active else grad

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.active = state.global_step == self.step
        self._before = [p.detach().clone() for p in self.model.parameters()]

    def on_step_end(self, args, state, control, **kwargs) -> None:
        after = list(self.model.parameters())
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(after, self._before)))


def _train(tmp_path, *callbacks, model=None, **arguments):
    model = model if model is not None else _model()
    options = dict(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        logging_steps=2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-3,
        max_grad_norm=CLIP,
        seed=0,
    )
    options.update(arguments)
    args = transformers.TrainingArguments(**options)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_data(), callbacks=list(callbacks)
    )
    trainer.train()
    return trainer


def _train_logs(trainer) -> list[dict[str, float]]:
    return [h for h in trainer.state.log_history if "loss" in h]


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # None makes the import fail
    monkeypatch.delitem(sys.modules, "gradwatch.integrations.transformers")
    with pytest.raises(MissingExtraError, match=r'pip install "gradwatch\[transformers\]"'):
        import gradwatch.integrations.transformers  # noqa: F401


def test_norms_before_and_after_max_grad_norm_clipping(tmp_path, capsys) -> None:
    callback = GradWatchCallback()
    trainer = _train(tmp_path, callback, logging_steps=1)

    reports = list(callback.history)
    logs = _train_logs(trainer)
    assert len(reports) == len(logs) == 6
    for report, log in zip(reports, logs):
        # Before clipping: what the Trainer's clip_grad_norm_ returned and logged.
        assert report.global_norm == pytest.approx(log["grad_norm"], rel=1e-6)
        assert report.global_norm > CLIP
        # After clipping: measured right before optimizer.step().
        assert report.clipped_norm == pytest.approx(CLIP, rel=1e-5)
        assert report.clip_coef == pytest.approx(CLIP / log["grad_norm"], rel=1e-5)
    out = capsys.readouterr().out
    assert "gradwatch summary: 6 steps" in out
    assert "clipped 6 steps (100.0%)" in out
    assert callback.summary.clipped_steps == 6


def test_window_statistics_cover_every_step_of_the_window(tmp_path) -> None:
    callback = GradWatchCallback(top_k=2)
    trainer = _train(tmp_path, callback, logging_steps=3)

    norms = [r.global_norm for r in callback.history]
    logs = _train_logs(trainer)
    assert [log["step"] for log in logs] == [3, 6]
    for i, log in enumerate(logs):
        window = norms[3 * i : 3 * i + 3]
        assert log["grad_norm"] == pytest.approx(window[-1], rel=1e-6)  # the Trainer: last step
        assert log["grad_norm/global_max"] == pytest.approx(max(window), rel=1e-6)
        assert log["grad_norm/global_mean"] == pytest.approx(sum(window) / 3, rel=1e-6)
        assert log["grad_norm/clipped_max"] == pytest.approx(CLIP, rel=1e-5)
        assert log["grad_norm/clipped_steps"] == 3
        assert (log["grad_norm/nan_steps"], log["grad_norm/spikes"]) == (0, 0)
        layers = [k for k in log if k.startswith("grad_norm/transformer.")]
        assert len(layers) == 2  # top_k


def test_accumulated_gradient_checked_once_per_optimizer_step(tmp_path) -> None:
    callback = GradWatchCallback()
    trainer = _train(
        tmp_path,
        callback,
        gradient_accumulation_steps=2,
        logging_steps=1,
        # Reentrant checkpointing recomputes in nested backward passes: still one check per step.
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": True},
    )
    logs = _train_logs(trainer)
    assert len(callback.history) == len(logs) == 6  # 12 micro-batches, 6 optimizer steps
    # The Trainer's norm is that of the accumulated gradient: checking after the first
    # micro-batch, or after clipping, would give another number.
    assert [r.global_norm for r in callback.history] == pytest.approx(
        [log["grad_norm"] for log in logs], rel=1e-6
    )


def test_nan_origin_is_named_although_clipping_spreads_it(tmp_path, capsys) -> None:
    model = _model()
    poison = _Poison(model, step=2)
    callback = GradWatchCallback()  # warn: report only
    trainer = _train(tmp_path, poison, callback, model=model, logging_steps=3)

    bad = callback.history[2]
    # The Trainer's clipping multiplies every gradient by max_norm / nan: checked before it,
    # the NaN is still only where it started.
    assert bad.nonfinite == (POISONED,)
    assert math.isnan(bad.global_norm)
    logs = _train_logs(trainer)
    # Reported only: the NaN reached the weights, so every later step is NaN too.
    assert [log["grad_norm/nan_steps"] for log in logs] == [1, 3]
    # The Trainer's loss log shows nothing (logging_nan_inf_filter hides NaN losses).
    assert all(math.isfinite(log["loss"]) for log in logs)
    out = capsys.readouterr().out
    alert = next(line for line in out.splitlines() if "step 2: NaN in the gradients" in line)
    assert POISONED in alert


def test_skip_leaves_weights_optimizer_and_schedule_untouched(tmp_path) -> None:
    model = _model()
    poison = _Poison(model, step=2)
    callback = GradWatchCallback(on_nonfinite="skip")
    trainer = _train(tmp_path, poison, callback, model=model, logging_steps=3)

    assert [r.skipped for r in callback.history] == [False, False, True, False, False, False]
    assert poison.changed == [True, True, False, True, True, True]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {5}  # AdamW stepped 5 times, not 6
    assert trainer.lr_scheduler.last_epoch == 5  # the schedule did not advance either
    logs = _train_logs(trainer)
    assert [log["grad_norm/skipped_steps"] for log in logs] == [1, 0]


def test_gradwatch_clips_instead_of_the_trainer(tmp_path) -> None:
    by_trainer = _model()
    _train(tmp_path / "a", GradWatchCallback(), model=by_trainer)
    by_gradwatch = _model()
    callback = GradWatchCallback(clip=gw.ClipNorm(CLIP))
    _train(tmp_path / "b", callback, model=by_gradwatch, max_grad_norm=0.0)

    assert [r.clipped_norm for r in callback.history] == pytest.approx([CLIP] * 6, rel=1e-5)
    for p, q in zip(by_trainer.parameters(), by_gradwatch.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_both_clipping_raises_before_training(tmp_path) -> None:
    callback = GradWatchCallback(clip=gw.ClipNorm(1.0))
    with pytest.raises(gw.ConfigError, match="max_grad_norm"):
        _train(tmp_path, callback)
    assert callback.history == type(callback.history)()


def test_keys_reach_report_to_tensorboard_and_wandb(tmp_path, monkeypatch) -> None:
    """The Trainer calls report_to before user callbacks: the callback moves ahead of them."""
    pytest.importorskip("tensorboard")
    wandb = pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_report_wandb import _history, _records

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    # The user's run, offline; the Trainer's WandbCallback writes to it rather than start one.
    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
    run = wandb.init(mode="offline", dir=str(tmp_path), project="gradwatch", settings=settings)
    model = _model()
    callback = GradWatchCallback(top_k=None, layers="transformer.h.0.*")  # every layer of block 0
    try:
        trainer = _train(
            tmp_path / "out",
            callback,
            model=model,
            logging_steps=3,
            report_to=["tensorboard", "wandb"],
        )
        assert wandb.run is run
    finally:
        run.finish()
    order = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert order == [
        "DefaultFlowCallback",
        "GradWatchCallback",  # moved ahead of the report_to integrations
        "TensorBoardCallback",
        "WandbCallback",
        "PrinterCallback",
    ]
    logs = _train_logs(trainer)
    norms = [r.global_norm for r in callback.history]
    assert [log["step"] for log in logs] == [3, 6]

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tb = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    rows = {r["train/global_step"]: r for r in _history(_records(run)) if "train/loss" in r}
    for i, log in enumerate(logs):
        step, window = log["step"], norms[3 * i : 3 * i + 3]
        for key in ("global_mean", "global_max", "clipped_max", "clip_coef", "nan_steps"):
            key = f"train/grad_norm/{key}"
            assert tb[key][step] == pytest.approx(log[key[6:]], rel=1e-6)
            assert rows[step][key] == pytest.approx(log[key[6:]], rel=1e-6)
        # Next to the Trainer's grad_norm (the window's last step), the window's mean and max.
        assert tb["train/grad_norm"][step] == pytest.approx(window[-1], rel=1e-6)
        assert tb["train/grad_norm/global_mean"][step] == pytest.approx(sum(window) / 3, rel=1e-6)
        assert tb["train/grad_norm/global_max"][step] == pytest.approx(max(window), rel=1e-6)
    block0 = {
        "train/grad_norm/" + layer
        for layer in {name.rsplit(".", 1)[0] for name, _ in model.named_parameters()}
        if layer.startswith("transformer.h.0.")
    }
    assert len(block0) == 6  # ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj
    assert {t for t in tb if t.startswith("train/grad_norm/transformer.")} == block0
    assert {k for k in rows[6] if str(k).startswith("train/grad_norm/transformer.")} == block0


def test_outside_a_trainer_the_callback_warns_that_report_to_misses_the_keys() -> None:
    from gradwatch.integrations.transformers import _run_before_reporters

    with pytest.warns(gw.GradWatchWarning, match="not TensorBoard, W&B or MLflow"):
        _run_before_reporters(GradWatchCallback())


def test_layers_pattern_that_matches_nothing_stops_training_naming_the_layers(tmp_path) -> None:
    with pytest.raises(gw.ConfigError, match=r"'block\.\*' matches no layer; the layers are "):
        _train(tmp_path, GradWatchCallback(layers="block.*"))


def test_state_round_trips_and_every_sink_gets_the_trainers_clipping(tmp_path) -> None:
    log = tmp_path / "run.jsonl"
    callback = GradWatchCallback(sinks=[gw.JsonlSink(log)])
    _train(tmp_path / "first", callback)
    assert callback.state_key == "GradWatchCallback"
    saved = callback.state_dict()
    assert saved["watch"]["step"] == 6
    # The summary the sinks got counts the steps the Trainer clipped (all 6), as callback.summary.
    assert gw.read_run(log).summary.clipped_steps == callback.summary.clipped_steps == 6

    resumed = GradWatchCallback(sinks=[])
    resumed.load_state_dict(saved)  # before training: applied when it begins
    _train(tmp_path / "resumed", resumed)
    assert [r.step for r in resumed.history] == list(range(6, 12))  # continues the step count
