"""Adaptive clippers against their published rules, on hand-computed sequences and real models.

The references below are transcriptions of the published procedures in plain Python floats:
ZClip's ``ZClip.step`` (github.com/bluorion-com/ZClip, ``zclip/zclip.py``), AutoClip's
``autoclip_gradient`` (github.com/pseeth/autoclip, ``autoclip.py``) and timm's
``adaptive_clip_grad`` (``timm/utils/agc.py``).
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.act.adaptive import ClipPercentile, ClipZScore
from gradwatch.act.clip import Clipper
from gradwatch.act.unitwise import ClipUnitwise
from gradwatch.collect.norms import GradCollector
from gradwatch.errors import ConfigError, StateError

NAN, INF = math.nan, math.inf

# ------------------------------------------------------------------------------ references


class ZClipReference:
    """ZClip.step's arithmetic on floats (max_grad_norm=None, clip_factor=1)."""

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup=25, mode="reciprocal", max_norm=None):
        self.alpha, self.z, self.warmup, self.mode, self.max_norm = (
            alpha,
            z_thresh,
            warmup,
            mode,
            max_norm,
        )
        self.buffer: list[float] = []
        self.mean = self.var = None

    def step(self, g: float) -> float:
        """The clip coefficient for norm ``g``."""
        if self.mean is None:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            return self._coef(g, g)
        std = self.var**0.5
        clip_val = None
        if self.mode == "fixed":
            threshold = self.mean + self.z * std
            if g > threshold:
                clip_val = threshold
        else:
            z = (g - self.mean) / (std + 1e-6)
            if z > self.z:
                clip_val = self.mean + (self.z * std) / (z / self.z)
        coef = self._coef(g, clip_val if clip_val is not None else g)
        x = clip_val if clip_val is not None else g
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return coef

    def _coef(self, g: float, adaptive: float) -> float:
        limit = adaptive if self.max_norm is None else min(adaptive, self.max_norm)
        return limit / (g + 1e-6) if g > limit else 1.0


def autoclip_reference(norms: list[float], percentile: float, history: int) -> list[float]:
    """AutoClip: append the observed norm, clip to the percentile of the (bounded) history."""
    seen: list[float] = []
    coefs = []
    for g in norms:
        seen.append(g)
        clip_value = float(np.percentile(seen[-history:], percentile))
        coefs.append(min(clip_value / (g + 1e-6), 1.0))
    return coefs


def agc_reference(params: list[torch.Tensor], clipping=0.01, eps=1e-3) -> None:
    """timm's adaptive_clip_grad, with its unitwise_norm."""

    def unitwise_norm(x):
        if x.ndim <= 1:
            return x.norm(2.0)
        return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in params:
        g = p.grad.detach()
        max_norm = unitwise_norm(p.detach()).clamp_(min=eps).mul_(clipping)
        grad_norm = unitwise_norm(g)
        clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(grad_norm < max_norm, g, clipped))


# ------------------------------------------------------------------------------- harness


class Feed:
    """Drives a norm-based clipper with one 1-element float64 gradient whose norm is chosen."""

    def __init__(self, clipper: Clipper) -> None:
        self.clipper = clipper
        self.param = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.collector = GradCollector([self.param], torch.device("cpu"), torch.float64)

    def step(self, norm: float) -> float:
        self.param.grad = torch.tensor([norm], dtype=torch.float64)
        batch = self.collector.gather()
        total = torch.tensor(abs(norm), dtype=torch.float64)
        out = torch.empty((), dtype=torch.float64)
        self.clipper.clip_(batch, total, total.reshape(1), out)
        coef = out.item()
        if math.isfinite(norm):
            assert self.param.grad.item() == norm * coef  # the gradient was scaled by `out`
        return coef

    def run(self, norms: list[float]) -> list[float]:
        return [self.step(n) for n in norms]


def noisy_norms(n: int, seed: int, spikes: dict[int, float] | None = None) -> list[float]:
    rng = random.Random(seed)
    norms = [1.0 + 0.2 * rng.random() for _ in range(n)]
    for i, value in (spikes or {}).items():
        norms[i] = value
    return norms


# ------------------------------------------------------------------------------ ClipZScore


def test_zscore_hand_computed_sequence():
    clip = Feed(ClipZScore(alpha=0.9, z_threshold=2.0, warmup=3))
    coefs = clip.run([1.0, 2.0, 3.0, 10.0, 2.0])
    assert coefs[:3] == [1.0, 1.0, 1.0]  # warm-up: never clipped
    # After warm-up: mean 2, population variance 2/3.
    mean, var = 2.0, 2.0 / 3.0
    std = math.sqrt(var)
    z = (10.0 - mean) / (std + 1e-6)  # 9.797...
    target = mean + (2.0 * std) / (z / 2.0)  # mean + z_thr²/z·std = 2.3333...
    assert target == pytest.approx(2.33333, abs=1e-4)
    assert coefs[3] == pytest.approx(target / (10.0 + 1e-6), rel=1e-12)
    mean = 0.9 * mean + 0.1 * target  # the EMA sees the clipped norm
    var = 0.9 * var + 0.1 * (target - mean) ** 2
    assert (mean, var) == pytest.approx((2.03333, 0.60900), abs=1e-5)
    # 2.0 is below the mean: not clipped, state updated with it.
    assert coefs[4] == 1.0
    state = clip.clipper.state_dict()
    mean = 0.9 * mean + 0.1 * 2.0
    var = 0.9 * var + 0.1 * (2.0 - mean) ** 2
    assert state["count"].item() == 5
    assert state["mean"].item() == pytest.approx(mean, rel=1e-12)
    assert state["var"].item() == pytest.approx(var, rel=1e-12)


@pytest.mark.parametrize("mode", ["reciprocal", "fixed"])
@pytest.mark.parametrize("max_norm", [None, 1.1])
def test_zscore_matches_zclip_on_long_sequence(mode, max_norm):
    norms = noisy_norms(120, seed=3, spikes={30: 9.0, 31: 4.0, 60: 25.0, 90: 1.6})
    ref = ZClipReference(alpha=0.95, z_thresh=2.5, warmup=10, mode=mode, max_norm=max_norm)
    expected = [ref.step(g) for g in norms]
    got = Feed(ClipZScore(0.95, 2.5, 10, mode=mode, max_norm=max_norm)).run(norms)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert sum(c < 1.0 for c in got) >= 3  # the spikes were clipped


def test_zscore_fixed_mode_clips_to_mean_plus_z_std():
    clip = Feed(ClipZScore(alpha=0.5, z_threshold=1.0, warmup=2, mode="fixed"))
    clip.run([1.0, 3.0])  # mean 2, var 1
    assert clip.step(5.0) == pytest.approx(3.0 / (5.0 + 1e-6), rel=1e-12)  # clipped to 2 + 1·1


def test_zscore_nonfinite_steps_leave_state_untouched():
    norms = noisy_norms(40, seed=5, spikes={20: 8.0})
    with_bad = [*norms[:3], NAN, *norms[3:25], INF, -INF, *norms[25:]]
    got = Feed(ClipZScore(warmup=5)).run(with_bad)
    clean = Feed(ClipZScore(warmup=5)).run(norms)
    assert got[3] == got[26] == got[27] == 1.0  # never a NaN or zero coefficient
    assert [c for i, c in enumerate(got) if i not in (3, 26, 27)] == clean


def test_zscore_rejects_bad_arguments():
    with pytest.raises(ConfigError, match=r"ClipZScore\(alpha\)"):
        ClipZScore(alpha=1.0)
    with pytest.raises(ConfigError, match=r"ClipZScore\(mode\).*'reciprocal'"):
        ClipZScore(mode="zscore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"ClipZScore\(warmup\)"):
        ClipZScore(warmup=0)
    with pytest.raises(ConfigError, match=r"ClipZScore\(max_norm\)"):
        ClipZScore(max_norm=-1.0)


# -------------------------------------------------------------------------- ClipPercentile


def test_percentile_hand_computed_sequence():
    coefs = Feed(ClipPercentile(percentile=50, history=3)).run([1.0, 3.0, 2.0, 10.0, NAN, 0.5])
    assert coefs[0] == 1.0 / (1.0 + 1e-6)  # history [1]: clip to 1 (clip_grad_norm_'s eps)
    assert coefs[1] == 2.0 / (3.0 + 1e-6)  # [1, 3]: median 2
    assert coefs[2] == 2.0 / (2.0 + 1e-6)  # [1, 3, 2]: median 2
    assert coefs[3] == 3.0 / (10.0 + 1e-6)  # [3, 2, 10]: the oldest norm dropped out
    assert coefs[4] == 1.0  # NaN: not recorded, not clipped
    assert coefs[5] == 1.0  # [2, 10, 0.5]: median 2 > 0.5


@pytest.mark.parametrize(("percentile", "history"), [(10.0, 1000), (90.0, 7), (0.0, 5), (100, 4)])
def test_percentile_matches_autoclip(percentile, history):
    norms = noisy_norms(60, seed=11, spikes={10: 6.0, 40: 30.0})
    got = Feed(ClipPercentile(percentile, history)).run(norms)
    assert got == pytest.approx(autoclip_reference(norms, percentile, history), rel=1e-12)


def test_percentile_nonfinite_steps_leave_history_untouched():
    norms = noisy_norms(30, seed=2, spikes={12: 5.0})
    with_bad = [*norms[:5], INF, *norms[5:], NAN]
    got = Feed(ClipPercentile(25.0, history=8)).run(with_bad)
    assert got[5] == got[-1] == 1.0
    assert got[:5] + got[6:-1] == Feed(ClipPercentile(25.0, history=8)).run(norms)


def test_percentile_rejects_bad_arguments():
    with pytest.raises(ConfigError, match=r"ClipPercentile\(percentile\).*\[0, 100\], got 150"):
        ClipPercentile(150)
    with pytest.raises(ConfigError, match=r"ClipPercentile\(history\)"):
        ClipPercentile(history=0)
    clip = ClipPercentile(history=4)
    Feed(clip).run([1.0, 2.0])
    with pytest.raises(ConfigError, match="history=5"):
        ClipPercentile(history=5).load_state_dict(clip.state_dict())


# ------------------------------------------------------------------- state round trip


@pytest.mark.parametrize(
    "make",
    [
        lambda: ClipZScore(alpha=0.9, warmup=8),
        lambda: ClipZScore(warmup=8, mode="fixed", max_norm=1.15),
        lambda: ClipPercentile(30.0, history=16),
    ],
    ids=["zscore", "zscore-fixed", "percentile"],
)
@pytest.mark.parametrize("split", [0, 5, 40])
def test_state_round_trip_resumes_bit_for_bit(make, split):
    norms = noisy_norms(80, seed=7, spikes={20: 7.0, 50: 3.0, 51: NAN, 65: 12.0})
    whole = make()
    feed = Feed(whole)
    head = feed.run(norms[:split])
    saved = whole.state_dict()  # copies: the run continuing below must not change them
    tail = feed.run(norms[split:])

    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert head + Feed(resumed).run(norms[split:]) == head + tail
    assert any(c < 1.0 for c in tail)


def test_empty_state_round_trip():
    clip = ClipZScore()
    assert clip.state_dict() == {}
    clip.load_state_dict({})
    assert Feed(clip).step(1.0) == 1.0
    with pytest.raises(ConfigError, match="missing 'var'"):
        ClipZScore().load_state_dict({"count": 1, "mean": 1.0})


# ---------------------------------------------------------------------------- ClipUnitwise


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.body = nn.Linear(27, 6)
        self.norm = nn.LayerNorm(6)
        self.gain = nn.Parameter(torch.tensor(0.5))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(1)
        return self.head(self.norm(torch.relu(self.body(h))) * self.gain)


def fill_grads(model: nn.Module, seed: int) -> None:
    """Random gradients whose rows span clipped and unclipped units (0.01·‖W‖ is tiny)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        g = torch.randn(p.shape, generator=gen)
        scale = torch.logspace(-5, 0, p.shape[0]) if p.ndim >= 1 else torch.tensor(1e-3)
        p.grad = g * scale.reshape(-1, *[1] * (p.ndim - 1)) if p.ndim >= 1 else g * scale


def unitwise(clip: ClipUnitwise, model: nn.Module) -> float:
    params = list(model.parameters())
    batch = GradCollector(params, torch.device("cpu"), torch.float32).gather()
    before = torch.nn.utils.get_total_norm([p.grad for p in params])
    out = torch.empty(())
    clip.clip_(batch, before, torch.empty(len(params)), out)
    return out.item()


def test_unitwise_matches_timm_agc():
    torch.manual_seed(0)
    model, reference = Net(), Net()
    reference.load_state_dict(model.state_dict())
    fill_grads(model, 1)
    fill_grads(reference, 1)
    before = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    coef = unitwise(ClipUnitwise(0.01, 1e-3), model)
    agc_reference(list(reference.parameters()))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0, msg=name)
    rows = model.body.weight.grad.norm(dim=1) / model.body.weight.norm(dim=1).clamp(min=1e-3)
    assert (rows <= 0.01 * (1 + 1e-5)).all() and (rows < 0.009).any()  # some clipped, some not
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert coef == pytest.approx((after / before).item(), rel=1e-6)
    assert coef < 1.0


@pytest.mark.parametrize("how", ["module", "tensors", "name"])
def test_unitwise_excludes_the_classifier(how):
    torch.manual_seed(0)
    model = Net()
    fill_grads(model, 2)
    head = [p.grad.clone() for p in model.head.parameters()]
    exclude = {"module": model.head, "tensors": list(model.head.parameters()), "name": "head"}
    clip = ClipUnitwise(exclude=exclude[how])
    if how == "name":
        with pytest.raises(StateError, match=r"\.bind\(model\.named_parameters\(\)\)"):
            unitwise(clip, model)
        clip.bind(model.named_parameters())
    body = model.body.weight.grad.clone()
    unitwise(clip, model)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.head.parameters(), head))
    assert not torch.equal(model.body.weight.grad, body)  # the rest is still clipped


def test_unitwise_rebind_follows_the_new_model():
    torch.manual_seed(0)
    first, second = Net(), Net()
    clip = ClipUnitwise(exclude="head").bind(first.named_parameters())
    clip.bind(second.named_parameters())
    for model in (first, second):
        fill_grads(model, 4)
    heads = [model.head.weight.grad.clone() for model in (first, second)]
    unitwise(clip, first)
    unitwise(clip, second)
    assert not torch.equal(first.head.weight.grad, heads[0])  # no longer excluded
    assert torch.equal(second.head.weight.grad, heads[1])


def test_unitwise_unknown_name_is_named():
    with pytest.raises(ConfigError, match=r"'classifier' matches no parameter.*conv\.weight"):
        ClipUnitwise(exclude=("classifier",)).bind(Net().named_parameters())


def test_unitwise_nonfinite_unit_left_alone():
    torch.manual_seed(0)
    model = Net()
    fill_grads(model, 3)
    model.body.weight.grad[2, 0] = NAN
    model.norm.weight.grad[0] = INF
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    coef = unitwise(ClipUnitwise(), model)
    assert coef == 1.0  # no finite ratio of non-finite norms
    grad = model.body.weight.grad
    assert torch.isnan(grad[2, 0]) and torch.isfinite(grad[2, 1:]).all()
    assert torch.equal(grad[2, 1:], reference["body.weight"][2, 1:])  # NaN row not scaled
    assert torch.equal(model.norm.weight.grad, reference["norm.weight"])  # Inf not zeroed
    assert torch.isfinite(model.conv.weight.grad).all()  # other units clipped as usual
    assert not torch.equal(model.conv.weight.grad, reference["conv.weight"])


def test_unitwise_keeps_half_precision():
    layer = nn.Linear(8, 4).to(torch.bfloat16)
    layer.weight.grad = torch.ones_like(layer.weight)
    layer.bias.grad = torch.full_like(layer.bias, 1e-6)
    unitwise_bf16 = ClipUnitwise(0.1)
    params = list(layer.parameters())
    batch = GradCollector(params, torch.device("cpu"), torch.float32).gather()
    out = torch.empty(())
    total = torch.nn.utils.get_total_norm([p.grad for p in params]).float()
    unitwise_bf16.clip_(batch, total, torch.empty(2), out)
    assert layer.weight.grad.dtype == torch.bfloat16
    expected = 0.1 * layer.weight.float().norm(dim=1)
    torch.testing.assert_close(layer.weight.grad.float().norm(dim=1), expected, rtol=2e-2, atol=0)
    assert torch.equal(layer.bias.grad, torch.full_like(layer.bias, 1e-6))  # below its bound


def test_unitwise_repr_and_config():
    clip = ClipUnitwise(0.02, exclude=("head", nn.Linear(2, 2)))
    assert repr(clip) == "ClipUnitwise(clipping=0.02, eps=0.001, exclude=('head', 'Linear'))"
    assert clip.config() == {
        "name": "ClipUnitwise",
        "clipping": 0.02,
        "eps": 0.001,
        "exclude": ["head", "Linear"],
    }
    assert clip.state_dict() == {}


# ------------------------------------------------------------------------ sparse gradients


class SparseNet(nn.Module):
    """Parameters with sparse gradients of every shape ClipUnitwise meets, and a dense layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 5, sparse=True)  # rows: sparse_dim 1, dense_dim 1
        self.matrix = nn.Parameter(torch.randn(4, 6))  # fully sparse 2-d: sparse_dim 2
        self.vector = nn.Parameter(torch.randn(9))  # 1-d: one unit
        self.head = nn.Linear(5, 2)


def sparse_grads(model: SparseNet) -> None:
    """Uncoalesced sparse gradients (duplicate indices) spanning clipped and unclipped units."""
    gen = torch.Generator().manual_seed(0)

    def coo(indices: list[list[int]], values: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return torch.sparse_coo_tensor(torch.tensor(indices), values, size, check_invariants=True)

    scales = torch.tensor([1e-3, 1.0, 1e-3, 1e-4, 1.0, 1.0]).reshape(-1, 1)
    rows = [[3, 8, 3, 0, 11, 8]]
    model.embed.weight.grad = coo(rows, torch.randn(6, 5, generator=gen) * scales, (12, 5))
    cells = [[0, 0, 2, 0, 3], [1, 5, 3, 1, 0]]  # (0, 1) twice; row 0 spans three entries
    values = torch.tensor([0.5, 0.2, 1e-4, 0.5, 2.0])
    model.matrix.grad = coo(cells, values, model.matrix.shape)
    model.vector.grad = coo([[1, 4, 1]], torch.tensor([0.5, -2.0, 0.5]), model.vector.shape)
    model.head.weight.grad = torch.randn(2, 5, generator=gen)
    model.head.bias.grad = torch.randn(2, generator=gen) * 1e-4


def clip_through_collector(clip: Clipper, model: nn.Module) -> float:
    """The watcher's order: the read pass (which finds sparse gradients and regroups), then clip."""
    params = list(model.parameters())
    collector = GradCollector(params, torch.device("cpu"), torch.float32)
    batch = collector.gather()
    norms = torch.empty(len(params))
    collector.param_norms_(batch, norms)
    assert [g.sparse for g in batch.groups] == [True, False]  # regrouped in place
    before = torch.nn.utils.get_total_norm([p.grad.to_dense() for p in params])
    out = torch.empty(())
    clip.bind(model.named_parameters()).clip_(batch, before, norms, out)
    return out.item()


@pytest.mark.parametrize("exclude", [(), ("embed",)])
def test_unitwise_sparse_matches_timm_agc_on_dense_equivalent(exclude):
    torch.manual_seed(0)
    model = SparseNet()
    sparse_grads(model)
    reference = SparseNet()
    reference.load_state_dict(model.state_dict())
    for p, q in zip(model.parameters(), reference.parameters()):
        q.grad = p.grad.to_dense().clone()
    embed_before = model.embed.weight.grad.to_dense().clone()
    before = torch.nn.utils.get_total_norm([q.grad for q in reference.parameters()])
    coef = clip_through_collector(ClipUnitwise(0.05, exclude=exclude), model)
    kept = [q for n, q in reference.named_parameters() if not n.startswith(exclude)]
    agc_reference(kept, clipping=0.05)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad.layout == (torch.strided if name.startswith("head") else torch.sparse_coo)
        torch.testing.assert_close(p.grad.to_dense(), q.grad, rtol=1e-6, atol=0, msg=name)
    ratio = model.embed.weight.grad.to_dense().norm(dim=1) / model.embed.weight.norm(dim=1)
    if exclude:
        assert torch.equal(model.embed.weight.grad.to_dense(), embed_before)
    else:  # rows 8 and 11 clipped to the bound, rows 0 and 3 below it left alone
        assert ratio[[8, 11]].tolist() == pytest.approx([0.05, 0.05], rel=1e-5)
        assert torch.equal(model.embed.weight.grad.to_dense()[[0, 3]], embed_before[[0, 3]])
    after = torch.nn.utils.get_total_norm([p.grad.to_dense() for p in model.parameters()])
    assert coef == pytest.approx((after / before).item(), rel=1e-6)
    assert coef < 1.0


@pytest.mark.parametrize(
    "make",
    [lambda: ClipZScore(warmup=3), lambda: ClipPercentile(50.0, history=4)],
    ids=["zscore", "percentile"],
)
def test_norm_based_clippers_scale_sparse_gradients(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    gen = torch.Generator().manual_seed(0)
    coefs = []
    with gradwatch.GradWatch(model, clip=make(), sinks=[]) as watch:
        for step in range(8):
            model.zero_grad()
            tokens = torch.randint(0, 10, (6,), generator=gen)
            (model(tokens).sum() * (30.0 if step == 6 else 1.0)).backward()
            before = [p.grad.to_dense().clone() for p in model.parameters()]
            report = watch.check()
            expected = torch.nn.utils.get_total_norm(before).item()
            assert report.global_norm == pytest.approx(expected, rel=1e-6)
            assert model[0].weight.grad.is_sparse
            for p, b in zip(model.parameters(), before):
                torch.testing.assert_close(p.grad.to_dense(), b * report.clip_coef)
            coefs.append(report.clip_coef)
    assert coefs[6] < 0.5


# --------------------------------------------------------------------------------- no sync


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def test_clip_never_syncs(monkeypatch):
    calls: list[str] = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    model = Net()
    params = list(model.parameters())
    collector = GradCollector(params, torch.device("cpu"), torch.float32)
    clippers = [
        ClipZScore(warmup=3),
        ClipZScore(warmup=3, mode="fixed", max_norm=5.0),
        ClipPercentile(20.0, history=4),
        ClipUnitwise(exclude=model.head),
    ]
    batches = []
    for step in range(8):
        fill_grads(model, step)
        if step == 5:
            model.body.weight.grad.mul_(1e3)
        if step == 6:
            model.body.bias.grad[0] = NAN
        batches.append(collector.gather())
    outs = torch.empty(len(clippers), len(batches))
    totals = [
        torch.nn.utils.get_total_norm([g for _, gs in b.grouped() for g in gs]) for b in batches
    ]
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    for j, (batch, total) in enumerate(zip(batches, totals)):
        for i, clip in enumerate(clippers):
            clip.clip_(batch, total, torch.empty(len(params)), outs[i, j])
    monkeypatch.undo()
    assert calls == []
    assert (outs < 1).any(dim=1).all()  # every clipper actually clipped something


# ------------------------------------------------------------------------- through GradWatch


def train(watch: gradwatch.GradWatch, model: nn.Module, steps: int, spike_at: int):
    """Check every step; return (report, gradients before, gradients after clipping) per step."""
    gen = torch.Generator().manual_seed(0)
    seen = []
    for step in range(steps):
        model.zero_grad()
        x = torch.randn(16, 4, generator=gen)
        loss = (model(x) - x[:, :2]).pow(2).mean() * (40.0 if step == spike_at else 1.0)
        loss.backward()
        before = [p.grad.clone() for p in model.parameters()]
        report = watch.check(loss=loss)
        seen.append((report, before, [p.grad.clone() for p in model.parameters()]))
    return seen


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


@pytest.mark.parametrize("kind", ["zscore", "percentile"])
def test_through_gradwatch_matches_rule_and_gradients(kind):
    model = tiny_model()
    if kind == "zscore":
        clip, ref = ClipZScore(warmup=5), ZClipReference(warmup=5)
    else:
        clip, ref = ClipPercentile(50.0, history=6), None
    with gradwatch.GradWatch(model, clip=clip, sinks=[]) as watch:
        seen = train(watch, model, steps=12, spike_at=9)
    norms = [r.global_norm for r, _, _ in seen]
    expected = [ref.step(g) for g in norms] if ref else autoclip_reference(norms, 50.0, history=6)
    assert [r.clip_coef for r, _, _ in seen] == pytest.approx(expected, rel=1e-5)
    for report, before, after in seen:
        for b, a in zip(before, after):
            torch.testing.assert_close(a, b * report.clip_coef)  # the reported factor was applied
    spike = seen[9][0]
    assert spike.clip_coef < 0.5 and spike.clipped == (spike.clip_coef < 1.0)
    assert spike.clipped_norm == pytest.approx(spike.global_norm * spike.clip_coef)


def test_through_gradwatch_unitwise_and_state():
    model = tiny_model()
    clip = ClipUnitwise(0.05, exclude=model[2])
    with gradwatch.GradWatch(model, clip=clip, sinks=[]) as watch:
        report, before, _ = train(watch, model, steps=1, spike_at=-1)[0]
        after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert report.clip_coef == pytest.approx(after.item() / report.global_norm, rel=1e-6)
        assert report.clip_coef < 1.0
        assert torch.equal(model[2].weight.grad, before[2])
        assert watch.state_dict()["clip"] == {}


def test_through_gradwatch_state_dict_resumes():
    def run(resume_at: int | None) -> list[float]:
        model = tiny_model()
        watch = gradwatch.GradWatch(model, clip=ClipZScore(warmup=4), sinks=[])
        gen = torch.Generator().manual_seed(2)
        coefs = []
        for step in range(14):
            if step == resume_at:
                state = watch.state_dict()
                watch.close()
                watch = gradwatch.GradWatch(model, clip=ClipZScore(warmup=4), sinks=[])
                watch.load_state_dict(state)
            model.zero_grad()
            x = torch.randn(8, 4, generator=gen)
            (model(x).pow(2).mean() * (25.0 if step in (9, 12) else 1.0)).backward()
            coefs.append(watch.check().clip_coef)
        watch.close()
        return coefs

    uninterrupted = run(None)
    assert run(6) == uninterrupted
    assert min(uninterrupted) < 1.0
