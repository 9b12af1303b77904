"""GradWatch: the one object a training loop talks to.

It composes the parts and nothing else: :class:`~gradwatch.WatchSettings` (checked arguments),
the step path (:mod:`gradwatch.step_path`: norms, policy, clipping on the device) and the emission
(:mod:`gradwatch.emission`), which brings rows to the host later (at once on CPU, about a step
later on accelerators) and only then runs them through the detectors and out to the sinks. The
step path never waits for the device, except where a policy must decide now (``on_nonfinite`` or
``on_spike`` set to ``"skip"``/``"raise"``, ``on_spike="clip"``).
"""

from __future__ import annotations

import atexit
import contextlib
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from gradwatch.act.clip import Clipper
from gradwatch.collect.distributed import is_distributed, rank, unwrap_model
from gradwatch.collect.norms import GradAttr
from gradwatch.collect.params import resolve_params
from gradwatch.collect.pipeline import StageLayout
from gradwatch.detect.health import HealthDetector
from gradwatch.detect.spikes import ParamBaseline, SpikeDetector
from gradwatch.diagnosis import diagnose
from gradwatch.emission import Emission
from gradwatch.errors import StateError
from gradwatch.records import Finding, RunSummary, StepReport
from gradwatch.report.sink import Sink, SinkGroup
from gradwatch.report.stats import StepAggregator
from gradwatch.settings import WatchSettings, check_state
from gradwatch.step_path import StepPath, detached_loss
from gradwatch.step_result import StepResult
from gradwatch.validation import NonFinitePolicy, SpikePolicy, check_instance, check_sinks

__all__ = ["BackwardScope", "GradWatch"]


class BackwardScope:
    """Handle yielded by :meth:`GradWatch.backward`; ``report`` is set when a check ran on exit."""

    report: StepResult | None = None


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
            every stage (one all-reduce per step), every report lists every stage's parameters
            (so the logging rank shows the whole model), and ``nonfinite_ranks`` names the
            ranks of the stages a NaN/Inf came from. Create the watchers of all stages at the
            same point of the program: they exchange their parameters' names then.
        grad_attr: Where the gradients are: ``"grad"``, another attribute of the parameters
            (Megatron-style ``"main_grad"``) or a callable ``param -> Tensor | None``.

    Attributes:
        settings: The validated settings (:class:`~gradwatch.WatchSettings`), fixed for the run.
        names: Names of the watched parameters, in ``named_parameters()`` order (this stage's,
            under pipeline parallelism; the reports name every stage's).
        spike_detector, loss_detector, health_detector: The detectors this watcher feeds.

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
        settings = WatchSettings(
            clip, on_nonfinite, on_spike, norm_type, accumulation_steps, history, layer_depth,
            log_rank, rank_blame, track_micro_batches, forensics, pipeline_group, grad_attr,
        )  # fmt: skip
        check_instance("spike_detector", spike_detector, SpikeDetector)
        check_instance("loss_detector", loss_detector, SpikeDetector)
        check_instance("health_detector", health_detector, HealthDetector)
        if sinks is None:
            from gradwatch.report.console import ConsoleSink

            sinks = [ConsoleSink()]
        check_sinks("sinks", sinks)
        watched = resolve_params(unwrap_model(model))
        self.settings = settings
        self.names = watched.names
        self.spike_detector = spike_detector or SpikeDetector()
        self.loss_detector = loss_detector or SpikeDetector()
        self.health_detector = health_detector or HealthDetector()
        if log_rank is not None and is_distributed() and rank() != log_rank:
            sinks = []  # statistics are still computed here; only log_rank reports them
        self._sinks = SinkGroup(sinks)
        # Never closed by the user: close the sinks when collected, close fully at exit.
        self._sink_finalizer = weakref.finalize(self, SinkGroup.close, self._sinks)
        self._exit_hook = _close_at_exit(weakref.ref(self))
        atexit.register(self._exit_hook)
        params = watched.infos()
        stages = None  # under pipeline parallelism, every stage's parameters, reported together
        if settings.pipeline_group is not None:
            stages = StageLayout.gather(settings.pipeline_group, params, watched.owner_types)
        reported = params if stages is None else stages.params
        owner_types = watched.owner_types if stages is None else stages.owner_types
        reported_names = tuple(p.name for p in reported)
        self._emission = Emission(
            self.names,
            dict(zip(reported_names, owner_types)),
            sinks=self._sinks,
            spike_detector=self.spike_detector,
            loss_detector=self.loss_detector,
            health_detector=self.health_detector,
            baseline=ParamBaseline(len(reported), alpha=self.spike_detector.alpha),
            aggregator=StepAggregator(reported_names, depth=layer_depth),
            history=settings.history,
            on_nonfinite=settings.on_nonfinite,
            norm_type=settings.norm_type,
            clip=clip.config() if clip is not None else None,
            stages=stages,
        )
        self._path = StepPath(
            settings, model, watched, self._emission, self.health_detector, stages
        )
        self._closed = False
        self._emission.start(settings.run_start(reported, self.spike_detector))

    # ----------------------------------------------------------------------------- public API

    @property
    def step(self) -> int:
        """Number of steps checked so far (the next report's ``step``)."""
        return self._path.step

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
        self._path.attach(optimizer, scaler)
        return self

    def detach(self) -> None:
        """Stop guarding the attached optimizer (no-op if none)."""
        if self._path.guard is not None:
            self._path.guard.remove()
            self._path.guard = None

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
        detached = (
            detached_loss(loss) if loss is not None else None
        )  # validate before backward runs
        path = self._path
        if path.micro_batches == 0:
            path.bound.arrivals.clear()
        micro = path.bound.micro
        if micro is not None:
            micro.begin()
        scope = BackwardScope()
        yield scope
        if micro is not None:
            micro.end()
        if detached is not None:
            path.micro_losses.append(detached)
        path.micro_batches += 1
        if path.guard is None and path.micro_batches >= self.settings.accumulation_steps:
            scope.report = path.check(skip_reason=None, from_optimizer=False)

    def check(self, loss: Any = None) -> StepResult:
        """Check the gradients present now: norms, NaN/Inf, spikes; clip; apply policies.

        Works whether or not a backward pass was seen by the hooks. Without an attached optimizer
        a "skip" decision zeroes the gradients in place, so a hand-written update adds nothing,
        and hides them (``p.grad = None``) from every torch optimizer step until the next
        backward, so the following ``optimizer.step()`` changes nothing either, momentum and
        Adam state included. Buffers are put back as they were after the last step.

        Args:
            loss: This step's loss (a one-element tensor or a float), or None.

        Returns:
            The step's report, as a :class:`~gradwatch.StepResult`: it reads as the
            :class:`~gradwatch.StepReport`, whose numbers are copied to the host on first access.

        Raises:
            NonFiniteGradientError: ``on_nonfinite="raise"`` and a gradient holds NaN/Inf.
            GradientSpikeError: ``on_spike="raise"`` and the global norm is a spike.
            StateError: The watcher is closed.
        """
        self._ensure_open("check")
        if loss is not None:
            self._path.micro_losses.append(detached_loss(loss))
        return self._path.check(skip_reason=None, from_optimizer=False)

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
        clip = self.settings.clip
        return diagnose(self.health_detector.report(), clip=clip.config() if clip else None)

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
        self._path.remove()
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
            "step": self._path.step,
            "names": list(self.names),
            "spike_detector": self.spike_detector.state_dict(),
            "loss_detector": self.loss_detector.state_dict(),
            "baseline": self._emission.baseline.state_dict(),
            "clip": self.settings.clip.state_dict() if self.settings.clip is not None else {},
            "health": self.health_detector.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output, e.g. when resuming from a checkpoint.

        Raises:
            ValueError: The state was saved from a watcher over different parameters.
        """
        check_state(state, self.names)
        self.flush()
        self._path.step = int(state["step"])
        self.spike_detector.load_state_dict(state["spike_detector"])
        self.loss_detector.load_state_dict(state["loss_detector"])
        self._emission.baseline.load_state_dict(state["baseline"])
        if self.settings.clip is not None:
            self.settings.clip.load_state_dict(state["clip"])
        if "health" in state:
            self.health_detector.load_state_dict(state["health"])

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step={self._path.step}"
        return (
            f"GradWatch({len(self.names)} params, clip={self.settings.clip!r}, "
            f"on_nonfinite={self.settings.on_nonfinite!r}, "
            f"on_spike={self.settings.on_spike!r}, {state})"
        )

    # ------------------------------------------------------------------------------- helpers

    def _ensure_open(self, what: str) -> None:
        if self._closed:
            raise StateError(f"{what}() called after close(); create a new GradWatch")


def _close_at_exit(ref: weakref.ReferenceType[GradWatch]) -> Any:
    """An atexit hook closing the watcher if the program ends without ``close()``."""

    def hook() -> None:
        watch = ref()
        if watch is not None and not getattr(watch, "_closed", True):  # True: __init__ failed
            with contextlib.suppress(Exception):
                watch.close()

    return hook
