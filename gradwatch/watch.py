"""GradWatch: the one object a training loop talks to.

It wires the parts together and nothing else: the collector reads gradients into a row of the
device stats ring; clippers act on the device; rows are brought to the host later (at once on CPU,
about a step later on accelerators) and only then run through the detectors and out to the sinks
(:mod:`gradwatch.emission`). The step path therefore never waits for the device, except where a
policy must decide now (``on_nonfinite`` or ``on_spike`` set to ``"skip"``/``"raise"``,
``on_spike="clip"``).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import operator
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from gradwatch._version import __version__
from gradwatch.act.clip import EPS, Clipper, scale_
from gradwatch.act.skip import BufferSnapshot, SkipHold, StepGuard, optimizer_params
from gradwatch.alerts import policy_error
from gradwatch.collect.distributed import (
    RankBlame,
    any_rank,
    is_distributed,
    rank,
    unwrap_model,
)
from gradwatch.collect.forensics import ActivationProbe, StepProbe
from gradwatch.collect.hooks import ArrivalOrder, MicroBatchNorms
from gradwatch.collect.norms import GradAttr, GradCollector, resolve_grad_attr
from gradwatch.collect.params import ParamChanges, WatchedParams, resolve_params
from gradwatch.collect.pipeline import resolve_pipeline_group
from gradwatch.collect.ring import Slot, StatsRing
from gradwatch.config import (
    NONFINITE_POLICIES,
    SPIKE_POLICIES,
    NonFinitePolicy,
    SpikePolicy,
    check_bool,
    check_choice,
    check_instance,
    check_int,
    check_rank,
    check_sinks,
    resolve_norm_type,
)
from gradwatch.detect.health import HealthDetector
from gradwatch.detect.spikes import ParamBaseline, SpikeDetector
from gradwatch.diagnosis import diagnose
from gradwatch.emission import Emission, Pending
from gradwatch.errors import (
    ConfigError,
    ConfigTypeError,
    GradWatchWarning,
    StateError,
)
from gradwatch.records import (
    Finding,
    ParamInfo,
    RunStart,
    RunSummary,
    StepReport,
)
from gradwatch.report.base import Sink, SinkGroup, StepAggregator, _outside_gradwatch

__all__ = ["BackwardScope", "GradWatch"]


class BackwardScope:
    """Handle yielded by :meth:`GradWatch.backward`; ``report`` is set when a check ran on exit."""

    report: StepReport | None = None


class GradWatch:
    """Watches a model's gradients: norms, NaN/Inf, spikes; clips and skips; reports.

    Use it in one of three ways (they can be mixed): ``attach(optimizer)`` to check right before
    every ``optimizer.step()``; ``with watch.backward(loss=loss): loss.backward()``; or
    ``watch.check(loss=loss)`` explicitly after backward (e.g. after ``scaler.unscale_``).

    Args:
        model: An ``nn.Module`` or an iterable of ``(name, parameter)`` pairs.
        clip: A clipper (``ClipNorm``, ``ClipValue``, ...) applied at every check, or None.
        on_nonfinite: On a NaN/Inf gradient: ``"warn"`` (report only), ``"skip"`` (the step
            changes nothing in the model: parameters, optimizer state and buffers, such as
            BatchNorm statistics, stay as they were) or ``"raise"``
            (:class:`~gradwatch.NonFiniteGradientError`). With an attached optimizer its step
            runs with the gradients hidden (``p.grad = None``: torch optimizers leave such a
            parameter and its state alone); without one the gradients are zeroed in place, so a
            hand-written update (``p.data.add_(p.grad, alpha=-lr)``) adds nothing, and hidden
            from any torch optimizer stepping before the next backward. Buffers are copied on
            the device after every step that goes through (one fused copy per step) and copied
            back on a skip; a buffer that cannot be is named in a warning.
        on_spike: On a gradient-norm spike: ``"warn"``, ``"clip"`` (rescale to the detector's
            threshold), ``"skip"`` or ``"raise"`` (:class:`~gradwatch.GradientSpikeError`).
        sinks: Where records go. None means one :class:`~gradwatch.ConsoleSink`; ``[]`` means none.
        norm_type: Order of the global norm; defaults to the clipper's, else 2.
        spike_detector: Detector for gradient-norm spikes (default ``SpikeDetector()``).
        loss_detector: Detector for loss spikes, fed when a loss is given (default
            ``SpikeDetector()``).
        accumulation_steps: With :meth:`backward` and no attached optimizer, check once every this
            many backward passes (gradient accumulation).
        history: Number of recent reports kept in :attr:`history`.
        layer_depth: Group parameters into layers by their first ``layer_depth`` name parts in
            summaries (None: by owning module).
        log_rank: In a ``torch.distributed`` run, only this rank writes to the sinks (None: every
            rank). Statistics are computed on every rank either way.
        rank_blame: With a ``DistributedDataParallel`` model, check each rank's local gradients
            for NaN/Inf before the all-reduce to name the rank a NaN came from (one extra read of
            gradient memory and a tiny all-gather per step; no host sync).
        track_micro_batches: Record the gradient norm of each micro-batch's contribution (each
            :meth:`backward` scope) to find a bad micro-batch under gradient accumulation; costs
            a Python hook call per parameter per backward.
        forensics: Watch every module call of the model, parameter-free ones included, through
            each module's call slot (nothing ``torch.save`` writes, no global hook; ``model``
            must be an ``nn.Module``), to record each one's largest activation in forward order
            and largest backpropagated signal (gradient of its output) in backward order, on the
            device: names the first module whose output went NaN/Inf, and shows the signal's
            growth through depth in :meth:`diagnose`. No host sync per step; two small
            reductions (one for a ``ReLU``) and two Python calls per module call. A model run
            through ``torch.compile`` is not recorded (its modules run in the compiled graph).
        health_detector: Keeps per-layer gradient health for :meth:`diagnose` (default
            ``HealthDetector()``; pass one to set ``dead_after``).
        pipeline_group: In a pipeline-parallel run, the process group (or 1-D ``DeviceMesh``,
            e.g. ``mesh["pp"]``) joining the stages: norms, clipping and decisions then cover
            every stage (one all-reduce per step), and ``nonfinite_ranks`` names the ranks of
            the stages a NaN/Inf came from.
        grad_attr: Where the gradients are: ``"grad"``, another attribute of the parameters
            (Megatron-style ``"main_grad"``) or a callable ``param -> Tensor | None``.

    Raises:
        TypeError, ValueError: An argument is invalid (the message names it).
    """

    def __init__(
        self,
        model: Any,
        *,
        clip: Clipper | None = None,
        on_nonfinite: NonFinitePolicy = "warn",
        on_spike: SpikePolicy = "warn",
        sinks: list[Sink] | None = None,
        norm_type: float | None = None,
        spike_detector: SpikeDetector | None = None,
        loss_detector: SpikeDetector | None = None,
        accumulation_steps: int = 1,
        history: int = 256,
        layer_depth: int | None = None,
        log_rank: int | None = 0,
        rank_blame: bool = False,
        track_micro_batches: bool = False,
        forensics: bool = False,
        health_detector: HealthDetector | None = None,
        pipeline_group: Any = None,
        grad_attr: GradAttr = "grad",
    ) -> None:
        if isinstance(clip, type):
            raise ConfigTypeError(
                f"clip must be a clipper instance such as {clip.__name__}(...), "
                f"got the class {clip.__name__}"
            )
        if clip is not None and not isinstance(clip, Clipper):
            raise ConfigTypeError(
                "clip must be a gradwatch clipper such as ClipNorm(1.0) or ClipValue(0.5), "
                f"or None; got {type(clip).__name__}"
            )
        self._on_nonfinite = check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        self._on_spike = check_choice("on_spike", on_spike, SPIKE_POLICIES)
        self._norm_type = resolve_norm_type(norm_type, clip.norm_type if clip is not None else None)
        check_instance("spike_detector", spike_detector, SpikeDetector)
        check_instance("loss_detector", loss_detector, SpikeDetector)
        check_instance("health_detector", health_detector, HealthDetector)
        check_bool("forensics", forensics)
        self.accumulation_steps = check_int("accumulation_steps", accumulation_steps)
        history = check_int("history", history)
        if layer_depth is not None:
            check_int("layer_depth", layer_depth)
        if sinks is None:
            from gradwatch.report.console import ConsoleSink

            sinks = [ConsoleSink()]
        check_sinks("sinks", sinks)

        module = unwrap_model(model)
        watched = resolve_params(module)
        self._module = module if isinstance(module, torch.nn.Module) else None
        if forensics and self._module is None:
            raise ConfigTypeError(
                "forensics=True needs the model as an nn.Module to hook its modules, "
                "got named parameters"
            )
        self.names = watched.names
        self._clipper = clip
        self._spike_detector = spike_detector or SpikeDetector()
        self._loss_detector = loss_detector or SpikeDetector()
        check_rank("log_rank", log_rank)
        self._pipeline = resolve_pipeline_group("pipeline_group", pipeline_group)
        self._grad_attr = resolve_grad_attr("grad_attr", grad_attr)
        check_bool("rank_blame", rank_blame)
        check_bool("track_micro_batches", track_micro_batches)
        if log_rank is not None and is_distributed() and rank() != log_rank:
            sinks = []  # statistics are still computed here; only log_rank reports them
        self._sinks = SinkGroup(sinks)
        # Never closed by the user: close the sinks when collected, close fully at exit.
        self._sink_finalizer = weakref.finalize(self, SinkGroup.close, self._sinks)
        self._exit_hook = _close_at_exit(weakref.ref(self))
        atexit.register(self._exit_hook)
        self._blame: RankBlame | None = None
        if rank_blame:
            if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
                raise ConfigError(
                    "rank_blame=True needs the DistributedDataParallel-wrapped model, "
                    f"got {type(model).__name__}"
                )
            self._blame = RankBlame(watched.params[0].device)
            self._blame.install(model)
        self._forensics = forensics
        self._track_micro = track_micro_batches
        self._health_detector = health_detector or HealthDetector()
        self._emission = Emission(
            self.names,
            dict(zip(watched.names, watched.owner_types)),
            sinks=self._sinks,
            spike_detector=self.spike_detector,
            loss_detector=self.loss_detector,
            health_detector=self.health_detector,
            baseline=ParamBaseline(len(watched), alpha=self.spike_detector.alpha),
            aggregator=StepAggregator(self.names, depth=layer_depth),
            history=history,
            on_nonfinite=self.on_nonfinite,
            norm_type=self.norm_type,
            clip=self.clipper.config() if self.clipper is not None else None,
        )
        self._skips = "skip" in (self.on_nonfinite, self.on_spike)
        self._bind(watched)
        self._changes = ParamChanges(self._module, watched)
        self._step = 0
        self._micro_losses: list[Any] = []
        self._micro_batches = 0
        self._guard: StepGuard | None = None
        self._snapshot = None
        if self._skips and self._module is not None:
            self._snapshot = BufferSnapshot(self._module)
        self._writes_coef = clip is not None or self.on_spike == "clip"
        self._last_skip = False
        self._closed = False
        self._emission.start(self._run_start(layer_depth))

    # ----------------------------------------------------------------------------- public API

    # Settings are fixed at construction: the watcher's parts were built from them.

    @property
    def on_nonfinite(self) -> NonFinitePolicy:
        """The NaN/Inf policy. Read-only."""
        return self._on_nonfinite

    @property
    def on_spike(self) -> SpikePolicy:
        """The gradient-norm spike policy. Read-only."""
        return self._on_spike

    @property
    def norm_type(self) -> float:
        """Order of the global norm. Read-only."""
        return self._norm_type

    @property
    def clipper(self) -> Clipper | None:
        """The clipper applied at every check, or None. Read-only."""
        return self._clipper

    @property
    def spike_detector(self) -> SpikeDetector:
        """The gradient-norm spike detector. Read-only."""
        return self._spike_detector

    @property
    def loss_detector(self) -> SpikeDetector:
        """The loss spike detector. Read-only."""
        return self._loss_detector

    @property
    def health_detector(self) -> HealthDetector:
        """The per-layer gradient health detector. Read-only."""
        return self._health_detector

    @property
    def step(self) -> int:
        """Number of steps checked so far (the next report's ``step``)."""
        return self._step

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    @property
    def history(self) -> deque[StepReport]:
        """The most recent reports (up to ``history``), oldest first, including the last step.

        Reading it brings pending steps to the host first (a device wait on accelerators).
        """
        self.flush()
        return self._emission.history

    def attach(self, optimizer: torch.optim.Optimizer, *, scaler: Any = None) -> GradWatch:
        """Check right before every ``optimizer.step()``, and skip the step when a policy says so.

        Under gradient accumulation this checks once per optimizer step, on the accumulated
        gradients. Pass the ``torch.amp.GradScaler`` stepping this optimizer to have the steps it
        skips (inf/NaN found) reported as skipped, with the loss scale.

        The check runs from the optimizer's step pre-hook: ``optimizer.step`` itself is not
        replaced, so LR schedulers created before or after ``attach`` see the step they expect.

        Returns:
            The watcher, for chaining.

        Raises:
            TypeError: ``optimizer`` has no ``step`` method or ``scaler`` no ``step`` method.
            ValueError: ``optimizer`` updates none of the watched parameters.
            StateError: Already attached, or closed.
        """
        self._ensure_open("attach")
        if self._guard is not None:
            raise StateError(
                f"attach() was already called with {type(self._guard.optimizer).__name__}; "
                "a watcher guards one optimizer (call detach() first to switch)"
            )
        if not callable(getattr(optimizer, "step", None)):
            raise ConfigTypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        params = optimizer_params(optimizer)
        if params is not None and not any(id(p) in self._watched.position for p in params):
            raise ConfigError(
                f"optimizer ({type(optimizer).__name__}) updates none of the "
                f"{len(self.names)} parameters this GradWatch watches: its {len(params)} "
                "parameters belong to another model (a copy made with copy.deepcopy, an EMA "
                "model?); attach the optimizer built over the watched model's parameters"
            )
        if scaler is not None and not callable(getattr(scaler, "step", None)):
            raise ConfigTypeError(
                f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
            )
        self._guard = StepGuard(optimizer, self._before_step, scaler, self._after_scaler_skip)
        return self

    def detach(self) -> None:
        """Stop guarding the attached optimizer (no-op if none)."""
        if self._guard is not None:
            self._guard.remove()
            self._guard = None

    @contextmanager
    def backward(self, loss: Any = None) -> Iterator[BackwardScope]:
        """Context manager around ``loss.backward()``; checks the gradients on exit.

        With ``accumulation_steps=N`` it checks on every N-th exit; with an attached optimizer it
        only records the loss and leaves the check to ``optimizer.step()``.

        Args:
            loss: The loss being backpropagated (a one-element tensor or a float), for
                loss-spike detection.

        Raises:
            ValueError: ``loss`` has more than one element (reduce it first).
        """
        self._ensure_open("backward")
        detached = _detached(loss) if loss is not None else None  # validate before backward runs
        if self._micro_batches == 0:
            self._arrivals.clear()
        if self._micro is not None:
            self._micro.begin()
        scope = BackwardScope()
        yield scope
        if self._micro is not None:
            self._micro.end()
        if detached is not None:
            self._micro_losses.append(detached)
        self._micro_batches += 1
        if self._guard is None and self._micro_batches >= self.accumulation_steps:
            scope.report = self._check(skip_reason=None, from_optimizer=False)

    def check(self, loss: Any = None) -> StepReport:
        """Check the gradients present now: norms, NaN/Inf, spikes; clip; apply policies.

        Works whether or not a backward pass was seen by the hooks. Without an attached optimizer
        a "skip" decision zeroes the gradients in place, so a hand-written update adds nothing,
        and hides them (``p.grad = None``) from every torch optimizer step until the next
        backward, so the following ``optimizer.step()`` changes nothing either, momentum and
        Adam state included. Buffers are put back as they were after the last step.

        Args:
            loss: This step's loss (a one-element tensor or a float), or None.

        Returns:
            The step's report. Its numbers are copied to the host on first access.

        Raises:
            NonFiniteGradientError: ``on_nonfinite="raise"`` and a gradient holds NaN/Inf.
            GradientSpikeError: ``on_spike="raise"`` and the global norm is a spike.
            StateError: The watcher is closed.
        """
        self._ensure_open("check")
        if loss is not None:
            self._micro_losses.append(_detached(loss))
        return self._check(skip_reason=None, from_optimizer=False)

    def flush(self) -> None:
        """Bring every pending step to the host and out to the sinks (waits for the device)."""
        self._emission.drain(wait=True)

    def summary(self) -> RunSummary:
        """Statistics of the whole run so far (drains pending steps first)."""
        self.flush()
        return self._emission.aggregator.summary()

    def diagnose(self) -> list[Finding]:
        """What went wrong so far: cause, place, evidence and remedies (drains pending steps).

        Each finding names its ``cause`` (one of :data:`gradwatch.CAUSES`), its ``severity``,
        where it started (``params``: a parameter, a module, ``"loss"`` or ``"input"``), the
        numbers behind it (``data``) and settings computed from this run (``suggested``:
        ``max_norm``, ``lr``). They come most causal first: the first ``"error"`` or
        ``"warning"`` finding is the diagnosis; ``"info"`` findings are benign. The same
        findings end the final summary of :meth:`close`.

        Returns:
            The findings; an empty list when nothing looks wrong.
        """
        if self._closed:
            return list(self._final.findings)
        self.flush()
        clip = self.clipper.config() if self.clipper is not None else None
        return diagnose(self.health_detector.report(), clip=clip)

    def close(self) -> RunSummary:
        """Remove every hook, restore the optimizer, emit the final summary, close the sinks.

        The summary carries the run's findings (:meth:`diagnose`). Idempotent: later calls return
        the same summary and do nothing else.
        """
        if self._closed:
            return self._final
        findings = tuple(self.diagnose())
        self._final = replace(self._emission.aggregator.summary(), findings=findings)
        self._closed = True
        self.detach()
        self._unbind()
        self._changes.remove()
        if self._snapshot is not None:
            self._snapshot.remove()
        self._sink_finalizer.detach()
        atexit.unregister(self._exit_hook)
        self._sinks.write(self._final)
        self._sinks.close()
        return self._final

    def __enter__(self) -> GradWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Detector, baseline and clipper state, to resume a run exactly (drains first)."""
        self.flush()
        return {
            "step": self._step,
            "names": list(self.names),
            "spike_detector": self.spike_detector.state_dict(),
            "loss_detector": self.loss_detector.state_dict(),
            "baseline": self._emission.baseline.state_dict(),
            "clip": self.clipper.state_dict() if self.clipper is not None else {},
            "health": self.health_detector.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, e.g. when resuming from a checkpoint.

        Raises:
            ValueError: The state was saved from a watcher over different parameters.
        """
        if not isinstance(state, dict):
            raise ConfigTypeError(
                "state must be a dict returned by GradWatch.state_dict(), "
                f"got {type(state).__name__}"
            )
        required = ("names", "step", "spike_detector", "loss_detector", "baseline", "clip")
        missing = [key for key in required if key not in state]
        if missing:
            raise ConfigError(
                f"state is missing {', '.join(repr(k) for k in missing)}: pass what "
                "GradWatch.state_dict() returned"
            )
        if list(state.get("names", [])) != list(self.names):
            raise ConfigError(
                "state was saved from a watcher over different parameters "
                f"({len(state.get('names', []))} names vs {len(self.names)} here)"
            )
        self.flush()
        self._step = int(state["step"])
        self.spike_detector.load_state_dict(state["spike_detector"])
        self.loss_detector.load_state_dict(state["loss_detector"])
        self._emission.baseline.load_state_dict(state["baseline"])
        if self.clipper is not None:
            self.clipper.load_state_dict(state["clip"])
        if "health" in state:
            self.health_detector.load_state_dict(state["health"])

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step={self._step}"
        return (
            f"GradWatch({len(self.names)} params, clip={self.clipper!r}, "
            f"on_nonfinite={self.on_nonfinite!r}, on_spike={self.on_spike!r}, {state})"
        )

    # ------------------------------------------------------------------------------ hot path

    def _bind(self, watched: WatchedParams) -> None:
        """Build everything that holds the watched tensors, their device or their dtype."""
        first = watched.params[0]
        dtype = GradCollector.statistics_dtype(watched.params)
        self._watched = watched
        if self.clipper is not None:
            self.clipper.bind(zip(watched.names, watched.params))
        self._collector = GradCollector(
            watched.params,
            first.device,
            dtype,
            norm_type=self.norm_type,
            grad_attr=self._grad_attr,
            pipeline=self._pipeline,
        )
        self._ring = StatsRing(len(watched), capacity=64, device=first.device, dtype=dtype)
        self._arrivals = ArrivalOrder(watched.params, watched.position)
        self._emission.bind(self._ring, self._arrivals.positions)
        self._finalizer = weakref.finalize(self, ArrivalOrder.remove, self._arrivals)
        self._hold = None
        if self._skips:
            arrivals = self._arrivals
            self._hold = SkipHold(watched.params, lambda: bool(arrivals.snapshot()))
        self._micro = MicroBatchNorms(watched.params) if self._track_micro else None
        if self._micro is not None:
            weakref.finalize(self, MicroBatchNorms.remove, self._micro)
        activations = None
        if self._forensics:
            activations = ActivationProbe(self._module, watched, first.device, dtype)
        self._probe = StepProbe(watched, first.device, dtype, activations)
        self._probe_finalizer = weakref.finalize(self, StepProbe.remove, self._probe)
        self.health_detector.bind(watched, self._probe, self._arrivals.positions)

    def _unbind(self) -> None:
        """Remove the hooks :meth:`_bind` installed."""
        self._arrivals.remove()
        self._finalizer.detach()
        self._probe.remove()
        self._probe_finalizer.detach()
        if self._hold is not None:
            self._hold.remove()
        if self._micro is not None:
            self._micro.remove()

    def _refresh(self) -> None:
        """Follow the model after its parameters changed (see :class:`ParamChanges`).

        The same parameters, replaced (``load_state_dict(assign=True)``) or moved to another
        dtype or device, are watched again under the same names, bit-exactly in the new dtype.
        A changed set of names (a module added, a parameter unfrozen) cannot be merged into the
        run's history: the watcher warns once, naming them, and goes on with the original set.
        """
        if self._snapshot is not None:
            self._snapshot.mark_dirty()  # a module added may bring buffers
        current = self._changes.resolve()
        if current.names == self.names:
            same = all(map(operator.is_, current.params, self._watched.params))
            moved = [(p.dtype, p.device) for p in current.params] != self._changes.layout
            if moved or not same:
                self._emission.drain(wait=True)  # every pending row belongs to the old layout
                self._unbind()
                self._bind(current)
            self._changes.track(current)
            return
        watched, now = set(self.names), set(current.names)
        added = [n for n in current.names if n not in watched]
        gone = [n for n in self.names if n not in now]
        parts = []
        if added:
            parts.append(f"trainable but not watched: {_listed(added)}")
        if gone:
            parts.append(f"watched but no longer trainable in the model: {_listed(gone)}")
        warnings.warn(
            "gradwatch: the model's trainable parameters changed after the GradWatch was "
            f"created ({'; '.join(parts)}). Norms, NaN/Inf checks and clipping keep covering "
            f"the original {len(self.names)} parameters only; create the GradWatch after the "
            "model is final, or close this one and create a new one",
            GradWatchWarning,
            stacklevel=3,
        )
        self._changes.accept()

    def _before_step(self) -> bool:
        self._check(skip_reason=None, from_optimizer=True)
        return not self._last_skip

    def _after_scaler_skip(self) -> None:
        self._check(skip_reason="GradScaler found inf/NaN", from_optimizer=True)

    def _check(self, *, skip_reason: str | None, from_optimizer: bool) -> StepReport:
        self._ensure_open("check")
        if self._changes.changed():
            self._refresh()
        if self._hold is not None:
            self._hold.clear()
        ring = self._ring
        if ring.written - ring.read >= ring.capacity:
            self._emission.drain(wait=True, upto=ring.read)
        number, slot = ring.claim()
        blame = self._blame.take() if self._blame is not None else None
        if blame is None:  # pipeline parallel: flags of the stages' ranks, filled below
            blame = self._collector.next_stage_flags()
        with torch.no_grad():
            batch = self._collector.gather()
            if batch is None:
                slot.row.zero_()
                slot.coef.fill_(1.0)
            else:
                self._collector.param_norms_(batch, slot.norms)
                self._collector.global_norm_(batch, slot.norms, self.norm_type, slot.global_norm)
            has_loss = self._write_loss(slot.loss)
            has_scale = self._write_scale(slot.scale)

            action = None
            if skip_reason is None:
                skip_reason, action = self._decide(slot)
            self._last_skip = skip_reason is not None
            if batch is not None and not self._last_skip:
                self._clip(batch, slot)
            elif self._writes_coef:
                slot.coef.fill_(1.0)
            if action == "skipped" and not from_optimizer and batch is not None:
                self._hold.skip()  # type: ignore[union-attr]
            if self._snapshot is not None:
                if self._last_skip:
                    self._restore_buffers()
                else:
                    self._snapshot.take()
        ring.commit(number)

        # Resolved through self: a report not yet filled keeps its watcher (hooks, sinks) alive.
        report = StepReport._deferred(
            self._step, lambda: self._emission.drain(wait=True, upto=number)
        )
        emission = self._emission
        emission.add(
            number,
            Pending(
                report,
                [] if batch is None else batch.positions,
                self._arrivals.snapshot(),
                has_loss,
                has_scale,
                skip_reason,
                action or ("skipped" if skip_reason else None),
                self._micro.take() if self._micro is not None else [],
                blame,
                self._probe.capture(self._guard),
            ),
        )
        self._step += 1
        self._micro_batches = 0
        self._arrivals.clear()
        if action == "raise":
            emission.drain(wait=True, upto=number)
            raise policy_error(report)
        emission.scan()
        return report

    def _write_loss(self, out: torch.Tensor) -> bool:
        losses = self._micro_losses
        if not losses:
            return False
        if len(losses) == 1:
            loss = losses[0]
        else:
            loss = torch.stack(
                [torch.as_tensor(v, dtype=out.dtype, device=out.device) for v in losses]
            ).mean()
        if isinstance(loss, torch.Tensor):
            out.copy_(loss.reshape(()))
        else:
            out.fill_(float(loss))
        self._micro_losses = []
        return True

    def _write_scale(self, out: torch.Tensor) -> bool:
        scaler = self._guard.scaler if self._guard is not None else None
        scale = getattr(scaler, "_scale", None)
        if scale is None:
            return False
        out.copy_(scale.reshape(()))
        return True

    def _restore_buffers(self) -> None:
        failed = self._snapshot.restore()  # type: ignore[union-attr]
        if failed:
            warnings.warn(
                f"gradwatch: step {self._step} was skipped, but {len(failed)} buffer(s) of the "
                "model could not be put back and keep what this step's forward pass wrote: "
                f"{_listed(failed)}",
                GradWatchWarning,
                stacklevel=_outside_gradwatch(),
            )

    def _decide(self, slot: Slot) -> tuple[str | None, str | None]:
        """Skip/raise decisions that must be made now. The only place the host waits.

        In a distributed run the decision is all-reduced, so every rank skips (or raises) together.
        """
        needs_spike = self.on_spike in ("skip", "raise")
        if self.on_nonfinite == "warn" and not needs_spike:
            return None, None
        reason, action = self._local_decision(slot, needs_spike)
        if is_distributed() and any_rank(reason is not None, slot.row.device) and reason is None:
            raising = "raise" in (self.on_nonfinite, self.on_spike)
            reason, action = "decided on another rank", "raise" if raising else "skipped"
        return reason, action

    def _local_decision(self, slot: Slot, needs_spike: bool) -> tuple[str | None, str | None]:
        global_norm = float(slot.global_norm)  # sync: a policy must decide now
        if not math.isfinite(global_norm) and self.on_nonfinite != "warn":
            if self.on_nonfinite == "raise":
                return "non-finite gradient", "raise"
            return "non-finite gradient", "skipped"
        if needs_spike:
            self._emission.judge(wait=True)  # detector state must include every earlier step
            threshold = self.spike_detector.threshold
            if threshold is not None and global_norm > threshold:
                if self.on_spike == "raise":
                    return "gradient norm spike", "raise"
                return "gradient norm spike", "skipped"
        return None, None

    def _clip(self, batch: Any, slot: Slot) -> None:
        if self.clipper is not None:
            self.clipper.clip_(batch, slot.global_norm, slot.norms, slot.coef)
        if self.on_spike == "clip":
            self._emission.judge(wait=True)  # the threshold depends on every earlier step
            threshold = self.spike_detector.threshold
            if self.clipper is None:
                slot.coef.fill_(1.0)
            if threshold is None:
                return
            current = slot.global_norm * slot.coef
            coef = (current + EPS).reciprocal_().mul_(threshold).clamp_(max=1.0)
            scale_(batch, coef)
            slot.coef.mul_(coef)

    # ------------------------------------------------------------------------------- helpers

    def _ensure_open(self, what: str) -> None:
        if self._closed:
            raise StateError(f"{what}() called after close(); create a new GradWatch")

    def _run_start(self, layer_depth: int | None) -> RunStart:
        params = tuple(
            ParamInfo(n, tuple(p.shape), str(p.dtype).replace("torch.", ""))
            for n, p in zip(self.names, self._watched.params)
        )
        config = {
            "clip": self.clipper.config() if self.clipper is not None else None,
            "on_nonfinite": self.on_nonfinite,
            "on_spike": self.on_spike,
            "norm_type": self.norm_type,
            "accumulation_steps": self.accumulation_steps,
            "layer_depth": layer_depth,
            "spike_detector": {
                "alpha": self.spike_detector.alpha,
                "z_threshold": self.spike_detector.z_threshold,
                "warmup": self.spike_detector.warmup,
            },
        }
        return RunStart(__version__, torch.__version__, params, config, time.time())


def _close_at_exit(ref: weakref.ReferenceType[GradWatch]) -> Any:
    """An atexit hook closing the watcher if the program ends without ``close()``."""

    def hook() -> None:
        watch = ref()
        if watch is not None and not getattr(watch, "_closed", True):  # True: __init__ failed
            with contextlib.suppress(Exception):
                watch.close()

    return hook


def _detached(loss: Any) -> Any:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ConfigError(
                f"loss must be a scalar (one element), got a tensor of shape {tuple(loss.shape)}: "
                "reduce it first (e.g. loss.mean()) and pass what you backpropagate"
            )
        return loss.detach()
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise ConfigTypeError(f"loss must be a tensor or a number, got {type(loss).__name__}")


def _listed(names: list[str], most: int = 5) -> str:
    more = f" (+{len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more
