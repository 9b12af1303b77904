"""The diagnosis zoo: small real training runs with a known root cause, and how to judge them.

Each :class:`Scenario` is a short CPU training loop (deterministic seeds) written the way a user
writes one, with gradwatch attached the standard way. The same loop runs twice:

* ``validate()`` runs it **without gradwatch** (a torch-only stand-in takes the watcher's place,
  clipping with ``torch.nn.utils.clip_grad_norm_`` where the loop asks for clipping) and checks
  from torch's own numbers that the failure really happened (a scenario that does not fail as
  built is *invalid*, never passed);
* ``run(**watch_kwargs)`` runs it with ``gradwatch.GradWatch(model, sinks=[collector], ...)`` and
  returns the findings of ``watch.diagnose()`` and the events the sinks received.

:func:`judge` says whether the diagnosis is right: on a healthy run, no ``"error"``/``"warning"``
finding and no alarm event; on a failing run, the first ``"error"``/``"warning"`` finding names
the expected cause (and, when the scenario judges the place, one of the acceptable places).
``apply_fix(finding)`` re-runs a scenario with the setting the diagnosis suggests and says whether
the run then recovers (finite, loss falling), judged from torch's numbers.

Used by ``benchmarks/diagnosis.py`` (the table) and ``tests/test_diagnosis_zoo.py`` (the fast
scenarios as tests). Constants differ from scenario to scenario on purpose: a rule tuned on one
scenario's numbers should not pass the others.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw

__all__ = [
    "ALARMS",
    "SCENARIOS",
    "Invalid",
    "Outcome",
    "Run",
    "Scenario",
    "Trace",
    "Verdict",
    "judge",
    "scenario",
]

ALARMS = frozenset(
    {
        "exploding",
        "vanishing",
        "nonfinite",
        "loss_nonfinite",
        "spike",
        "loss_spike",
        "dead",
        "unused",
    }
)
"""Event kinds that tell a person something is wrong (``"skip"`` is an action, not an alarm)."""

# ------------------------------------------------------------------------------ the harness


class Invalid(Exception):
    """The scenario did not fail (or stay healthy) the way it is meant to, measured by torch."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise Invalid(message)


@dataclass
class Trace:
    """What torch measured during a run: per-step loss and total gradient norm, plus extras.

    ``norms[i]`` is ``torch.nn.utils.get_total_norm`` of the gradients after step ``i``'s
    backward, before any clipping (in float32 for half-precision gradients). ``extra`` holds
    scenario-specific measurements (e.g. the largest activation of a layer at step 0).
    """

    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def first_nonfinite(self) -> int | None:
        """First step whose loss or gradient norm was NaN/Inf, or None."""
        for i, (loss, norm) in enumerate(zip(self.losses, self.norms)):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                return i
        return None

    def finite(self) -> bool:
        return self.first_nonfinite() is None

    def mean_loss(self, start: int, stop: int | None = None) -> float:
        window = self.losses[start:stop]
        return sum(window) / len(window)


class _Collect(gw.Sink):
    """Keeps the events a run emits (the zoo uses no console sink, so its output stays readable)."""

    def __init__(self) -> None:
        self.events: list[gw.Event] = []

    def write(self, record: Any) -> None:
        if isinstance(record, gw.Event):
            self.events.append(record)


class _Bare:
    """Takes the watcher's place when a scenario is validated: torch alone, same loop.

    It has the methods the loops call (``attach``, ``backward``, ``check``, ``close``). Where the
    loop asked for clipping it clips with torch: ``ClipNorm(v)`` as
    ``torch.nn.utils.clip_grad_norm_(params, v)``, ``ClipUnitwise`` as the per-row rule of
    timm's ``adaptive_clip_grad``, right before the optimizer step as the watcher would.
    """

    def __init__(self, model: nn.Module, clip: Any, exclude: tuple[nn.Parameter, ...]) -> None:
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._clip = clip
        self._exclude = {id(p) for p in exclude}
        self._handle: Any = None

    def attach(self, optimizer: torch.optim.Optimizer, *, scaler: Any = None) -> _Bare:
        del scaler  # GradScaler unscales before optimizer.step(): the hook sees true gradients
        self._handle = optimizer.register_step_pre_hook(lambda *_: self._clip_now())
        return self

    @contextlib.contextmanager
    def backward(self, loss: Any = None) -> Iterator[None]:
        del loss
        yield

    def check(self, loss: Any = None) -> None:
        del loss
        if self._handle is None:
            self._clip_now()

    def diagnose(self) -> list[gw.Finding]:
        return []

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _clip_now(self) -> None:
        clip = self._clip
        if clip is None:
            return
        grads = [p for p in self._params if p.grad is not None]
        if isinstance(clip, gw.ClipNorm):
            torch.nn.utils.clip_grad_norm_(grads, clip.max_norm)
        elif isinstance(clip, gw.ClipUnitwise):
            with torch.no_grad():
                for p in grads:
                    if id(p) in self._exclude:
                        continue
                    dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
                    w = torch.linalg.vector_norm(p, dim=dims, keepdim=True).clamp_min(clip.eps)
                    g = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=True)
                    limit = w * clip.clipping
                    scale = torch.where(g > limit, limit / g.clamp_min(1e-6), torch.ones_like(g))
                    p.grad.mul_(scale)
        else:
            raise TypeError(f"no torch equivalent for {type(clip).__name__} in the zoo")


class Run:
    """One execution of a scenario's loop: with gradwatch, or torch alone (validation).

    The loop asks it for the watcher (``run.watch(model, optimizer)``), for settings a fix may
    override (``run.lr(default)``), and records each step's loss and gradient norm
    (``run.record(loss, model)``), measured with torch.
    """

    def __init__(self, *, watched: bool, overrides: dict[str, Any] | None = None) -> None:
        self.watched = watched
        self.overrides = dict(overrides or {})
        self.trace = Trace()
        self.collector = _Collect()
        self.watcher: gw.GradWatch | None = None

    def lr(self, default: float) -> float:
        """The learning rate to use: the scenario's, or the one a fix suggests."""
        return float(self.overrides.get("lr", default))

    def watch(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scaler: Any = None,
        exclude: tuple[nn.Parameter, ...] = (),
        **settings: Any,
    ) -> Any:
        """``GradWatch(model, sinks=[collector], **settings).attach(optimizer)``, or the stand-in.

        ``settings`` are the loop's own watcher settings; watch keyword arguments given to
        :meth:`Scenario.run` (e.g. a fix's ``clip``) take precedence. Without ``optimizer`` the
        loop checks explicitly (``watch.check(loss=...)``).
        """
        kwargs = {**settings, **self.overrides.get("watch", {})}
        if not self.watched:
            bare = _Bare(model, kwargs.get("clip"), exclude)
            return bare.attach(optimizer, scaler=scaler) if optimizer is not None else bare
        watch = gw.GradWatch(model, sinks=[self.collector], **kwargs)
        if optimizer is not None:
            watch.attach(optimizer, scaler=scaler)
        self.watcher = watch
        return watch

    def step(
        self,
        watch: Any,
        opt: torch.optim.Optimizer,
        model: nn.Module,
        loss: torch.Tensor,
        *,
        measure: Callable[[nn.Module, dict[str, Any]], None] | None = None,
    ) -> None:
        """The usual step: zero_grad, backward inside ``watch.backward``, record, step.

        ``measure(model, trace.extra)`` runs after backward, before the step (a scenario's own
        measurement of the gradients).
        """
        opt.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        if measure is not None:
            measure(model, self.trace.extra)
        self.record(loss, model)
        opt.step()

    def record(self, loss: torch.Tensor | float, model: nn.Module, *, scale: float = 1.0) -> None:
        """Record this step's loss and total gradient norm (call after backward, before step).

        ``scale``: divide the norm by it (a GradScaler's scale, when gradients are still scaled).
        """
        grads = [p.grad.float() for p in model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) / scale if grads else 0.0
        self.trace.losses.append(float(loss.detach()) if torch.is_tensor(loss) else float(loss))
        self.trace.norms.append(norm)


@dataclass(frozen=True)
class Outcome:
    """What gradwatch said about a run: its findings (most causal first) and events in order."""

    findings: list[gw.Finding]
    events: list[gw.Event]
    trace: Trace
    seconds: float

    @property
    def diagnosis(self) -> gw.Finding | None:
        """The first ``"error"``/``"warning"`` finding, or None."""
        return next((f for f in self.findings if f.severity in ("error", "warning")), None)

    @property
    def alarms(self) -> list[gw.Event]:
        return [e for e in self.events if e.kind in ALARMS]


@dataclass(frozen=True)
class Scenario:
    """A small real training run with a known root cause (``expected_cause=None``: healthy).

    Attributes:
        name: Short identifier (``--only`` selects by it).
        expected_cause: The cause an expert names (one of ``gradwatch.CAUSES``), None if healthy.
        expected_places: Acceptable values of the diagnosis's ``params[0]``; None: not judged.
        arch: Architecture label (MLP, CNN, RNN, LSTM, transformer, ...).
        optimizer: Optimizer label (SGD, momentum, AdamW, none) with precision when not fp32.
        fast: Cheap enough to run as a test.
        what: One line: what the run does.
        loop: The training loop; takes a :class:`Run`.
        check: Validation over torch's trace; raises :class:`Invalid`, returns the failure's
            signature (numbers) for the table.
        fix: Settings of the diagnosis that :meth:`apply_fix` applies (``"lr"``, ``"max_norm"``,
            ``"skip"``), empty when the scenario has no fix check.
        recovered: Judges a fixed re-run's trace (default: finite and the loss fell).
        control: Overrides (e.g. ``{"lr": 3e-3}``) of a control run that must train, checked
            by :meth:`validate`: it shows the named cause is the cause.
    """

    name: str
    expected_cause: str | None
    expected_places: frozenset[str] | None
    arch: str
    optimizer: str
    fast: bool
    what: str
    loop: Callable[[Run], None]
    check: Callable[[Trace], str]
    fix: tuple[str, ...] = ()
    recovered: Callable[[Trace, Trace], bool] | None = None
    control: dict[str, Any] | None = None

    def trace(self, **overrides: Any) -> Trace:
        """Run the loop with torch alone and return what torch measured."""
        run = Run(watched=False, overrides=overrides)
        self.loop(run)
        return run.trace

    def validate(self) -> str:
        """Check with torch alone that the failure happened; returns its signature.

        Raises:
            Invalid: It did not (the message says what was measured).
        """
        signature = self.check(self.trace())
        if self.control is not None:
            ctrl = self.trace(**self.control)
            n = max(1, len(ctrl.losses) // 10)
            said = ", ".join(f"{k}={v:g}" for k, v in self.control.items())
            _require(
                _finite_and_falling(ctrl, ctrl),
                f"control run at {said} does not train: non-finite at {ctrl.first_nonfinite()}, "
                f"loss {ctrl.mean_loss(0, n):.3g} -> {ctrl.mean_loss(-n):.3g}",
            )
            signature += f"; at {said}: loss {ctrl.mean_loss(0, n):.3g}->{ctrl.mean_loss(-n):.3g}"
        return signature

    def run(self, **watch_kwargs: Any) -> Outcome:
        """Train with gradwatch attached (``watch_kwargs`` go to ``GradWatch``); diagnose."""
        start = time.perf_counter()
        return self._run({"watch": watch_kwargs}, start)

    def _run(self, overrides: dict[str, Any], start: float) -> Outcome:
        run = Run(watched=True, overrides=overrides)
        self.loop(run)
        watch = run.watcher
        if watch is None:
            raise RuntimeError(f"scenario {self.name} never asked for a watcher")
        findings = list(watch.diagnose())
        watch.close()
        return Outcome(findings, list(run.collector.events), run.trace, time.perf_counter() - start)

    def fix_result(self, finding: gw.Finding | None) -> str:
        """Apply the diagnosis's suggestions this scenario checks; ``"-"`` when it checks none.

        Returns ``"ok"``, ``"FAIL"``, ``"no suggestion"`` or ``"no diagnosis"`` (several
        settings: one word each, e.g. ``"max_norm ok, skip FAIL"``).
        """
        if not self.fix:
            return "-"
        if finding is None:
            return "no diagnosis"
        results = []
        for setting in self.fix:
            if setting == "skip":
                overrides: dict[str, Any] = {"watch": {"on_spike": "skip"}}
            elif setting not in finding.suggested:
                results.append((setting, "no suggestion"))
                continue
            elif setting == "lr":
                overrides = {"lr": finding.suggested["lr"]}
            else:
                overrides = {"watch": {"clip": gw.ClipNorm(finding.suggested["max_norm"])}}
            fixed = self._run(overrides, time.perf_counter()).trace
            judge_fix = self.recovered or _finite_and_falling
            results.append((setting, "ok" if judge_fix(fixed, self.trace()) else "FAIL"))
        if len(results) == 1:
            return results[0][1]
        return ", ".join(f"{s} {r}" for s, r in results)

    def apply_fix(self, finding: gw.Finding | None) -> bool:
        """Re-run with the suggested setting(s); True when every re-run recovers."""
        return all(part.endswith("ok") for part in self.fix_result(finding).split(", "))


def _finite_and_falling(fixed: Trace, broken: Trace) -> bool:
    """The fixed run is finite and its loss fell (last tenth below the first tenth)."""
    del broken
    n = max(1, len(fixed.losses) // 10)
    return fixed.finite() and fixed.mean_loss(-n) < fixed.mean_loss(0, n)


SCENARIOS: list[Scenario] = []


def scenario(
    name: str,
    cause: str | None,
    places: set[str] | None,
    arch: str,
    optimizer: str,
    *,
    fast: bool,
    what: str,
    check: Callable[[Trace], str],
    fix: tuple[str, ...] = (),
    recovered: Callable[[Trace, Trace], bool] | None = None,
    control: dict[str, Any] | None = None,
) -> Callable[[Callable[[Run], None]], Callable[[Run], None]]:
    """Register the decorated loop as a scenario of the zoo."""

    def register(loop: Callable[[Run], None]) -> Callable[[Run], None]:
        if cause is not None and cause not in gw.CAUSES:
            raise ValueError(f"scenario {name}: unknown cause {cause!r}")
        SCENARIOS.append(
            Scenario(
                name,
                cause,
                frozenset(places) if places is not None else None,
                arch,
                optimizer,
                fast,
                what,
                loop,
                check,
                fix,
                recovered,
                control,
            )
        )
        return loop

    return register


@dataclass(frozen=True)
class Verdict:
    """The judgement of one outcome against its scenario."""

    right: bool
    cause: str | None  # the diagnosis's cause ("info:<cause>" when only info findings)
    severity: str | None
    place: str | None
    live: str  # the first alarm event's cause vs the expected one
    why: str  # what was wrong, empty when right


def judge(sc: Scenario, out: Outcome) -> Verdict:
    """Right or wrong, per the zoo's rule (see the module docstring)."""
    diag = out.diagnosis
    first_alarm = out.alarms[0] if out.alarms else None
    infos = [f for f in out.findings if f.severity == "info"]
    if diag is not None:
        cause, severity = diag.cause, diag.severity
        place = diag.params[0] if diag.params else None
    elif infos:
        cause, severity = infos[0].cause, "info"
        place = infos[0].params[0] if infos[0].params else None
    else:
        cause = severity = place = None

    if first_alarm is None:
        live = "-" if sc.expected_cause in (None, "redundant_bias") else "no alert"
    else:
        got = first_alarm.cause or "none"
        tag = f"{first_alarm.kind}@{first_alarm.step} cause={got}"
        if sc.expected_cause in (None, "redundant_bias"):
            live = f"FALSE {tag}"
        else:
            live = f"{'ok' if got == sc.expected_cause else 'WRONG'} {tag}"

    why = ""
    if sc.expected_cause is None or sc.expected_cause == "redundant_bias":
        if diag is not None:
            why = f"{diag.severity} finding {diag.kind}/{diag.cause} on a healthy run"
        elif out.alarms:
            kinds = sorted({e.kind for e in out.alarms})
            why = f"{len(out.alarms)} alarm event(s) on a healthy run: {', '.join(kinds)}"
        elif sc.expected_cause == "redundant_bias":
            hit = [f for f in infos if f.cause == "redundant_bias"]
            if not hit:
                why = "no info finding with cause redundant_bias"
            elif sc.expected_places is not None and not (
                hit[0].params and hit[0].params[0] in sc.expected_places
            ):
                why = f"redundant bias named {hit[0].params[:1]}, expected one of the biases"
            else:
                cause, severity = "redundant_bias", "info"
                place = hit[0].params[0] if hit[0].params else None
    elif diag is None:
        why = "no error/warning finding"
    elif diag.cause != sc.expected_cause:
        why = f"cause {diag.cause}, expected {sc.expected_cause}"
    elif sc.expected_places is not None and place not in sc.expected_places:
        why = f"place {place!r}, expected one of {sorted(sc.expected_places)}"
    return Verdict(not why, cause, severity, place, live, why)


# ------------------------------------------------------------------------------ shared parts


def _gen(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1000)


def _mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU, *, bias: bool = True) -> nn.Sequential:
    """Linear layers at even indices, ``act`` between them: names ``0``, ``2``, ... as torch's."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _bars(
    n: int, g: torch.Generator, classes: int = 4, size: int = 12, noise: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images (as examples/cnn.py): each class is a horizontal bar at its own place."""
    labels = torch.randint(0, classes, (n,), generator=g)
    x = noise * torch.randn(n, 1, size, size, generator=g)
    rows = torch.arange(size)
    start = (2 + (size - 4) * labels // classes).view(n, 1)
    mask = ((rows.view(1, size) >= start) & (rows.view(1, size) < start + 2)).float()
    return x + mask.view(n, 1, size, 1), labels


def _pattern_tokens(
    n: int, length: int, vocab: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``t[i+1] = (t[i] + stride) mod vocab``, random start and stride: learnable."""
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 3, (n, 1), generator=g)
    seq = (start + stride * torch.arange(length + 1).view(1, -1)) % vocab
    return seq[:, :-1], seq[:, 1:]


class TinyGPT(nn.Module):
    """Pre-LN decoder-only transformer: token + position embeddings, blocks, final LN, head.

    ``final_ln=False`` leaves the residual stream unnormalised before the head (as some
    hand-written GPTs do): the logits then follow the weights' growth.
    """

    def __init__(
        self, vocab: int, d: int, heads: int, layers: int, length: int, *, final_ln: bool = True
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(length, d))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.ln = nn.LayerNorm(d) if final_ln else nn.Identity()
        self.head = nn.Linear(d, vocab)
        self.register_buffer(
            "mask", torch.triu(torch.full((length, length), float("-inf")), 1), persistent=False
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.tok(tokens) + self.pos[:t]
        for block in self.blocks:
            h = block(h, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.ln(h))


def _blobs(
    centers: torch.Tensor, n: int, g: torch.Generator, noise: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points around random ``centers`` (one class each) and their classes."""
    y = torch.randint(0, len(centers), (n,), generator=g)
    return centers[y] + noise * torch.randn(n, centers.shape[1], generator=g), y


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _healthy(min_drop: float) -> Callable[[Trace], str]:
    """Validation of a healthy run: finite throughout, loss fell by at least ``min_drop``×."""

    def check(tr: Trace) -> str:
        _require(tr.finite(), f"non-finite at step {tr.first_nonfinite()}")
        n = max(1, len(tr.losses) // 10)
        first, last = tr.mean_loss(0, n), tr.mean_loss(-n)
        _require(last < first / min_drop, f"loss {first:.3g} -> {last:.3g}, not /{min_drop}")
        return f"finite, loss {first:.3g}->{last:.3g}, max norm {max(tr.norms):.3g}"

    return check


# ------------------------------------------------------------------------------ initialization


def _on_grad(out: torch.Tensor, into: list[torch.Tensor]) -> None:
    """Forward hook body: keep the largest |gradient| reaching ``out`` (backward order)."""
    out.register_hook(lambda g: into.append(g.abs().max()))


def _check_chain(tr: Trace) -> str:
    _require(tr.norms[0] > 1e14, f"step-0 norm {tr.norms[0]:.3g}, expected > 1e14")
    ratio = tr.extra["signal_ratio"]
    _require(abs(ratio - 2.34) < 0.01, f"signal grows x{ratio:.3g} per layer, expected x2.34")
    return f"norm {tr.norms[0]:.2g} at step 0, backprop signal x{ratio:.3g}/layer"


# The place: every weight shares the cause, but the chain is named by its first layer, where the
# signal flowing back has been multiplied by 2.34 nineteen times (an expert says "the chain,
# starting at the first layer: its initialisation"); the output layer is where it is smallest.
@scenario(
    "init_chain_2.34",
    "initialization",
    {"0", "0.weight"},
    "MLP 20x1",
    "SGD",
    fast=True,
    what="the textbook chain: 20 Linear(1,1)+ReLU, every weight 2.34, no bias, input 1",
    check=_check_chain,
)
def _init_chain(run: Run) -> None:
    _gen(0)
    model = _mlp([1] * 21, bias=False)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.constant_(m.weight, 2.34)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    watch = run.watch(model, opt)
    x, y = torch.ones(4, 1), torch.ones(4, 1)
    for step in range(12):
        outs: list[torch.Tensor] = []
        hooks = [
            m.register_forward_hook(lambda _m, _i, o, outs=outs: _on_grad(o, outs))
            for m in model
            if isinstance(m, nn.Linear) and step == 0
        ]
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        for h in hooks:
            h.remove()
        if step == 0:  # backward order: outs[-1] reaches the first layer's output
            run.trace.extra["signal_ratio"] = float(outs[-1] / outs[-2])
        run.record(loss, model)
        opt.step()
    watch.close()


def _check_deep_mlp(tr: Trace) -> str:
    _require(tr.norms[0] > 1e5, f"step-0 norm {tr.norms[0]:.3g}, expected > 1e5")
    gain = tr.extra["gain"]
    _require(gain > 1.3, f"activations grow x{gain:.3g} per layer, expected > 1.3")
    bad = tr.first_nonfinite()
    return f"norm {tr.norms[0]:.2g} at step 0, forward x{gain:.3g}/layer, non-finite at {bad}"


@scenario(
    "init_mlp12_std2.2",
    "initialization",
    {"0", "0.weight"},
    "MLP 12x128",
    "momentum",
    fast=True,
    what="12-layer ReLU MLP, weights N(0, (2.2/sqrt(fan_in))^2) (1.6x Kaiming), momentum SGD",
    check=_check_deep_mlp,
)
def _init_mlp12(run: Run) -> None:
    g = _gen(12)
    model = _mlp([32] + [128] * 11 + [1])
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=2.2 / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    watch = run.watch(model, opt)
    x, y = torch.randn(64, 32, generator=g), torch.randn(64, 1, generator=g)
    with torch.no_grad():
        h, sizes = x, []
        for m in model:
            h = m(h)
            if isinstance(m, nn.ReLU):
                sizes.append(h.pow(2).mean().sqrt())
        run.trace.extra["gain"] = float((sizes[-1] / sizes[0]) ** (1 / (len(sizes) - 1)))
    for _ in range(20):
        loss = F.mse_loss(model(x), y)
        run.step(watch, opt, model, loss)
    watch.close()


# ------------------------------------------------------------------------------ learning rate


def _check_gpt_lr(tr: Trace) -> str:
    first, worst = tr.losses[0], max(v for v in tr.losses if math.isfinite(v))
    _require(first < 2.5, f"initial loss {first:.3g}, expected about ln(5)")
    _require(worst > 100 * first, f"loss {first:.3g} -> at most {worst:.3g}, expected > 100x")
    peak = max(v for v in tr.norms if math.isfinite(v))
    _require(peak > 300 * tr.norms[0], f"norm {tr.norms[0]:.3g} -> {peak:.3g}, expected > 300x")
    return f"loss {first:.3g} -> {worst:.3g}, norm {tr.norms[0]:.2g} -> {peak:.2g}"


@scenario(
    "lr_gpt_adamw_0.3",
    "learning_rate",
    None,
    "transformer",
    "AdamW",
    fast=True,
    what="pre-LN GPT (2 blocks, d=32, vocab 5, no final LN), AdamW lr 0.3, 60 steps",
    check=_check_gpt_lr,
    fix=("lr",),
    control={"lr": 3e-3},
)
def _lr_gpt(run: Run) -> None:
    g = _gen(3)
    model = TinyGPT(vocab=5, d=32, heads=4, layers=2, length=16, final_ln=False)
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr(0.3), weight_decay=0.01)
    watch = run.watch(model, opt)
    for _ in range(60):
        x, y = _pattern_tokens(16, 16, 5, g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        run.step(watch, opt, model, loss)
    watch.close()


def _check_sgd_high(tr: Trace) -> str:
    bad = tr.first_nonfinite()
    _require(bad is not None and bad <= 12, f"first non-finite step {bad}, expected <= 12")
    growth = [b / a for a, b in zip(tr.norms[1:bad], tr.norms[2:bad]) if a > 0]
    median = sorted(growth)[len(growth) // 2] if growth else float("nan")
    _require(median > 2, f"median norm growth x{median:.3g} per step, expected > 2")
    return (
        f"norm {tr.norms[0]:.2g} -> {tr.norms[bad - 1]:.2g}, x{median:.2g}/step, NaN/Inf at {bad}"
    )


@scenario(
    "lr_mlp_sgd_high",
    "learning_rate",
    None,
    "MLP 4x64",
    "SGD",
    fast=True,
    what="4-layer ReLU MLP regression, plain SGD at lr 0.08 (trains at 0.02)",
    check=_check_sgd_high,
    fix=("lr",),
    control={"lr": 0.02},
)
def _lr_mlp_sgd(run: Run) -> None:
    g = _gen(21)
    model = _mlp([10, 64, 64, 64, 1])
    opt = torch.optim.SGD(model.parameters(), lr=run.lr(0.08))
    watch = run.watch(model, opt)
    w = torch.randn(10, 1, generator=g)
    for _ in range(40):
        x = 2.0 * torch.randn(32, 10, generator=g)
        y = x @ w + 0.1 * torch.randn(32, 1, generator=g)
        loss = F.mse_loss(model(x), y)
        run.step(watch, opt, model, loss)
    watch.close()


def _small_cnn(classes: int = 4, width: int = 16, bias: bool = True) -> nn.Sequential:
    """conv-ReLU-maxpool-conv-ReLU-Linear over 12x12 images (keeps where the bar is)."""
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, width, 3, padding=1, bias=bias))
    model.add_module("act1", nn.ReLU())
    model.add_module("pool", nn.MaxPool2d(2))
    model.add_module("conv2", nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=bias))
    model.add_module("act2", nn.ReLU())
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(2 * width * 9, classes))
    return model


def _cnn_schedule(run: Run, peak: float, seed: int, steps: int = 80, noise: float = 0.8) -> None:
    g = _gen(seed)
    model = _small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=run.lr(peak), momentum=0.9)
    watch = run.watch(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(20, steps))
    for _ in range(steps):
        x, y = _bars(32, g, noise=noise)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()  # attach only: gradwatch checks in optimizer.step(), loss unknown
        run.record(loss, model)
        opt.step()
        sched.step()
    watch.close()


def _check_cnn_peak(tr: Trace) -> str:
    rise = max(tr.norms[10:30]) / tr.norms[0]
    _require(rise > 30, f"norm x{rise:.3g} from step 0 to steps 10-30, expected > 30")
    late = tr.mean_loss(-20)
    _require(late > 0.9 * math.log(4), f"late loss {late:.3g}, expected stuck at chance (1.39)")
    peak = max(tr.norms[10:30])
    return f"norm {tr.norms[0]:.2g} -> {peak:.3g} in steps 10-30, late loss {late:.3g} (chance)"


@scenario(
    "lr_cnn_warmup_peak_100x",
    "learning_rate",
    None,
    "CNN",
    "momentum",
    fast=True,
    what="2-conv CNN, 4 classes, warm-up 20 + cosine, peak lr 1.0 (100x the 0.01 that trains)",
    check=_check_cnn_peak,
    control={"lr": 0.01},
)
def _lr_cnn_peak(run: Run) -> None:
    _cnn_schedule(run, peak=1.0, seed=5)


def _check_lr_rise(tr: Trace) -> str:
    before = max(tr.norms[:40])
    after = [v for v in tr.norms[40:] if math.isfinite(v)]
    bad = tr.first_nonfinite()
    _require(
        bad is not None or max(after) > 100 * before,
        f"norm {before:.3g} before the rise, {max(after):.3g} after, never non-finite",
    )
    _require(tr.finite() or bad > 40, f"non-finite at {bad}, before the rise at 40")
    return f"norm <= {before:.2g} until step 40, then up to {max(after):.2g}, non-finite at {bad}"


@scenario(
    "lr_resnet_rise_x30",
    "learning_rate",
    None,
    "residual MLP",
    "momentum",
    fast=True,
    what="residual MLP trains at lr 0.01, a schedule raises it x30 at step 40 and it diverges",
    check=_check_lr_rise,
)
def _lr_rise(run: Run) -> None:
    g = _gen(33)
    model = _ResMLP(12, 48, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    watch = run.watch(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 40 else 30.0)
    w = torch.randn(12, 1, generator=g)
    for _ in range(70):
        x = torch.randn(32, 12, generator=g)
        y = torch.sin(x @ w)
        loss = F.mse_loss(model(x), y)
        run.step(watch, opt, model, loss)
        sched.step()
    watch.close()


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.relu(self.fc1(h)))


class _ResMLP(nn.Module):
    def __init__(self, inputs: int, width: int, blocks: int, outputs: int = 1) -> None:
        super().__init__()
        self.stem = nn.Linear(inputs, width)
        self.blocks = nn.Sequential(*(_Block(width) for _ in range(blocks)))
        self.head = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


# ------------------------------------------------------------------------------ data


def _check_outlier(tr: Trace) -> str:
    base = sorted(tr.norms[10:31])[10]
    jump = tr.norms[31] / base
    _require(jump > 100, f"norm x{jump:.3g} at step 31 over the median before, expected > 100")
    _require(all(math.isfinite(v) for v in tr.norms[:31]), "non-finite before the outlier")
    bad = tr.first_nonfinite()
    _require(bad is not None and 32 <= bad <= 36, f"first non-finite step {bad}, expected 32-36")
    return f"norm {base:.2g} -> {tr.norms[31]:.2g} (x{jump:.2g}) at step 31, non-finite at {bad}"


def _outlier_recovered(fixed: Trace, broken: Trace) -> bool:
    """Finite (the outlier batch itself may be large) and the loss fell below its start."""
    del broken
    return fixed.finite() and fixed.mean_loss(-8) < fixed.mean_loss(0, 8)


@scenario(
    "data_outlier_x1000",
    "data",
    None,
    "MLP 3x32",
    "momentum",
    fast=True,
    what="regression; one record of batch 31 is in the wrong unit (x1000), then divergence",
    check=_check_outlier,
    fix=("max_norm", "skip"),
    recovered=_outlier_recovered,
)
def _data_outlier(run: Run) -> None:
    g = _gen(31)
    model = _mlp([8, 32, 32, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    watch = run.watch(model, opt)
    w = torch.randn(8, 1, generator=g)
    x_all = torch.randn(60 * 16, 8, generator=g)
    y_all = x_all @ w + 0.05 * torch.randn(60 * 16, 1, generator=g)
    x_all[31 * 16 + 5] *= 1000.0  # millimetres where metres were meant
    for step in range(60):
        x, y = x_all[step * 16 : (step + 1) * 16], y_all[step * 16 : (step + 1) * 16]
        loss = F.mse_loss(model(x), y)
        run.step(watch, opt, model, loss)
    watch.close()


def _check_nan_input(tr: Trace) -> str:
    bad = tr.first_nonfinite()
    _require(bad == 17, f"first non-finite step {bad}, expected 17 (the corrupt batch)")
    _require(tr.extra.get("nan_input_step") == 17, "the input batch of step 17 holds no NaN")
    return f"finite until 16, input NaN at 17 -> loss {tr.losses[17]} and NaN after"


@scenario(
    "data_nan_input_cnn",
    "data",
    {"input"},
    "CNN",
    "AdamW",
    fast=True,
    what="CNN classifier; one image of batch 17 holds a NaN pixel (corrupt record)",
    check=_check_nan_input,
)
def _data_nan_input(run: Run) -> None:
    g = _gen(17)
    model = _small_cnn(width=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    watch = run.watch(model, opt, forensics=True)
    for step in range(30):
        x, y = _bars(24, g)
        if step == 17:
            x[3, 0, 4, 7] = float("nan")
        if not torch.isfinite(x).all():
            run.trace.extra.setdefault("nan_input_step", step)
        loss = F.cross_entropy(model(x), y)
        run.step(watch, opt, model, loss)
    watch.close()


def _check_nan_batch_scaled(tr: Trace) -> str:
    bad = tr.first_nonfinite()
    _require(bad == 25, f"first non-finite step {bad}, expected 25 (the corrupt batch)")
    _require(tr.extra.get("nan_input_step") == 25, "the input batch of step 25 holds no NaN")
    later = Trace(tr.losses[26:], tr.norms[26:])
    _require(later.finite(), f"non-finite again at {26 + (later.first_nonfinite() or 0)}")
    return f"input NaN at 25 -> loss {tr.losses[25]}; GradScaler skipped it, finite after"


@scenario(
    "data_nan_batch_bf16_scaler",
    "data",
    None,
    "MLP autocast bf16",
    "AdamW+scaler",
    fast=True,
    what="bf16 autocast with a GradScaler; batch 25 holds a NaN: the scaler skips it, a bad batch "
    "(not the loss scale, not the learning rate)",
    check=_check_nan_batch_scaled,
)
def _data_nan_batch_scaled(run: Run) -> None:
    g = _gen(26)
    model = _mlp([8, 32, 32, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    watch = run.watch(model, opt, scaler=scaler)
    centers = torch.randn(3, 8, generator=g)
    for step in range(50):
        x, y = _blobs(centers, 16, g, noise=0.5)
        if step == 25:
            x[2, 3] = float("nan")
            run.trace.extra["nan_input_step"] = step
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        with watch.backward(loss=loss):
            scaler.scale(loss).backward()
        run.record(loss, model, scale=scaler.get_scale())
        scaler.step(opt)
        scaler.update()
    watch.close()


def _check_inf_target(tr: Trace) -> str:
    bad = tr.first_nonfinite()
    _require(bad == 45, f"first non-finite step {bad}, expected 45 (the corrupt target)")
    return f"finite until 44, target Inf at 45 -> loss {tr.losses[45]}"


@scenario(
    "data_inf_target_lstm",
    "data",
    None,
    "LSTM",
    "AdamW",
    fast=True,
    what="LSTM sequence regression; one target of batch 45 is Inf (a sensor's overflow value)",
    check=_check_inf_target,
)
def _data_inf_target(run: Run) -> None:
    g = _gen(45)
    model = _SeqRegressor(3, 24)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    watch = run.watch(model)  # explicit check, as a custom loop does
    for step in range(60):
        x = torch.randn(16, 20, 3, generator=g)
        y = x[:, :, :1].cumsum(1)[:, -1] / 4
        if step == 45:
            y[9] = float("inf")
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        run.record(loss, model)
        watch.check(loss=loss)
        opt.step()
    watch.close()


class _SeqRegressor(nn.Module):
    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


# ------------------------------------------------------------------------------ recurrence


class _RNNRegressor(nn.Module):
    def __init__(self, inputs: int, hidden: int, nonlinearity: str) -> None:
        super().__init__()
        self.rnn = nn.RNN(inputs, hidden, nonlinearity=nonlinearity, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def _check_relu_rnn(tr: Trace) -> str:
    _require(tr.norms[0] > 1e8, f"step-0 norm {tr.norms[0]:.3g}, expected > 1e8")
    bad = tr.first_nonfinite()
    _require(bad is not None, "never non-finite")
    return f"norm {tr.norms[0]:.2g} at step 0 (1.25^50 = {1.25**50:.2g}), non-finite at {bad}"


@scenario(
    "rnn_relu_1.25I_50steps",
    "recurrence",
    {"rnn.weight_hh_l0", "rnn"},
    "RNN relu",
    "SGD",
    fast=True,
    what="vanilla ReLU RNN, recurrent weight 1.25*I, 50 time steps, regression on the last state",
    check=_check_relu_rnn,
    fix=("max_norm",),
)
def _rnn_relu(run: Run) -> None:
    g = _gen(50)
    model = _RNNRegressor(4, 16, "relu")
    with torch.no_grad():
        model.rnn.weight_hh_l0.copy_(1.25 * torch.eye(16))
    opt = torch.optim.SGD(model.parameters(), lr=run.lr(1e-3))
    watch = run.watch(model, opt)
    for _ in range(30):
        x = torch.rand(16, 50, 4, generator=g)
        y = x.mean(dim=(1, 2)).unsqueeze(1)
        loss = F.mse_loss(model(x), y)
        run.step(watch, opt, model, loss)
    watch.close()


class _ElmanCell(nn.Module):
    """h' = tanh(W_x x + W_h h), unrolled by hand (as a custom recurrent model is)."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.inp = nn.Linear(inputs, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.rec.in_features)
        states = []
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
            states.append(h)
        return torch.stack(states, 1)


class _Seq2Seq(nn.Module):
    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.cell = _ElmanCell(inputs, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cell(x))


def _check_tanh_rnn(tr: Trace) -> str:
    ratio = tr.extra["time_ratio"]
    _require(ratio > 1e3, f"gradient at t=0 / at the end x{ratio:.3g}, expected > 1e3")
    peak = max(v for v in tr.norms if math.isfinite(v))
    return (
        f"signal to t=0 x{ratio:.2g} the last step's, norm {tr.norms[0]:.2g} -> {peak:.2g}, "
        f"loss {tr.losses[0]:.3g} -> {tr.losses[-1]:.3g}"
    )


@scenario(
    "rnn_tanh_chaotic_g3",
    "recurrence",
    {"cell.rec.weight", "cell.rec", "cell"},
    "RNN tanh (hand-rolled)",
    "momentum",
    fast=True,
    what="hand-unrolled tanh RNN, recurrent weights N(0, 9/h) (chaotic), 120 steps, loss per step",
    check=_check_tanh_rnn,
)
def _rnn_tanh(run: Run) -> None:
    g = _gen(120)
    model = _Seq2Seq(2, 32)
    nn.init.normal_(model.cell.rec.weight, std=3.0 / math.sqrt(32))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    watch = run.watch(model, opt)
    for step in range(25):
        x = torch.randn(8, 120, 2, generator=g)
        y = 0.5 * x[:, :, :1].cumsum(1).clamp(-1, 1)
        x.requires_grad_(step == 0)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        if step == 0:  # how much the signal grows back through time
            assert x.grad is not None
            per_t = x.grad.abs().sum(dim=(0, 2))
            run.trace.extra["time_ratio"] = float(per_t[0] / per_t[-1].clamp_min(1e-30))
        run.record(loss, model)
        opt.step()
    watch.close()


# ------------------------------------------------------------------------------ forward numerics


def _check_log_relu_loss(tr: Trace) -> str:
    _require(math.isinf(tr.losses[0]), f"step-0 loss {tr.losses[0]}, expected inf")
    _require(all(math.isfinite(v) for v in tr.norms), "a gradient went non-finite")
    infs = sum(math.isinf(v) for v in tr.losses)
    return f"loss inf at {infs}/{len(tr.losses)} steps from step 0, every gradient finite"


@scenario(
    "loss_log_relu",
    "forward_numerics",
    {"loss"},
    "MLP 2x32",
    "SGD",
    fast=True,
    what="loss -(y * log(relu(out))).mean() with soft targets y > 0: log(0) = -inf in the loss",
    check=_check_log_relu_loss,
)
def _loss_log_relu(run: Run) -> None:
    g = _gen(7)
    model = _mlp([6, 32, 5])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = run.watch(model, opt)
    for _ in range(20):
        x = torch.randn(32, 6, generator=g)
        y = torch.softmax(2 * torch.randn(32, 5, generator=g), dim=1)
        loss = -(y * torch.log(torch.relu(model(x)))).mean()
        run.step(watch, opt, model, loss)
    watch.close()


class LogFeatures(nn.Module):
    """log of (non-negative) features: -inf where a feature is exactly 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class Standardize(nn.Module):
    """Hand-written batch standardisation of each feature, without an epsilon.

    0/0 when a feature is the same over the whole batch (a ReLU unit off for every sample).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0, keepdim=True)) / x.std(0, keepdim=True)


def _watch_module(run: Run, module: nn.Module, key: str) -> Any:
    """Forward hook recording the first step where ``module``'s output (not input) went bad."""
    steps = {"now": 0}

    def hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if key not in run.trace.extra and not torch.isfinite(out).all():
            run.trace.extra[key] = (steps["now"], bool(torch.isfinite(inputs[0]).all()))

    handle = module.register_forward_hook(hook)
    return steps, handle


def _check_module_nan(key: str) -> Callable[[Trace], str]:
    def check(tr: Trace) -> str:
        seen = tr.extra.get(key)
        _require(seen is not None, f"the {key} module's output never went non-finite")
        step, input_finite = seen
        _require(input_finite, f"the {key} module's input was already non-finite at {step}")
        bad = tr.first_nonfinite()
        _require(bad == step, f"first non-finite loss/gradient at {bad}, module's output at {step}")
        return f"{key} output non-finite at step {step} from a finite input; loss {tr.losses[step]}"

    return check


@scenario(
    "module_log_of_zero",
    "forward_numerics",
    {"logf"},
    "MLP",
    "AdamW",
    fast=True,
    what="parameter-free module log(relu features): log(0) = -inf, then NaN in the next Linear",
    check=_check_module_nan("logf"),
)
def _module_log(run: Run) -> None:
    g = _gen(8)
    model = nn.Sequential()
    model.add_module("embed", nn.Linear(5, 24))
    model.add_module("act", nn.ReLU())
    model.add_module("logf", LogFeatures())
    model.add_module("mix", nn.Linear(24, 24))
    model.add_module("act2", nn.Tanh())
    model.add_module("head", nn.Linear(24, 3))
    steps, handle = _watch_module(run, model.logf, "logf")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = run.watch(model, opt, forensics=True)
    for step in range(15):
        steps["now"] = step
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        run.step(watch, opt, model, loss)
    handle.remove()
    watch.close()


@scenario(
    "module_standardize_no_eps",
    "forward_numerics",
    {"features.norm"},
    "CNN",
    "momentum",
    fast=True,
    what="CNN, 8 ReLU features standardised over the batch without epsilon: 0/0 for a unit off",
    check=_check_module_nan("norm"),
)
def _module_standardize(run: Run) -> None:
    g = _gen(9)
    features = nn.Sequential()
    features.add_module("conv", nn.Conv2d(1, 8, 3, padding=1))
    features.add_module("act", nn.ReLU())
    features.add_module("pool", nn.AdaptiveAvgPool2d(2))
    features.add_module("flat", nn.Flatten())
    features.add_module("bottleneck", nn.Linear(32, 8))
    features.add_module("act2", nn.ReLU())
    features.add_module("norm", Standardize())
    model = nn.Sequential()
    model.add_module("features", features)
    model.add_module("head", nn.Linear(8, 4))
    steps, handle = _watch_module(run, features.norm, "norm")
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    watch = run.watch(model, opt, forensics=True)
    for step in range(40):
        steps["now"] = step
        x, y = _bars(16, g)
        loss = F.cross_entropy(model(x), y)
        run.step(watch, opt, model, loss)
    handle.remove()
    watch.close()


# ------------------------------------------------------------------------------ precision


def _check_fp16_head(tr: Trace) -> str:
    peak = tr.extra["proj_max"]
    _require(1e4 <= peak < 65504, f"proj outputs reach {peak:.3g}, expected 1e4-65504 (finite)")
    _require(math.isfinite(tr.losses[0]), f"step-0 loss {tr.losses[0]}, expected finite")
    _require(tr.extra["head_grad_inf"], "head.weight's step-0 gradient is finite")
    _require(tr.extra["head_grad_fp32"] > 65504, "in float32 head.weight's gradient fits fp16")
    return (
        f"proj max {peak:.3g}, head.weight grad Inf in fp16 (max {tr.extra['head_grad_fp32']:.3g}"
        " in fp32), loss finite at step 0"
    )


class _Fp16Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 48)
        self.act = nn.ReLU()
        self.head = nn.Linear(48, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.proj(x)))


# The place: the overflow happens in head.weight's gradient (an expert names it, or the layer
# `head`); `proj`, whose outputs are the large factor, is an acceptable answer too.
@scenario(
    "fp16_head_grad_overflow",
    "precision",
    {"head.weight", "head", "proj", "proj.weight"},
    "MLP fp16",
    "SGD fp16",
    fast=True,
    what="float16 model, proj outputs ~1.5e4, so head.weight's gradient exceeds 65504 (Inf)",
    check=_check_fp16_head,
)
def _fp16_head(run: Run) -> None:
    g = _gen(16)
    model = _Fp16Net()
    with torch.no_grad():
        model.proj.weight.mul_(7500.0)  # un-normalised features times a default init
        model.head.weight.mul_(0.2)
    ref = _Fp16Net()
    ref.load_state_dict(model.state_dict())
    model.half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    watch = run.watch(model, opt)
    for step in range(8):
        x = torch.randn(64, 12, generator=g)
        y = torch.randn(64, 6, generator=g)
        if step == 0:  # the same step in float32, for the validation
            with torch.no_grad():
                run.trace.extra["proj_max"] = float(model.proj(x.half()).float().abs().max())
            F.mse_loss(ref(x), y).backward()
            run.trace.extra["head_grad_fp32"] = float(ref.head.weight.grad.abs().max())
        loss = F.mse_loss(model(x.half()).float(), y)  # loss in float32, as usual
        opt.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        if step == 0:
            assert model.head.weight.grad is not None
            run.trace.extra["head_grad_inf"] = bool(model.head.weight.grad.isinf().any())
        run.record(loss, model)
        opt.step()
    watch.close()


def _check_scaler_skips(tr: Trace) -> str:
    skipped = tr.extra["skipped"]
    steps = len(tr.losses)
    _require(skipped == steps, f"the scaler skipped {skipped}/{steps} steps, expected all")
    _require(tr.extra["overflow_step"] == 0, "the encoder's fp16 output did not overflow at 0")
    return (
        f"encoder output > 65504 in fp16 (fp32 max {tr.extra['fp32_max']:.3g}); GradScaler "
        f"skipped {skipped}/{steps} steps, scale 65536 -> {tr.extra['scale']:.3g}"
    )


class _AmpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(20, 64)
        self.act = nn.GELU()
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.encoder(x)))


@scenario(
    "amp_fp16_scaler_always_skips",
    "precision",
    {"encoder", "encoder.weight", "encoder.bias"},
    "MLP autocast fp16",
    "AdamW+scaler",
    fast=True,
    what="autocast fp16 + GradScaler; raw uint16 inputs make the encoder's outputs overflow 65504",
    check=_check_scaler_skips,
)
def _amp_skips(run: Run) -> None:
    g = _gen(65)
    model = _AmpNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    watch = run.watch(model, opt, scaler=scaler, forensics=True)
    skipped = 0
    for step in range(20):
        x = 65535.0 * torch.rand(32, 20, generator=g)  # raw uint16 readings, never normalised
        y = torch.randint(0, 3, (32,), generator=g)
        with torch.autocast("cpu", dtype=torch.float16):
            h = model.encoder(x)
            logits = model.head(model.act(h))
        if step == 0:
            run.trace.extra["overflow_step"] = 0 if not torch.isfinite(h).all() else None
            with torch.no_grad():
                run.trace.extra["fp32_max"] = float(model.encoder(x).abs().max())
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad()
        with watch.backward(loss=loss):
            scaler.scale(loss).backward()
        run.record(loss, model, scale=scaler.get_scale())
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < before
    run.trace.extra["skipped"] = skipped
    run.trace.extra["scale"] = scaler.get_scale()
    watch.close()


# ------------------------------------------------------------------------------ dead units


def _check_dead_bias(tr: Trace) -> str:
    _require(tr.extra["pre_max"] < 0, f"layer 4's pre-activation reaches {tr.extra['pre_max']}")
    zero = tr.extra["zero_grads"]
    _require(
        {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias", "6.weight"} <= zero,
        f"parameters with exactly zero gradient at every step: {sorted(zero)}",
    )
    return (
        f"layer 4 pre-activation max {tr.extra['pre_max']:.3g}; 0.*, 2.*, 4.*, 6.weight grads == 0"
    )


def _zero_grads(model: nn.Module, into: dict[str, Any]) -> None:
    """Keep the names of parameters whose gradient was exactly zero at every step so far."""
    now = {n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()}
    into["zero_grads"] = now if "zero_grads" not in into else into["zero_grads"] & now


# The place: layer 4, whose units never activate. The layers before it get zero gradient too,
# but they are its victims.
@scenario(
    "dead_relu_bias_minus20",
    "dead_units",
    {"4", "4.bias", "4.weight", "5"},
    "MLP",
    "AdamW",
    fast=True,
    what="MLP whose Linear 4 has bias -20: its ReLU never fires, nothing before it learns",
    check=_check_dead_bias,
)
def _dead_bias(run: Run) -> None:
    g = _gen(20)
    model = _mlp([10, 32, 32, 32, 1])
    with torch.no_grad():
        model[4].bias.fill_(-20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    watch = run.watch(model, opt)
    for step in range(40):
        x = torch.randn(32, 10, generator=g)
        y = x[:, :1] * 2 - x[:, 1:2]
        if step == 0:
            with torch.no_grad():
                run.trace.extra["pre_max"] = float(model[:5](x).max())
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        _zero_grads(model, run.trace.extra)
        run.record(loss, model)
        opt.step()
    watch.close()


class _TwoBranchCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a1 = nn.Conv2d(1, 8, 3, padding=1)
        self.a2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b1 = nn.Conv2d(1, 8, 3, padding=1)
        self.b2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.head = nn.Linear(2 * 8 * 9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.a2(torch.relu(self.a1(x))))
        b = torch.relu(self.b2(torch.relu(self.b1(x))))
        return self.head(torch.cat([self.pool(a), self.pool(b)], 1).flatten(1))


def _check_dead_branch(tr: Trace) -> str:
    zero = tr.extra["zero_grads"]
    victims = {"b1.weight", "b1.bias", "b2.weight", "b2.bias"}
    _require(victims <= zero, f"zero at every step: {sorted(zero)}, expected the b branch")
    _require(not ({"a1.weight", "a2.weight"} & zero), "the live branch got no gradient either")
    drop = tr.mean_loss(0, 10) - tr.mean_loss(-10)
    return (
        f"b2 pre-activation <= {tr.extra['pre_max']:.2g}; b1.*, b2.* grads == 0; loss -{drop:.2g}"
    )


@scenario(
    "dead_cnn_branch_negative_weights",
    "dead_units",
    {"b2", "b2.weight", "b2.bias"},
    "CNN 2-branch",
    "momentum",
    fast=True,
    what="two-branch CNN; branch b's conv b2 has all weights < 0 after a ReLU: it never fires",
    check=_check_dead_branch,
)
def _dead_branch(run: Run) -> None:
    g = _gen(22)
    model = _TwoBranchCNN()
    with torch.no_grad():  # a sign error in a custom init: -|w|
        model.b2.weight.abs_().neg_()
        model.b2.bias.fill_(-0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    watch = run.watch(model, opt)
    for step in range(40):
        x, y = _bars(16, g)
        if step == 0:
            with torch.no_grad():
                run.trace.extra["pre_max"] = float(model.b2(torch.relu(model.b1(x))).max())
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()  # attach only: the loss is unknown to gradwatch
        _zero_grads(model, run.trace.extra)
        run.record(loss, model)
        opt.step()
    watch.close()


# ------------------------------------------------------------------------------ unused


def _check_unused(names: set[str]) -> Callable[[Trace], str]:
    def check(tr: Trace) -> str:
        never = tr.extra["never_grad"]
        _require(names <= never, f"parameters never given a gradient: {sorted(never)}")
        return f"{', '.join(sorted(names))}: grad None at every step"

    return check


def _never_grad(model: nn.Module, into: dict[str, Any]) -> None:
    now = {n for n, p in model.named_parameters() if p.grad is None}
    into["never_grad"] = now if "never_grad" not in into else into["never_grad"] & now


class _WithTemperature(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp([6, 32, 32, 4])
        self.temperature = nn.Parameter(torch.ones(()))  # meant to divide the logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@scenario(
    "unused_temperature",
    "unused",
    {"temperature"},
    "MLP",
    "AdamW",
    fast=True,
    what="a temperature parameter defined but never used in forward",
    check=_check_unused({"temperature"}),
)
def _unused_temperature(run: Run) -> None:
    g = _gen(40)
    model = _WithTemperature()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    watch = run.watch(model, opt)
    for _ in range(40):
        x = torch.randn(32, 6, generator=g)
        y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        with watch.backward(loss=loss):
            loss.backward()
        _never_grad(model, run.trace.extra)
        run.record(loss, model)
        opt.step()
    watch.close()


class _EvalCalibrated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 16, batch_first=True)
        self.head = nn.Linear(16, 2)
        self.calibrate = nn.Linear(2, 2)  # only applied in eval: never trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.lstm(x)[0][:, -1])
        return logits if self.training else self.calibrate(logits)


@scenario(
    "unused_eval_only_branch",
    "unused",
    {"calibrate", "calibrate.weight", "calibrate.bias"},
    "LSTM",
    "SGD",
    fast=True,
    what="LSTM classifier whose `calibrate` layer runs only in eval mode",
    check=_check_unused({"calibrate.weight", "calibrate.bias"}),
)
def _unused_eval(run: Run) -> None:
    g = _gen(41)
    model = _EvalCalibrated()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = run.watch(model, opt)
    for step in range(30):
        x = torch.randn(16, 12, 3, generator=g)
        y = (x[:, :, 0].sum(1) > 0).long()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        _never_grad(model, run.trace.extra)
        run.record(loss, model)
        opt.step()
        if step % 10 == 9:  # a validation pass now and then
            model.eval()
            with torch.no_grad():
                model(torch.randn(16, 12, 3, generator=g))
            model.train()
    watch.close()


# ------------------------------------------------------------------------------ saturation


def _layer_grad_norms(model: nn.Module, into: dict[str, Any]) -> None:
    """Step-0 gradient norm of each layer (weights), first layer first."""
    if "layer_norms" not in into:
        into["layer_norms"] = [
            float(m.weight.grad.norm())
            for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.grad is not None
        ]


def _check_vanishing(limit: float) -> Callable[[Trace], str]:
    def check(tr: Trace) -> str:
        norms = tr.extra["layer_norms"]
        ratio = norms[0] / norms[-1]
        _require(ratio < limit, f"first/last layer gradient x{ratio:.3g}, expected < {limit:g}")
        _require(tr.finite(), f"non-finite at {tr.first_nonfinite()}")
        per = ratio ** (1 / (len(norms) - 1))
        drop = tr.losses[0] - tr.mean_loss(-5)
        return f"first/last layer grad {ratio:.2g} (x{per:.2g}/layer), loss fell only {drop:.2g}"

    return check


@scenario(
    "saturation_sigmoid_mlp12",
    "saturation",
    {"0", "0.weight", "0.bias", "2", "2.weight", "2.bias"},
    "MLP 12 sigmoid",
    "SGD",
    fast=True,
    what="12-layer sigmoid MLP, default init, SGD: the first layers get almost no gradient",
    check=_check_vanishing(1e-4),
)
def _sat_sigmoid(run: Run) -> None:
    g = _gen(60)
    model = _mlp([16] + [40] * 11 + [1], act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = run.watch(model, opt)
    w = torch.randn(16, 1, generator=g)
    for _ in range(40):
        x = torch.randn(32, 16, generator=g)
        loss = F.mse_loss(model(x), torch.tanh(x @ w))
        run.step(watch, opt, model, loss, measure=_layer_grad_norms)
    watch.close()


@scenario(
    "saturation_sigmoid_cnn8",
    "saturation",
    {"convs.0", "convs.0.weight", "convs.0.bias", "convs.1", "convs.1.weight", "convs.1.bias"},
    "CNN 8 sigmoid",
    "AdamW",
    fast=True,
    what="8 conv layers with sigmoid (default init), AdamW: the gradient vanishes towards conv 0",
    check=_check_vanishing(1e-4),
)
def _sat_sigmoid_cnn(run: Run) -> None:
    g = _gen(61)
    model = _SigmoidCNN(8, 12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = run.watch(model, opt)
    for _ in range(30):
        x, y = _bars(16, g)
        loss = F.cross_entropy(model(x), y)
        run.step(watch, opt, model, loss, measure=_layer_grad_norms)
    watch.close()


class _SigmoidCNN(nn.Module):
    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(1 if i == 0 else width, width, 3, padding=1) for i in range(depth)
        )
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.sigmoid(conv(x))
        return self.head(x.mean(dim=(2, 3)))


@scenario(
    "init_vanishing_relu_mlp10",
    "initialization",
    {"0", "0.weight", "0.bias"},
    "MLP 10x64",
    "AdamW",
    fast=True,
    what="10-layer ReLU MLP, torch's default weights scaled by 0.5: the gradient vanishes "
    "towards layer 0 through the weights, not the activations",
    check=_check_vanishing(1e-4),
)
def _init_vanishing(run: Run) -> None:
    g = _gen(14)
    model = _mlp([16] + [64] * 9 + [3])
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = run.watch(model, opt)
    centers = torch.randn(3, 16, generator=g)
    for _ in range(30):
        x, y = _blobs(centers, 32, g, noise=0.5)
        loss = F.cross_entropy(model(x), y)
        run.step(watch, opt, model, loss, measure=_layer_grad_norms)
    watch.close()


@scenario(
    "saturation_tanh_mlp10_large_bias",
    "saturation",
    {"0", "0.weight", "0.bias", "2", "2.weight", "2.bias"},
    "MLP 10 tanh",
    "momentum",
    fast=True,
    what="10-layer tanh MLP, biases N(0, 3^2): most units sit near ±1 where tanh is flat, the "
    "gradient vanishes although the weights pass it back x1",
    check=_check_vanishing(1e-3),
)
def _sat_tanh(run: Run) -> None:
    g = _gen(15)
    model = _mlp([16] + [64] * 9 + [3], nn.Tanh)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features))
            nn.init.normal_(m.bias, std=3.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    watch = run.watch(model, opt)
    centers = torch.randn(3, 16, generator=g)
    for _ in range(30):
        x, y = _blobs(centers, 32, g, noise=0.5)
        loss = F.cross_entropy(model(x), y)
        run.step(watch, opt, model, loss, measure=_layer_grad_norms)
    watch.close()


# ------------------------------------------------------------------------------ redundant bias


def _check_redundant_bias(names: tuple[str, ...]) -> Callable[[Trace], str]:
    def check(tr: Trace) -> str:
        trained = _healthy(1.15)(tr)
        ratio = tr.extra["bias_ratio"]
        _require(ratio < 1e-4, f"bias/weight gradient ratio {ratio:.3g}, expected ~0")
        return f"{', '.join(names)}: grad/weight-grad <= {ratio:.1g}; {trained}"

    return check


def _bias_ratio(model: nn.Module, names: tuple[str, ...], into: dict[str, Any]) -> None:
    params = dict(model.named_parameters())
    worst = max(
        float(params[n].grad.norm() / params[n.replace(".bias", ".weight")].grad.norm())
        for n in names
    )
    into["bias_ratio"] = max(worst, into.get("bias_ratio", 0.0))


def _bn_cnn(width: int, blocks: int, classes: int = 4) -> nn.Sequential:
    """(Conv2d with bias -> BatchNorm2d -> ReLU) x blocks, global pooling, Linear head."""
    layers: list[nn.Module] = []
    for i in range(blocks):
        layers += [
            nn.Conv2d(1 if i == 0 else width, width, 3, stride=1 + (i > 0), padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)]
    return nn.Sequential(*layers)


def _bn_cnn_loop(run: Run, *, width: int, blocks: int, steps: int, lr: float, seed: int) -> None:
    g = _gen(seed)
    model = _bn_cnn(width, blocks)
    biases = tuple(f"{3 * i}.bias" for i in range(blocks))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    watch = run.watch(model, opt)
    for _ in range(steps):
        x, y = _bars(32, g, size=12, noise=0.5)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        _bias_ratio(model, biases, run.trace.extra)
        run.record(loss, model)
        opt.step()
    watch.close()


@scenario(
    "bias_before_bn_cnn",
    "redundant_bias",
    {"0.bias", "3.bias"},
    "CNN BN",
    "momentum",
    fast=True,
    what="CNN of Conv2d(bias=True) -> BatchNorm2d -> ReLU x2, 100 steps: trains fine",
    check=_check_redundant_bias(("0.bias", "3.bias")),
)
def _bias_bn_cnn(run: Run) -> None:
    _bn_cnn_loop(run, width=12, blocks=2, steps=100, lr=0.05, seed=70)


@scenario(
    "bias_before_bn_mlp",
    "redundant_bias",
    {"fc1.bias", "fc2.bias"},
    "MLP BN",
    "AdamW",
    fast=True,
    what="MLP of Linear(bias=True) -> BatchNorm1d -> ReLU x2, AdamW, 80 steps: trains fine",
    check=_check_redundant_bias(("fc1.bias", "fc2.bias")),
)
def _bias_bn_mlp(run: Run) -> None:
    g = _gen(71)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(10, 48))
    model.add_module("bn1", nn.BatchNorm1d(48))
    model.add_module("act1", nn.ReLU())
    model.add_module("fc2", nn.Linear(48, 48))
    model.add_module("bn2", nn.BatchNorm1d(48))
    model.add_module("act2", nn.ReLU())
    model.add_module("head", nn.Linear(48, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    watch = run.watch(model, opt)
    w = torch.randn(10, 3, generator=g)
    for _ in range(80):
        x = torch.randn(64, 10, generator=g)
        y = (x @ w).argmax(1)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        with watch.backward(loss=loss):
            loss.backward()
        _bias_ratio(model, ("fc1.bias", "fc2.bias"), run.trace.extra)
        run.record(loss, model)
        opt.step()
    watch.close()


# ------------------------------------------------------------------------------ healthy


@scenario(
    "healthy_bn_cnn_200",
    None,
    None,
    "CNN BN",
    "momentum",
    fast=False,
    what="3-block CNN, biased convs before BatchNorm2d, 200 steps of momentum SGD",
    check=_healthy(2.0),
)
def _healthy_bn_cnn(run: Run) -> None:
    _bn_cnn_loop(run, width=16, blocks=3, steps=200, lr=0.03, seed=80)


class _LSTMLM(nn.Module):
    def __init__(self, vocab: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


@scenario(
    "healthy_lstm_lm_clip",
    None,
    None,
    "LSTM LM",
    "AdamW",
    fast=True,
    what="2-layer LSTM language model on a token pattern, ClipNorm(0.5), 120 steps",
    check=_healthy(2.0),
)
def _healthy_lstm(run: Run) -> None:
    g = _gen(81)
    model = _LSTMLM(11, 24, 48)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    watch = run.watch(model, opt, clip=gw.ClipNorm(0.5))
    for _ in range(120):
        x, y = _pattern_tokens(16, 20, 11, g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        run.step(watch, opt, model, loss)
    watch.close()


@scenario(
    "healthy_gpt_warmup_cosine",
    None,
    None,
    "transformer",
    "AdamW",
    fast=False,
    what="pre-LN GPT (2 blocks, d=32, vocab 7), AdamW 3e-3, warm-up 15 + cosine, 120 steps",
    check=_healthy(2.0),
)
def _healthy_gpt(run: Run) -> None:
    g = _gen(82)
    model = TinyGPT(vocab=7, d=32, heads=4, layers=2, length=12)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    watch = run.watch(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(15, 120))
    for _ in range(120):
        x, y = _pattern_tokens(16, 12, 7, g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        run.step(watch, opt, model, loss)
        sched.step()
    watch.close()


@scenario(
    "healthy_noisy_sgd_batch2",
    None,
    None,
    "MLP",
    "SGD",
    fast=True,
    what="MLP regression with batches of 2 and label noise: very noisy gradients, 300 steps",
    check=_healthy(1.5),
)
def _healthy_noisy(run: Run) -> None:
    g = _gen(83)
    model = _mlp([5, 24, 24, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    watch = run.watch(model, opt)
    w = torch.randn(5, 1, generator=g)
    for _ in range(300):
        x = torch.randn(2, 5, generator=g)
        y = x @ w + 0.3 * torch.randn(2, 1, generator=g)
        loss = F.mse_loss(model(x), y)
        run.step(watch, opt, model, loss)
    watch.close()


@scenario(
    "healthy_lr_up_and_back",
    None,
    None,
    "MLP",
    "momentum",
    fast=True,
    what="MLP classifier; the LR goes x3 at step 60 and back at 120 (a restart), 180 steps",
    check=_healthy(1.5),
)
def _healthy_lr_up(run: Run) -> None:
    g = _gen(84)
    model = _mlp([8, 32, 32, 5])
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    watch = run.watch(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 3.0 if 60 <= s < 120 else 1.0)
    w = torch.randn(8, 5, generator=g)
    for _ in range(180):
        x = torch.randn(32, 8, generator=g)
        y = (x @ w).argmax(1)
        loss = F.cross_entropy(model(x), y)
        run.step(watch, opt, model, loss)
        sched.step()
    watch.close()


@scenario(
    "healthy_resnet_steplr",
    None,
    None,
    "residual MLP",
    "momentum",
    fast=True,
    what="6-block residual MLP, momentum SGD, StepLR x0.1 at step 80, 160 steps",
    check=_healthy(1.2),
)
def _healthy_resnet(run: Run) -> None:
    g = _gen(85)
    model = _ResMLP(12, 40, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    watch = run.watch(model, opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=80, gamma=0.1)
    w = torch.randn(12, 1, generator=g)
    for _ in range(160):
        x = torch.randn(32, 12, generator=g)
        loss = F.mse_loss(model(x), torch.sin(x @ w))
        run.step(watch, opt, model, loss)
        sched.step()
    watch.close()


def _check_iid(tr: Trace) -> str:
    _require(tr.finite(), f"non-finite at {tr.first_nonfinite()}")
    half = len(tr.norms) // 2
    a, b = sum(tr.norms[:half]) / half, sum(tr.norms[half:]) / half
    _require(0.8 < b / a < 1.25, f"mean norm {a:.3g} then {b:.3g}: not stationary")
    return f"finite, stationary i.i.d. norms (mean {a:.3g} then {b:.3g}, max {max(tr.norms):.3g})"


@scenario(
    "healthy_readme_reports",
    None,
    None,
    "MLP",
    "none",
    fast=True,
    what="the README's Reports example: 200 steps of i.i.d. gradients, no optimizer, check()",
    check=_check_iid,
)
def _healthy_readme(run: Run) -> None:
    _gen(86)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    watch = run.watch(model)
    for _ in range(200):
        loss = model(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        run.record(loss, model)
        watch.check()
        model.zero_grad()
    watch.close()


def _cnn_example_images(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """examples/cnn.py's data: 4 classes, 16x16, each class a bar at its own place."""
    labels = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    for i, label in enumerate(labels.tolist()):
        x[i, 0, 2 + 3 * label : 4 + 3 * label, :] += 1.0
    return x, labels


@scenario(
    "healthy_examples_cnn",
    None,
    None,
    "CNN",
    "momentum",
    fast=False,
    what="examples/cnn.py: 2-conv CNN, SGD 0.2 momentum 0.9, ClipUnitwise(0.01), 300 steps",
    check=_healthy(1.3),
)
def _healthy_example_cnn(run: Run) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 16, 3, padding=1))
    model.add_module("act1", nn.ReLU())
    model.add_module("conv2", nn.Conv2d(16, 32, 3, stride=2, padding=1))
    model.add_module("act2", nn.ReLU())
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("head", nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    watch = run.watch(
        model,
        optimizer,
        exclude=tuple(model.head.parameters()),
        clip=gw.ClipUnitwise(0.01, exclude=model.head),
        on_nonfinite="skip",
    )
    for _ in range(300):
        x, y = _cnn_example_images(32, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        run.record(loss, model)
        optimizer.step()
    watch.close()


@scenario(
    "healthy_cnn_warmup_cosine",
    None,
    None,
    "CNN",
    "momentum",
    fast=True,
    what="the lr_cnn_warmup_peak_100x run at its normal peak lr 0.01 (warm-up 20 + cosine)",
    check=_healthy(3.0),
)
def _healthy_cnn_schedule(run: Run) -> None:
    _cnn_schedule(run, peak=0.01, seed=6)


def _check_amp_healthy(tr: Trace) -> str:
    skipped = tr.extra["skipped"]
    _require(0 < len(skipped) <= 12, f"the scaler skipped {len(skipped)} steps, expected 1-12")
    _require(all(math.isfinite(v) for v in tr.losses), "a loss was non-finite")
    kept = [v for i, v in enumerate(tr.norms) if i not in skipped]
    _require(all(math.isfinite(v) for v in kept), "a step the scaler kept had NaN/Inf")
    drop = tr.mean_loss(0, 10) / tr.mean_loss(-10)
    _require(drop > 1.5, f"loss fell only x{drop:.3g}")
    return f"scaler skipped steps {skipped} (scaled fp16 overflow), then loss fell x{drop:.2g}"


@scenario(
    "healthy_amp_fp16_scaler",
    None,
    None,
    "MLP autocast fp16",
    "AdamW+scaler",
    fast=True,
    what="autocast fp16 + GradScaler(init 2^24): the scaler skips its first steps, then trains",
    check=_check_amp_healthy,
)
def _healthy_amp(run: Run) -> None:
    g = _gen(87)
    model = _AmpNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    watch = run.watch(model, opt, scaler=scaler)
    w = torch.randn(20, 3, generator=g)
    run.trace.extra["skipped"] = []
    for step in range(100):
        x = torch.randn(32, 20, generator=g)
        y = (x @ w).argmax(1)
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad()
        with watch.backward(loss=loss):
            scaler.scale(loss).backward()
        run.record(loss, model, scale=scaler.get_scale())
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < before:
            run.trace.extra["skipped"].append(step)
    watch.close()


@scenario(
    "healthy_deep_relu_kaiming",
    None,
    None,
    "MLP 16x64",
    "AdamW",
    fast=True,
    what="16-layer ReLU MLP with Kaiming init: deep, but the signal is preserved through depth",
    check=_healthy(1.5),
)
def _healthy_deep_relu(run: Run) -> None:
    g = _gen(91)
    model = _mlp([16] + [64] * 15 + [4])
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    watch = run.watch(model, opt)
    centers = 2.0 * torch.randn(4, 16, generator=g)
    for _ in range(120):
        x, y = _blobs(centers, 32, g, noise=1.0)
        loss = F.cross_entropy(model(x), y)
        run.step(watch, opt, model, loss)
    watch.close()


class _GRUClassifier(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


@scenario(
    "healthy_gru_sequences",
    None,
    None,
    "GRU",
    "Adam",
    fast=True,
    what="GRU classifies 30-step sequences by the sign of their sum, Adam, no clipping",
    check=_healthy(1.5),
)
def _healthy_gru(run: Run) -> None:
    g = _gen(92)
    model = _GRUClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    watch = run.watch(model, opt)
    for _ in range(100):
        x = torch.randn(32, 30, 1, generator=g)
        y = (x.sum(dim=(1, 2)) > 0).long()
        loss = F.cross_entropy(model(x), y)
        run.step(watch, opt, model, loss)
    watch.close()


@scenario(
    "healthy_tanh_xavier_mlp6",
    None,
    None,
    "MLP 6 tanh",
    "momentum",
    fast=True,
    what="6-layer tanh MLP with Xavier init (tanh's derivative near 1), momentum SGD",
    check=_healthy(1.5),
)
def _healthy_tanh(run: Run) -> None:
    g = _gen(93)
    model = _mlp([8] + [48] * 5 + [1], nn.Tanh)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("tanh"))
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    watch = run.watch(model, opt)
    w = torch.randn(8, 1, generator=g)
    for _ in range(150):
        x = torch.randn(32, 8, generator=g)
        y = torch.tanh(x @ w) + 0.05 * torch.randn(32, 1, generator=g)
        loss = F.mse_loss(model(x), y)
        run.step(watch, opt, model, loss)
    watch.close()
