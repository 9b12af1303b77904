"""Adaptive clippers: thresholds that follow the run instead of a fixed ``max_norm``.

:class:`ClipZScore` (ZClip) clips the global norm when it is an outlier against an exponential
moving mean and variance; :class:`ClipPercentile` (AutoClip) clips it to a percentile of the norms
seen so far; :class:`ClipUnitwise` (AGC) clips each output unit's gradient relative to its weight.

They follow the :class:`~gradwatch.act.clip.Clipper` protocol and its hot-path rules: every
decision is a device op (``torch.where``, ``clamp``), state lives in device tensors allocated on
the first step where the norms live, and nothing is read back to the host. A non-finite norm never
enters the state and never yields a coefficient: that step is left unscaled (coefficient 1) for
the watcher's ``on_nonfinite`` policy to handle.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from gradwatch.act.clip import EPS, Clipper, scale_
from gradwatch.collect.norms import GradBatch, foreach_norms, sparse_values
from gradwatch.config import (
    check_choice,
    check_int,
    check_norm_type,
    check_positive,
    check_probability,
)
from gradwatch.errors import ConfigError, ConfigTypeError, StateError

__all__ = ["ClipPercentile", "ClipUnitwise", "ClipZScore", "ZScoreMode"]

ZScoreMode = Literal["reciprocal", "fixed"]
"""ZClip's threshold rule: ``mean + z_thr²/z · std`` (its default) or ``mean + z_thr · std``."""

ZSCORE_MODES: tuple[str, ...] = get_args(ZScoreMode)

_Z_EPS = 1e-6
"""ZClip's ``eps`` in ``z = (norm - mean) / (std + eps)``."""


def _state_tensor(state: dict[str, Any], key: str, owner: str) -> Tensor:
    """``state[key]`` as a detached copy, or a ConfigError naming what is missing."""
    if key not in state:
        raise ConfigError(f"{owner} state is missing {key!r}, got keys {sorted(state)}")
    return torch.as_tensor(state[key]).detach().clone()


class ClipZScore(Clipper):
    """Clip the global norm when its z-score against the run's own history is too high (ZClip).

    The first ``warmup`` finite norms initialise the mean and (population) variance and are never
    clipped. After that, with ``std = sqrt(var)`` and ``z = (norm - mean) / (std + 1e-6)``:

    * ``mode="reciprocal"`` (ZClip's default, "adaptive_scaling"): if ``z > z_threshold`` the norm
      is clipped to ``mean + z_threshold² / z · std`` — the larger the outlier, the harder it is
      pulled back.
    * ``mode="fixed"`` (ZClip's "percentile" mode): a norm above ``mean + z_threshold · std`` is
      clipped to that value.

    The statistics are then updated with the norm *after* clipping, in ZClip's order:
    ``mean ← α·mean + (1-α)·x``, then ``var ← α·var + (1-α)·(x - mean)²`` with the new mean.
    The coefficient is that of ``clip_grad_norm_``: ``target / (norm + 1e-6)`` when the norm
    exceeds the target, else 1.

    Only the global norm passed in by the watcher is used, so under DDP/FSDP every rank sees the
    same (reduced) norm, keeps the same state and applies the same coefficient.

    Args:
        alpha: EMA smoothing factor in (0, 1); higher remembers longer.
        z_threshold: z-score above which a norm is clipped, > 0.
        warmup: Number of finite norms that initialise mean and variance (no clipping until then).
        mode: ``"reciprocal"`` or ``"fixed"``, see above.
        max_norm: Optional hard ceiling, as ZClip's ``max_grad_norm``: the norm is also clipped to
            it (during warm-up too); the statistics still see the adaptive value.
        norm_type: Order of the global norm the watcher computes.

    Raises:
        ValueError, TypeError: An argument is out of range or of the wrong type.

    References:
        Kumar, Abbas, Koutsoukos, Hamid et al., "ZClip: Adaptive Spike Mitigation for LLM
        Pre-Training", arXiv:2504.02507, 2025; reference code github.com/bluorion-com/ZClip.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup: int = 25,
        *,
        mode: ZScoreMode = "reciprocal",
        max_norm: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        self.alpha = check_probability("ClipZScore(alpha)", alpha)
        self.z_threshold = check_positive("ClipZScore(z_threshold)", z_threshold)
        self.warmup = check_int("ClipZScore(warmup)", warmup)
        self.mode = check_choice("ClipZScore(mode)", mode, ZSCORE_MODES)
        self.max_norm = (
            None if max_norm is None else check_positive("ClipZScore(max_norm)", max_norm)
        )
        self.norm_type = check_norm_type("ClipZScore(norm_type)", norm_type)
        self._count: Tensor | None = None
        self._mean: Tensor | None = None
        self._var: Tensor | None = None

    def _state_on(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Count, mean, var on ``like``'s device and dtype (allocated or moved once)."""
        if self._count is None or self._mean is None or self._var is None:
            self._count = torch.zeros((), dtype=torch.int64, device=like.device)
            self._mean = torch.zeros((), dtype=like.dtype, device=like.device)
            self._var = torch.zeros((), dtype=like.dtype, device=like.device)
        elif self._mean.device != like.device or self._mean.dtype != like.dtype:
            self._count = self._count.to(like.device, torch.int64)
            self._mean = self._mean.to(like.device, like.dtype)
            self._var = self._var.to(like.device, like.dtype)
        return self._count, self._mean, self._var

    def clip_(self, batch: GradBatch, total_norm: Tensor, param_norms: Tensor, out: Tensor) -> None:
        count, mean, var = self._state_on(total_norm)
        norm, zt = total_norm, self.z_threshold
        finite = torch.isfinite(norm)
        ready = count >= self.warmup
        std = var.sqrt()
        if self.mode == "reciprocal":
            z = (norm - mean) / (std + _Z_EPS)
            outlier = z > zt
            bound = mean + (zt * std) / (z / zt)
        else:
            bound = mean + zt * std
            outlier = norm > bound
        # The value the norm is clipped to, and the value the statistics see.
        target = torch.where(outlier & ready & finite, bound, norm)
        allowed = target if self.max_norm is None else target.clamp(max=self.max_norm)
        out.copy_(torch.where(finite & (norm > allowed), allowed / (norm + EPS), 1.0))
        scale_(batch, out)

        # Warm-up: running mean and population variance (Welford), equal at the end of warm-up
        # to ZClip's initialisation from the buffered norms. After: ZClip's EMA update.
        n = (count + 1).to(mean.dtype)
        warm_mean = mean + (target - mean) / n
        warm_var = var + ((target - mean) * (target - warm_mean) - var) / n
        ema_mean = self.alpha * mean + (1.0 - self.alpha) * target
        ema_var = self.alpha * var + (1.0 - self.alpha) * (target - ema_mean) ** 2
        new_mean = torch.where(ready, ema_mean, warm_mean)
        new_var = torch.where(ready, ema_var, warm_var)
        mean.copy_(torch.where(finite, new_mean, mean))
        var.copy_(torch.where(finite, new_var, var))
        count.add_(finite.to(count.dtype))

    def state_dict(self) -> dict[str, Any]:
        """Copies of the finite-norm count, mean and variance ({} before the first step)."""
        if self._count is None or self._mean is None or self._var is None:
            return {}
        return {"count": self._count.clone(), "mean": self._mean.clone(), "var": self._var.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; moved to the norms' device on the next step.

        Raises:
            ValueError: A key is missing.
        """
        if not state:
            self._count = self._mean = self._var = None
            return
        self._count = _state_tensor(state, "count", "ClipZScore").to(torch.int64)
        self._mean = _state_tensor(state, "mean", "ClipZScore")
        self._var = _state_tensor(state, "var", "ClipZScore")

    def config(self) -> dict[str, Any]:
        return {
            "name": "ClipZScore",
            "alpha": self.alpha,
            "z_threshold": self.z_threshold,
            "warmup": self.warmup,
            "mode": self.mode,
            "max_norm": self.max_norm,
            "norm_type": self.norm_type,
        }

    def __repr__(self) -> str:
        return (
            f"ClipZScore(alpha={self.alpha}, z_threshold={self.z_threshold}, "
            f"warmup={self.warmup}, mode={self.mode!r}, max_norm={self.max_norm}, "
            f"norm_type={self.norm_type})"
        )


class ClipPercentile(Clipper):
    """Clip the global norm to a percentile of the norms observed so far (AutoClip).

    At each step the observed (unclipped) norm is appended to the history first, then the
    threshold is ``np.percentile(history, percentile)`` (linear interpolation) and the gradients
    are clipped as ``clip_grad_norm_(params, threshold)`` does: by ``min(threshold / (norm +
    1e-6), 1)``. The published rule keeps every norm; here the history is the last ``history``
    finite norms (a ring buffer on the device). Non-finite norms are not recorded and not clipped.

    Only the global norm passed in by the watcher is used, so under DDP/FSDP every rank keeps the
    same history and applies the same coefficient.

    Args:
        percentile: Percentile of the history to clip to, in [0, 100] (AutoClip used 10).
        history: Number of recent norms kept.
        norm_type: Order of the global norm the watcher computes.

    Raises:
        ValueError, TypeError: An argument is out of range or of the wrong type.

    References:
        Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
        Separation Networks", MLSP 2020, arXiv:2007.14469; reference code
        github.com/pseeth/autoclip (``autoclip.py``).
    """

    def __init__(
        self, percentile: float = 10.0, history: int = 1000, *, norm_type: float = 2.0
    ) -> None:
        if not isinstance(percentile, (int, float)) or isinstance(percentile, bool):
            raise ConfigTypeError(
                f"ClipPercentile(percentile) must be a number in [0, 100], got {percentile!r}"
            )
        if not 0.0 <= float(percentile) <= 100.0:
            raise ConfigError(
                f"ClipPercentile(percentile) must be a number in [0, 100], got {percentile!r}"
            )
        self.percentile = float(percentile)
        self.history = check_int("ClipPercentile(history)", history)
        self.norm_type = check_norm_type("ClipPercentile(norm_type)", norm_type)
        self._count: Tensor | None = None
        self._norms: Tensor | None = None

    def _state_on(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Count and history ring (NaN = empty slot) on ``like``'s device and dtype."""
        if self._count is None or self._norms is None:
            self._count = torch.zeros((), dtype=torch.int64, device=like.device)
            self._norms = torch.full(
                (self.history,), math.nan, dtype=like.dtype, device=like.device
            )
        elif self._norms.device != like.device or self._norms.dtype != like.dtype:
            self._count = self._count.to(like.device, torch.int64)
            self._norms = self._norms.to(like.device, like.dtype)
        return self._count, self._norms

    def clip_(self, batch: GradBatch, total_norm: Tensor, param_norms: Tensor, out: Tensor) -> None:
        count, norms = self._state_on(total_norm)
        finite = torch.isfinite(total_norm)
        slot = torch.remainder(count, self.history).reshape(1)
        kept = norms.index_select(0, slot)
        norms.index_copy_(0, slot, torch.where(finite, total_norm, kept))
        count.add_(finite.to(count.dtype))
        # nanquantile skips the empty (NaN) slots; its linear interpolation is np.percentile's.
        threshold = torch.nanquantile(norms, self.percentile / 100.0)
        coef = (threshold / (total_norm + EPS)).clamp_(max=1.0)
        out.copy_(torch.where(finite, coef, 1.0))
        scale_(batch, out)

    def state_dict(self) -> dict[str, Any]:
        """Copies of the finite-norm count and the history ring ({} before the first step)."""
        if self._count is None or self._norms is None:
            return {}
        return {"count": self._count.clone(), "history": self._norms.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; moved to the norms' device on the next step.

        Raises:
            ValueError: A key is missing, or the history was saved with another length.
        """
        if not state:
            self._count = self._norms = None
            return
        norms = _state_tensor(state, "history", "ClipPercentile")
        if norms.shape != (self.history,):
            raise ConfigError(
                f"ClipPercentile state holds a history of shape {tuple(norms.shape)}, "
                f"this clipper keeps history={self.history}"
            )
        self._count = _state_tensor(state, "count", "ClipPercentile").to(torch.int64)
        self._norms = norms

    def config(self) -> dict[str, Any]:
        return {
            "name": "ClipPercentile",
            "percentile": self.percentile,
            "history": self.history,
            "norm_type": self.norm_type,
        }

    def __repr__(self) -> str:
        return (
            f"ClipPercentile(percentile={self.percentile}, history={self.history}, "
            f"norm_type={self.norm_type})"
        )


ExcludeItem = str | Tensor | nn.Module


class ClipUnitwise(Clipper):
    """Clip each output unit's gradient relative to its weight's norm (AGC, NFNets).

    A unit is a row of a parameter (its slice along dim 0: an output feature of ``nn.Linear``, an
    output channel of ``nn.ConvNd``), or the whole tensor for 1-d and 0-d parameters. For each
    unit, ``max_norm = max(‖W‖, eps) · clipping`` and the gradient is scaled by
    ``max_norm / max(‖G‖, 1e-6)`` unless ``‖G‖ < max_norm`` — timm's ``adaptive_clip_grad``. A
    unit whose gradient norm is non-finite is left unchanged (the published rule would multiply
    it by a NaN or zero factor). The paper leaves the final classifier unclipped: pass it in
    ``exclude``. ``out`` receives the resulting change of the global norm (one more read pass).

    Norms are per parameter (one ``vector_norm`` per ≥2-d tensor, one foreach pass for the
    1-d/0-d ones), computed from the local tensors. Under DDP gradients are already averaged and
    weights replicated, so every rank clips identically. Under FSDP2 (``Shard(0)``) each row lives
    whole on one rank, so ≥2-d parameters are clipped exactly as unsharded; a 1-d/0-d parameter
    is split across ranks and each rank clips its shard as a unit of its own, and ``out`` is the
    local ratio. Under FSDP1 flat parameters have no rows; do not use this clipper there.
    Sparse gradients (``nn.Embedding(sparse=True)``) are clipped as their dense equivalents
    would be, reading only the weight rows the gradient touches.

    Args:
        clipping: Largest allowed ratio ``‖G‖ / ‖W‖`` per unit, > 0 (NFNets: 0.01 for large
            batches, larger for small ones).
        eps: Floor on a unit's weight norm, > 0, so zero-initialised units can still move.
        exclude: Parameters left unclipped: modules (all their parameters), parameter tensors,
            or names/prefixes (``"head"`` matches ``head.weight`` and ``head.bias``). Names need
            :meth:`bind`.

    Raises:
        ValueError, TypeError: An argument is out of range or of the wrong type.

    References:
        Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
        Normalization", ICML 2021, arXiv:2102.06171; timm ``timm/utils/agc.py``.
    """

    def __init__(
        self,
        clipping: float = 0.01,
        eps: float = 1e-3,
        *,
        exclude: ExcludeItem | Iterable[ExcludeItem] = (),
    ) -> None:
        self.clipping = check_positive("ClipUnitwise(clipping)", clipping)
        self.eps = check_positive("ClipUnitwise(eps)", eps)
        if isinstance(exclude, (str, Tensor, nn.Module)):
            items = [exclude]
        elif isinstance(exclude, Iterable):
            items = list(exclude)
        else:
            raise ConfigTypeError(
                "ClipUnitwise(exclude) must be a module, a parameter, a name or an iterable of "
                f"them, got {exclude!r}"
            )
        self._labels: list[str] = []
        self._names: list[str] = []
        self._tensors: list[Tensor] = []  # kept alive so their ids stay theirs
        self._named: list[Tensor] = []  # resolved by bind()
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise ConfigError("ClipUnitwise(exclude) names must be non-empty, got ''")
                self._names.append(item)
                self._labels.append(item)
            elif isinstance(item, nn.Module):
                self._tensors.extend(item.parameters())
                self._labels.append(type(item).__name__)
            elif isinstance(item, Tensor):
                self._tensors.append(item)
                self._labels.append(f"tensor{tuple(item.shape)}")
            else:
                raise ConfigTypeError(
                    "ClipUnitwise(exclude) items must be modules, parameters or parameter "
                    f"names, got {type(item).__name__}"
                )
        self._excluded = {id(t) for t in self._tensors}
        self._bound = not self._names

    def bind(self, named_params: Iterable[tuple[str, Tensor]]) -> ClipUnitwise:
        """Resolve the names in ``exclude`` against ``(name, parameter)`` pairs.

        Args:
            named_params: E.g. ``model.named_parameters()``.

        Returns:
            The clipper, for chaining.

        Raises:
            ValueError: A name matches no parameter.
        """
        pairs = list(named_params)
        named: list[Tensor] = []
        for prefix in self._names:
            hits = [p for n, p in pairs if n == prefix or n.startswith(prefix + ".")]
            if not hits:
                sample = ", ".join(n for n, _ in pairs[:5]) + (", ..." if len(pairs) > 5 else "")
                raise ConfigError(
                    f"ClipUnitwise(exclude) name {prefix!r} matches no parameter; "
                    f"parameters are named {sample}"
                )
            named.extend(hits)
        self._named = named
        self._excluded = {id(t) for t in (*self._tensors, *named)}
        self._bound = True
        return self

    def clip_(self, batch: GradBatch, total_norm: Tensor, param_norms: Tensor, out: Tensor) -> None:
        if not self._bound:
            raise StateError(
                f"ClipUnitwise(exclude={tuple(self._names)!r}) names parameters but was never "
                "bound to them: call .bind(model.named_parameters()), or exclude the modules or "
                "parameters themselves"
            )
        for group in batch.groups:
            device = group.device
            if group.sparse:
                for p, g in zip(group.params, group.grads):
                    if id(p) not in self._excluded:
                        self._clip_sparse_(p.detach(), g)
                continue
            whole_w, whole_g = [], []
            for p, g in zip(group.params, group.grads):
                g = _local(g)
                if id(p) in self._excluded:
                    continue
                if g.ndim <= 1:
                    whole_w.append(_local(p))
                    whole_g.append(g)
                else:
                    self._clip_rows_(_local(p), g)
            if whole_g:
                self._clip_whole_(device, whole_w, whole_g)
        after = batch.total_norm(self.norm_type, out.device, out.dtype)
        changed = torch.isfinite(total_norm) & (after != total_norm)
        out.copy_(torch.where(changed, after / total_norm, 1.0))

    def _factor(self, weight_norm: Tensor, grad_norm: Tensor) -> Tensor:
        """Per-unit scale: 1 below the bound or for a non-finite gradient norm."""
        max_norm = weight_norm.clamp(min=self.eps).mul_(self.clipping)
        clip = (grad_norm >= max_norm) & torch.isfinite(grad_norm)
        return torch.where(clip, max_norm / grad_norm.clamp(min=1e-6), 1.0)

    def _clip_rows_(self, param: Tensor, grad: Tensor) -> None:
        dims = tuple(range(1, grad.ndim))
        factor = self._factor(_unit_norms(param, dims), _unit_norms(grad, dims))
        grad.mul_(factor.to(grad.dtype))

    def _clip_whole_(self, device: torch.device, params: list[Tensor], grads: list[Tensor]) -> None:
        weight_norms = torch.stack(foreach_norms(device, params, 2.0))
        grad_norms = torch.stack(foreach_norms(device, grads, 2.0))
        factors = self._factor(weight_norms.to(grad_norms.dtype), grad_norms).to(grads[0].dtype)
        torch._foreach_mul_(grads, list(factors.unbind()))

    def _clip_sparse_(self, param: Tensor, grad: Tensor) -> None:
        """AGC on one gradient of a sparse group, equal to AGC on its dense equivalent.

        Only the rows stored in the gradient can be clipped (an absent row's norm is 0), so only
        their weight rows are read. A sparse gradient is coalesced in place when it was not: a
        row's norm needs its duplicate entries summed.
        """
        if not grad.is_sparse:  # a parameter of a sparse group may get a dense gradient
            if grad.ndim <= 1:
                self._clip_whole_(grad.device, [param], [grad])
            else:
                self._clip_rows_(param, grad)
            return
        acc = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
        if grad.ndim <= 1:  # one unit: the whole tensor
            weight_norm = torch.linalg.vector_norm(param, 2.0, dtype=acc)
            grad_norm = torch.linalg.vector_norm(sparse_values(grad), 2.0, dtype=acc)
            grad.mul_(self._factor(weight_norm, grad_norm).to(grad.dtype))
            return
        coalesced = grad if grad.is_coalesced() else grad.coalesce()
        rows, values = coalesced.indices()[0], coalesced.values()
        # Entries are sorted by index, so the entries of one row are consecutive.
        present, slot = torch.unique_consecutive(rows, return_inverse=True)
        squares = values.to(acc).square()
        if squares.ndim > 1:
            squares = squares.flatten(1).sum(1)
        grad_norms = squares.new_zeros(present.shape[0]).index_add_(0, slot, squares).sqrt_()
        dims = tuple(range(1, grad.ndim))
        weight_norms = _unit_norms(param.index_select(0, present), dims).reshape(-1)
        factor = self._factor(weight_norms.to(acc), grad_norms).index_select(0, slot)
        values.mul_(factor.reshape(-1, *[1] * (values.ndim - 1)).to(values.dtype))
        if coalesced is not grad:
            grad.copy_(coalesced)

    def config(self) -> dict[str, Any]:
        return {
            "name": "ClipUnitwise",
            "clipping": self.clipping,
            "eps": self.eps,
            "exclude": list(self._labels),
        }

    def __repr__(self) -> str:
        return (
            f"ClipUnitwise(clipping={self.clipping}, eps={self.eps}, "
            f"exclude={tuple(self._labels)!r})"
        )


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _unit_norms(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """L2 norm of each slice along dim 0 (kept dims, float32 for half types)."""
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(x, 2.0, dim=dims, keepdim=True, dtype=dtype)
