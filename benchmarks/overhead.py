"""gradwatch overhead, measured side by side against the torch baseline in one run.

For four models (a deep MLP, a small GPT, an LSTM language model, 1000 tiny tensors) it prints:

* ``a``  ``watch.check()`` with ``ClipNorm(1.0)`` vs ``torch.nn.utils.clip_grad_norm_`` alone, on
  the same existing gradients (only the call is timed), with ``sinks=[]`` and with the default
  console sink (``every=100``, written to /dev/null). Target: <= 1.00x (check() replaces the
  clip call).
* ``b``  a full training step (zero_grad, forward, backward, optimizer.step) with a GradWatch
  attached (monitoring only: no clipper, ``sinks=[]``) vs the same bare step. Target: <= 1.03x for
  the small GPT; reported for every model. ``b0`` is an A/A row (bare step vs a bare copy of the
  same model): the noise floor the ``b`` ratio must be read against.
* host "syncs" per step in the default configuration: calls of ``Tensor.item/__bool__/__float__/
  __int__/tolist/cpu/numpy`` (and ``torch.cuda`` synchronisations) made during a step, in total and
  from gradwatch's own frames. On CPU none of them really waits; they are the calls that would on
  an accelerator.

Variants are timed interleaved (the order rotates every round), after a warm-up, with a fixed
number of threads. Each round gives one paired ratio; the table shows the median ratio and its
interquartile range. A verdict is ``PASS``/``MISS`` when the whole IQR is on one side of the
target, ``PASS~``/``MISS~`` when the median is but the IQR straddles it (within noise).

Run ``python benchmarks/overhead.py`` (about 1.5 min on 2 idle CPU cores), ``--quick`` for a smoke
run (under 10 s plus imports), ``--models gpt,mlp`` for a subset, ``--device cpu|cuda|all``,
``--breakdown`` for where check() spends its time. Exits 0 whatever it measures (a measurement, not
a test); only bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch

# ------------------------------------------------------------------------------------ models


class MLP(nn.Sequential):
    """20 x (Linear(256, 256) + ReLU): 40 tensors. He init keeps gradients far from subnormals."""

    def __init__(self, depth: int = 20, width: int = 256) -> None:
        layers: list[nn.Module] = []
        for _ in range(depth):
            linear = nn.Linear(width, width)
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU()]
        super().__init__(*layers)


class GPTBlock(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP (12 tensors)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT: 6 layers, d_model 384, 6 heads, vocab 4096, context 128 (~13.8M params, 78
    tensors)."""

    def __init__(
        self, vocab: int = 4096, context: int = 128, d_model: int = 384, layers: int = 6
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(GPTBlock(d_model, 6) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class LSTMLM(nn.Module):
    """Embedding(4096, 256), 2-layer LSTM(512), Linear decoder: 11 tensors, ~6.8M params."""

    def __init__(self, vocab: int = 4096, emb: int = 256, hidden: int = 512) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=2, batch_first=True)
        self.dec = nn.Linear(hidden, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.dec(self.lstm(self.emb(idx))[0])


class TinyMany(nn.Module):
    """500 independent Linear(8, 8), each on its own slice of the input: 1000 tiny tensors."""

    def __init__(self, n: int = 500) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([layer(x[:, i]) for i, layer in enumerate(self.layers)], dim=1)


def _lm_loss(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), batch[1].flatten())


def _mse_loss(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(out, batch[1])


@dataclass
class Spec:
    """A benchmark model: how to build it and one fixed batch, and the step target (if any)."""

    key: str
    title: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    step_target: float | None = None


def _tokens(batch: int, length: int) -> Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]:
    def make(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, 4096, (batch, length + 1), device=device)
        return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    return make


SPECS = {
    "mlp": Spec(
        "mlp",
        "deep MLP 20x256",
        MLP,
        lambda d: (torch.randn(64, 256, device=d), torch.randn(64, 256, device=d)),
        _mse_loss,
    ),
    "gpt": Spec("gpt", "small GPT 6x384", GPT, _tokens(2, 128), _lm_loss, step_target=1.03),
    "lstm": Spec("lstm", "LSTM LM 2x512", LSTMLM, _tokens(8, 64), _lm_loss),
    "tiny": Spec(
        "tiny",
        "1000 tiny tensors",
        TinyMany,
        lambda d: (torch.randn(32, 500, 8, device=d), torch.randn(32, 500, 8, device=d)),
        _mse_loss,
    ),
}
CHECK_TARGET = 1.0
INFO_STEP_TARGET = 1.03  # shown for models without a step target, for information only


# ----------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(fn: Callable[[], Any], inner: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, over ``inner`` back-to-back calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / inner


@dataclass
class Timing:
    """Per-round seconds per call of each variant (same rounds, interleaved)."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median_ms(self, label: str) -> float:
        return statistics.median(self.seconds[label]) * 1e3

    def ratios(self, label: str, base: str) -> list[float]:
        return [v / b for v, b in zip(self.seconds[label], self.seconds[base])]


def interleaved(
    variants: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    budget: float,
    min_rounds: int,
    max_rounds: int,
    block: float,
    warmup: int,
) -> Timing:
    """Time ``variants`` in rounds; each round times every variant once, order rotating.

    Rounds continue until ``budget`` seconds have passed and ``min_rounds`` are done, within
    ``max_rounds``; on a machine much slower than expected, after 2 x ``budget`` and at least 3
    rounds, whatever the minimum (the run stays bounded; the IQR shows the lost precision).

    Args:
        variants: Label -> callable; the first is the baseline.
        block: Target seconds per timed block; sets how many calls a block makes.
        warmup: Untimed calls of each variant first.
    """
    labels = list(variants)
    for label in labels:
        for _ in range(warmup):
            variants[label]()
    probe = max(_time_block(variants[labels[0]], 1, device), 1e-7)
    inner = max(1, min(1000, round(block / probe)))
    timing = Timing({label: [] for label in labels})
    gc.collect()
    start = time.perf_counter()
    for r in range(max_rounds):
        elapsed = time.perf_counter() - start
        if (r >= min_rounds and elapsed >= budget) or (r >= 3 and elapsed >= 2 * budget):
            break
        shift = r % len(labels)
        for label in labels[shift:] + labels[:shift]:
            timing.seconds[label].append(_time_block(variants[label], inner, device))
    return timing


def _quantile(values: list[float], q: float) -> float:
    data = sorted(values)
    pos = (len(data) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


# ---------------------------------------------------------------------------- sync counting

_CONVERSIONS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")
_GRADWATCH_DIR = os.path.dirname(os.path.abspath(gradwatch.__file__)) + os.sep
_OPTIM_DIR = os.path.dirname(os.path.abspath(torch.optim.__file__)) + os.sep


class SyncCounter:
    """Counts host-sync calls on tensors, and which of them came from gradwatch's own frames."""

    def __init__(self) -> None:
        self.total: Counter[str] = Counter()
        self.ours: Counter[str] = Counter()
        self.active = False

    def _record(self, name: str) -> None:
        if not self.active:
            return
        self.total[name] += 1
        # Ours if a gradwatch frame is reached before the optimizer's own step (which gradwatch's
        # StepGuard calls, and which makes the same calls in a bare step).
        frame = sys._getframe(2)
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith(_OPTIM_DIR):
                return
            if filename.startswith(_GRADWATCH_DIR):
                self.ours[name] += 1
                return
            frame = frame.f_back

    def reset(self) -> None:
        self.total.clear()
        self.ours.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator[SyncCounter]:
        """Wrap the conversions (and torch.cuda synchronisations) while the block runs."""
        patched: list[tuple[Any, str, Any, bool]] = []

        def wrap(owner: Any, name: str, label: str) -> None:
            original = getattr(owner, name, None)
            if original is None:
                return
            own = name in vars(owner)

            def counted(*args: Any, **kwargs: Any) -> Any:
                self._record(label)
                return original(*args, **kwargs)

            patched.append((owner, name, vars(owner).get(name), own))
            setattr(owner, name, counted)

        for name in _CONVERSIONS:
            wrap(torch.Tensor, name, name)
        if torch.cuda.is_available():
            wrap(torch.cuda, "synchronize", "cuda.synchronize")
            wrap(torch.cuda.Event, "synchronize", "Event.synchronize")
            wrap(torch.cuda.Stream, "synchronize", "Stream.synchronize")
        try:
            yield self
        finally:
            for owner, name, previous, own in reversed(patched):
                if own:
                    setattr(owner, name, previous)
                else:
                    delattr(owner, name)


def _fmt_counts(counter: Counter[str], steps: int) -> str:
    if not counter:
        return "0"
    total = sum(counter.values()) / steps
    parts = ", ".join(f"{k} {v / steps:g}" for k, v in sorted(counter.items()))
    return f"{total:g} ({parts})"


# ------------------------------------------------------------------------------- benchmark


@dataclass
class Row:
    model: str
    tensors: int
    params: int
    measure: str
    baseline_ms: float
    gradwatch_ms: float
    ratios: list[float]
    target: float | None
    info_target: float | None = None

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def verdict(self) -> str:
        target = self.target if self.target is not None else self.info_target
        if target is None:
            return "-"
        lo, hi = _quantile(self.ratios, 0.25), _quantile(self.ratios, 0.75)
        if hi <= target:
            word = "PASS"
        elif lo > target:
            word = "MISS"
        else:
            word = "PASS~" if self.ratio <= target else "MISS~"
        if self.target is None:
            return f"({word.lower()})"
        return word + (" <<<" if word.startswith("MISS") else "")


@dataclass
class Setup:
    spec: Spec
    device: torch.device
    params: int
    tensors: int


_DEVNULL: list[Any] = []


@contextlib.contextmanager
def _devnull_stdout() -> Iterator[Any]:
    """Redirect stdout to one /dev/null file that stays open (console sinks keep a reference)."""
    if not _DEVNULL:
        _DEVNULL.append(open(os.devnull, "w"))  # noqa: SIM115 - open for the whole run
    with contextlib.redirect_stdout(_DEVNULL[0]):
        yield _DEVNULL[0]


def _make(spec: Spec, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return spec.build().to(device)


def _backward(model: nn.Module, spec: Spec, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    spec.loss(model(batch[0]), batch).backward()


def _subnormal_fraction(params: list[torch.Tensor]) -> float:
    tiny = torch.finfo(torch.float32).tiny
    bad = sum(int(((p.grad.abs() < tiny) & (p.grad != 0)).sum()) for p in params)
    return bad / max(1, sum(p.numel() for p in params))


def bench_check(setup: Setup, args: argparse.Namespace) -> list[Row]:
    """(a) check() with ClipNorm vs clip_grad_norm_ on the same existing gradients."""
    spec, device = setup.spec, setup.device
    model = _make(spec, device)
    params = list(model.parameters())
    torch.manual_seed(1)
    _backward(model, spec, spec.batch(device))
    subnormal = _subnormal_fraction(params)
    if subnormal > 0:
        print(f"  warning: {spec.key}: {subnormal:.2%} of gradient values are subnormal")
    quiet = gradwatch.GradWatch(model, clip=gradwatch.ClipNorm(1.0), sinks=[])
    with _devnull_stdout():  # the default sink (ConsoleSink(every=100)) binds stdout now
        console = gradwatch.GradWatch(model, clip=gradwatch.ClipNorm(1.0))
    variants = {
        "clip": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "quiet": quiet.check,
        "console": console.check,
    }
    with _devnull_stdout():
        timing = interleaved(
            variants,
            device,
            budget=args.check_budget,
            min_rounds=args.min_rounds,
            max_rounds=400,
            block=0.005,
            warmup=args.warmup_calls,
        )
        quiet.close()
        console.close()
    rows = []
    for label, what in (
        ("quiet", "a  check()+ClipNorm, sinks=[]  vs clip_grad_norm_"),
        ("console", "a  check()+ClipNorm, console/100 vs clip_grad_norm_"),
    ):
        rows.append(
            Row(
                spec.key,
                setup.tensors,
                setup.params,
                what,
                timing.median_ms("clip"),
                timing.median_ms(label),
                timing.ratios(label, "clip"),
                CHECK_TARGET,
            )
        )
    return rows


def _trainer(
    model: nn.Module, spec: Spec, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        spec.loss(model(batch[0]), batch).backward()
        opt.step()

    return opt, step


def bench_step(setup: Setup, args: argparse.Namespace) -> list[Row]:
    """(b) a training step with a monitoring-only GradWatch attached vs the bare step."""
    spec, device = setup.spec, setup.device
    torch.manual_seed(2)
    batch = spec.batch(device)
    bare = _make(spec, device)
    twin = copy.deepcopy(bare)
    watched = copy.deepcopy(bare)
    _, bare_step = _trainer(bare, spec, batch)
    _, twin_step = _trainer(twin, spec, batch)
    opt, watched_step = _trainer(watched, spec, batch)
    watch = gradwatch.GradWatch(watched, sinks=[]).attach(opt)
    timing = interleaved(
        {"bare": bare_step, "twin": twin_step, "watched": watched_step},
        device,
        budget=args.step_budget,
        min_rounds=args.min_rounds,
        max_rounds=200,
        block=0.05,
        warmup=args.warmup_steps,
    )
    watch.close()
    base = timing.median_ms("bare")
    common = (spec.key, setup.tensors, setup.params)
    return [
        Row(
            *common,
            "b0 A/A: bare step vs bare copy (noise floor)",
            base,
            timing.median_ms("twin"),
            timing.ratios("twin", "bare"),
            None,
        ),
        Row(
            *common,
            "b  step+GradWatch (monitor only) vs bare step",
            base,
            timing.median_ms("watched"),
            timing.ratios("watched", "bare"),
            spec.step_target,
            None if spec.step_target is not None else INFO_STEP_TARGET,
        ),
    ]


def count_syncs(setup: Setup, args: argparse.Namespace) -> list[str]:
    """Host-sync calls per step: bare step vs default-config GradWatch, and from gradwatch."""
    spec, device = setup.spec, setup.device
    torch.manual_seed(3)
    batch = spec.batch(device)
    model = _make(spec, device)
    _, bare_step = _trainer(model, spec, batch)
    watched = copy.deepcopy(model)
    opt, watched_step = _trainer(watched, spec, batch)
    steps = args.sync_steps
    counter = SyncCounter()
    lines = []
    with _devnull_stdout(), counter.installed():
        watch = gradwatch.GradWatch(watched).attach(opt)  # default: console sink, every=100
        bare_step()
        watched_step()
        counter.active = True
        for _ in range(steps):
            bare_step()
        bare_total = Counter(counter.total)
        counter.reset()
        for _ in range(steps):
            watched_step()
        lines.append(
            f"{spec.key:<5} attached steps: bare {_fmt_counts(bare_total, steps)} | "
            f"with GradWatch {_fmt_counts(counter.total, steps)} | "
            f"from gradwatch {_fmt_counts(counter.ours, steps)}"
        )
        # check() on existing gradients, across a console emission (every=100) and close().
        counter.active = False
        checker = gradwatch.GradWatch(model, clip=gradwatch.ClipNorm(1.0))
        counter.reset()
        counter.active = True
        calls = 101
        for _ in range(calls):
            checker.check()
        checker.close()
        watch.close()
        counter.active = False
        lines.append(
            f"{'':<5} check()+ClipNorm x{calls} incl. console emission and close(): "
            f"from gradwatch {_fmt_counts(counter.ours, calls)} per call"
        )
    return lines


# ------------------------------------------------------------------------------- breakdown


class _Probe:
    """Wraps methods on live objects with inclusive timers, keyed by call path (nested probes).

    The tree is what was observed, so it follows refactors of the watcher; a method that does not
    exist is simply not probed. :meth:`remove` restores everything.
    """

    def __init__(self) -> None:
        self.seconds: Counter[tuple[str, ...]] = Counter()
        self.calls: Counter[tuple[str, ...]] = Counter()
        self.segments: list[tuple[Counter[tuple[str, ...]], Counter[tuple[str, ...]]]] = []
        self._path: list[str] = []
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name, None)
        if original is None or not callable(original):
            return
        probe, path, clock = self, self._path, time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:
            path.append(label)
            key = tuple(path)
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                probe.seconds[key] += clock() - start
                probe.calls[key] += 1
                path.pop()

        had = name in vars(owner)
        previous = vars(owner).get(name)
        setattr(owner, name, timed)

        def undo() -> None:
            if had:
                setattr(owner, name, previous)
            else:
                delattr(owner, name)

        self._undo.append(undo)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    def cut(self) -> None:
        """Close a segment of root calls (the tree takes the median over segments)."""
        self.segments.append((self.seconds, self.calls))
        self.seconds, self.calls = Counter(), Counter()

    def tree(self, per: int) -> list[str]:
        """Microseconds per root call by call path: the median over segments of ``per`` root
        calls each (so a moment descheduled in one segment does not land on one piece).
        """
        keys = sorted(
            {k for seconds, _ in self.segments for k in seconds},
            key=lambda k: [_PROBE_ORDER.get(x, 99) for x in k],
        )
        cost = {k: statistics.median(s[k] for s, _ in self.segments) * 1e6 / per for k in keys}
        lines = []
        for key in keys:  # sorted by path, so children follow their parent
            kids = [k for k in keys if len(k) == len(key) + 1 and k[: len(key)] == key]
            n = statistics.median(c[key] for _, c in self.segments) / per
            indent = "  " * (len(key) - 1)
            lines.append(f"{indent}{key[-1]:<28}{cost[key]:10.1f} us  ({n:g}/call)")
            if kids:
                rest = cost[key] - sum(cost[k] for k in kids)
                lines.append(f"{indent}  {'(rest, not probed)':<28}{rest:10.1f} us")
        return lines


# (label, dotted attribute path from the watcher or "@Class", method): inclusive timers.
_PROBES = [
    ("check", "", "_check"),
    ("ring.claim", "_ring", "claim"),
    ("collector.gather", "_collector", "gather"),
    ("collector.param_norms_", "_collector", "param_norms_"),
    ("collector.global_norm_", "_collector", "global_norm_"),
    ("_write_loss", "", "_write_loss"),
    ("_write_scale", "", "_write_scale"),
    ("_decide", "", "_decide"),
    ("_clip", "", "_clip"),
    ("clipper.clip_", "clipper", "clip_"),
    ("ring.commit", "_ring", "commit"),
    ("StepReport._deferred", "@StepReport", "_deferred"),
    ("arrivals.snapshot", "_arrivals", "snapshot"),
    ("probe.capture", "_probe", "capture"),
    ("emission.add", "_emission", "add"),
    ("emission.scan", "_emission", "scan"),
    ("emission.judge", "_emission", "judge"),
    ("ring.peek", "_ring", "peek"),
    ("emission.drain", "_emission", "drain"),
    ("ring.host_row", "_ring", "host_row"),
    ("emission._emit", "_emission", "_emit"),
    ("spike_detector.update", "spike_detector", "update"),
    ("baseline.culprits", "_emission.baseline", "culprits"),
    ("baseline.update", "_emission.baseline", "update"),
    ("ParamNorms()", "@ParamNorms", "__init__"),
    ("StepReport._fill", "@StepReport", "_fill"),
    ("aggregator.update", "_emission.aggregator", "update"),
    ("aggregator._absorb", "_emission.aggregator", "_absorb"),
    ("health_detector.update", "health_detector", "update"),
    ("sinks.write", "_sinks", "write"),
]
_PROBE_ORDER = {label: i for i, (label, _, _) in enumerate(_PROBES)}


def _attribute(obj: Any, path: str) -> Any:
    """``obj`` followed along a dotted attribute path ("" is ``obj``); None where one is missing."""
    for name in path.split(".") if path else ():
        obj = getattr(obj, name, None)
    return obj


def breakdown(setup: Setup, args: argparse.Namespace) -> list[str]:
    """Where check() (ClipNorm, sinks=[]) spends its time, next to clip_grad_norm_'s two halves."""
    spec, device = setup.spec, setup.device
    model = _make(spec, device)
    params = list(model.parameters())
    torch.manual_seed(1)
    _backward(model, spec, spec.batch(device))
    grads = [p.grad for p in params]
    watch = gradwatch.GradWatch(model, clip=gradwatch.ClipNorm(1.0), sinks=[])
    for _ in range(64):
        watch.check()
    # About a second per timed loop, in a multiple of 32 calls (the emission batch, if any).
    per_call = _time_block(watch.check, 8, device)
    budget = 0.1 if args.quick else 0.4
    calls = max(32, min(512, int(budget / per_call) // 32 * 32))
    total = torch.nn.utils.get_total_norm(grads)
    timing = interleaved(
        {
            "clip": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
            "norm": lambda: torch.nn.utils.get_total_norm(grads),
            "scale": lambda: torch.nn.utils.clip_grads_with_norm_(params, 1.0, total),
            "check": watch.check,
        },
        device,
        budget=2 * budget,
        min_rounds=5,
        max_rounds=100,
        block=0.005,
        warmup=2,
    )
    clip, norm, scale, bare = (
        timing.median_ms(k) / 1e3 for k in ("clip", "norm", "scale", "check")
    )
    probe = _Probe()
    classes = {"@StepReport": gradwatch.StepReport, "@ParamNorms": gradwatch.ParamNorms}
    for label, path, attr in _PROBES:
        owner = classes.get(path) or _attribute(watch, path)
        if owner is not None:
            probe.wrap(owner, attr, label)
    try:
        for _ in range(3 if args.quick else 7):
            _time_block(watch.check, calls, device)
            probe.cut()
    finally:
        probe.remove()
        watch.close()
    lines = [
        f"{spec.key}: clip_grad_norm_ {clip * 1e6:.1f} us "
        f"(get_total_norm {norm * 1e6:.1f} + clip_grads_with_norm_ {scale * 1e6:.1f}); "
        f"check() {bare * 1e6:.1f} us unprobed (medians). With probes (inclusive, per check, "
        "median over segments):"
    ]
    return lines + ["  " + line for line in probe.tree(calls)]


# ---------------------------------------------------------------------------------- output


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, CPU-seconds busy on the machine, CPU-seconds used by this process); Linux only."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
    own = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _others_busy(start: tuple[float, float, float] | None) -> float | None:
    """Cores kept busy by other processes since ``start`` (None where unknown)."""
    end = _cpu_snapshot()
    if start is None or end is None or end[0] <= start[0]:
        return None
    return max(0.0, (end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0])


def _contention(start: tuple[float, float, float] | None) -> str:
    others = _others_busy(start)
    if others is None:
        return ""
    note = " - ratios are noisier than usual" if others > 0.15 else ""
    return f"other processes kept {others:.2f} of {os.cpu_count()} cores busy meanwhile{note}"


def _default_threads(quick: bool) -> tuple[int, str]:
    """All cores (at most 8), minus those other processes keep busy right now; 1 with --quick.

    With more torch threads than free cores, every parallel region waits for a descheduled
    thread and a step can become 10-100x slower, which no interleaving can compensate.
    """
    cores = min(os.cpu_count() or 1, 8)
    if quick:
        return 1, "--quick"
    start = _cpu_snapshot()
    time.sleep(0.5)
    others = _others_busy(start)
    if others is None or others < 0.5 or cores == 1:
        return cores, "all cores"
    threads = max(1, cores - math.ceil(others - 0.25))
    return threads, f"other processes keep {others:.1f} of {cores} cores busy; --threads to force"


def _environment(devices: list[torch.device], threads: int, why: str) -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    lines = [
        f"gradwatch {gradwatch.__version__} | torch {torch.__version__} | "
        f"python {platform.python_version()} | {platform.system()} {platform.machine()}",
        f"cpu: {cpu}, {os.cpu_count()} logical cores | torch threads: {threads} ({why}; "
        f"interop {torch.get_num_interop_threads()})",
        f"devices: {', '.join(str(d) for d in devices)}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""),
        "optimizer: AdamW(lr=1e-4, torch defaults) | clip: ClipNorm(1.0) vs "
        "clip_grad_norm_(params, 1.0) | console sink writes to /dev/null",
    ]
    return lines


def _table(rows: list[Row]) -> list[str]:
    head = (
        f"{'model':<5} {'tensors':>7} {'params':>7}  {'measure':<52} {'base ms':>8} "
        f"{'gw ms':>8}  {'ratio':>6} {'[p25-p75]':<13} {'target':>6}  verdict"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        lo, hi = _quantile(row.ratios, 0.25), _quantile(row.ratios, 0.75)
        target = row.target if row.target is not None else row.info_target
        shown = "-" if target is None else f"<={target:.2f}" + ("" if row.target else "*")
        lines.append(
            f"{row.model:<5} {row.tensors:>7} {row.params / 1e6:>6.2f}M  {row.measure:<52} "
            f"{row.baseline_ms:>8.3f} {row.gradwatch_ms:>8.3f}  {row.ratio:>5.3f}x "
            f"[{lo:.3f}-{hi:.3f}] {shown:>6}  {row.verdict()}  (n={len(row.ratios)})"
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (CI smoke)")
    parser.add_argument(
        "--models",
        default=",".join(SPECS),
        help=f"comma-separated subset of {', '.join(SPECS)} (default: all)",
    )
    parser.add_argument(
        "--device",
        default="all",
        help="cpu, cuda, cuda:N, or all (cpu, plus cuda when available; the default)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads value (default: logical cores, at most 8, minus those other "
        "processes keep busy at start; 1 with --quick, so a busy CI machine does not matter)",
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="also time the pieces of GradWatch._check"
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in SPECS]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(SPECS)}")
    args.models = models
    if args.threads is None:
        args.threads, args.threads_why = _default_threads(args.quick)
    elif args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    else:
        args.threads_why = "--threads"
    if args.quick:
        args.check_budget, args.step_budget, args.min_rounds = 0.3, 0.6, 3
        args.warmup_calls, args.warmup_steps, args.sync_steps = 3, 1, 1
    else:
        args.check_budget, args.step_budget, args.min_rounds = 3.0, 15.0, 9
        args.warmup_calls, args.warmup_steps, args.sync_steps = 20, 2, 2
    return args


def _devices(choice: str) -> list[torch.device]:
    if choice == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {choice}: CUDA is not available; using cpu")
        return [torch.device("cpu")]
    return [device]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = _devices(args.device)
    started = time.perf_counter()
    load = _cpu_snapshot()
    print("gradwatch overhead benchmark" + (" (--quick: smoke run, ratios are noisy)" * args.quick))
    for line in _environment(devices, torch.get_num_threads(), args.threads_why):
        print("  " + line)
    for device in devices:
        rows: list[Row] = []
        syncs: list[str] = []
        pieces: list[str] = []
        print(f"\n== device {device} ==")
        for key in args.models:
            spec = SPECS[key]
            probe_model = _make(spec, device)
            params = [p for p in probe_model.parameters() if p.requires_grad]
            setup = Setup(spec, device, sum(p.numel() for p in params), len(params))
            del probe_model, params
            t0 = time.perf_counter()
            rows += bench_check(setup, args)
            rows += bench_step(setup, args)
            syncs += count_syncs(setup, args)
            if args.breakdown:
                pieces += breakdown(setup, args)
            print(f"  measured {key} ({spec.title}) in {time.perf_counter() - t0:.1f} s")
            gc.collect()
        print()
        for line in _table(rows):
            print(line)
        print(
            "ratio = median of per-round paired ratios (gradwatch / baseline), [p25-p75] their "
            "IQR; target * = for information only.\nPASS/MISS: whole IQR on one side of the "
            "target; PASS~/MISS~: median only (within noise). b0 is the noise floor for b."
        )
        print(
            "\nhost-sync calls per step (Tensor.item/__bool__/__float__/__int__/tolist/cpu/numpy"
            + (", cuda synchronize" if torch.cuda.is_available() else "")
            + "; default config GradWatch(model).attach(opt), console sink):"
        )
        for line in syncs:
            print("  " + line)
        if device.type == "cpu":
            print("  (on CPU none of these waits for a device; each would on an accelerator)")
        if pieces:
            print("\nbreakdown of check() (ClipNorm(1.0), sinks=[]):")
            for line in pieces:
                print("  " + line)
    print(f"\ntotal time {time.perf_counter() - started:.1f} s; {_contention(load)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
