"""Adaptive gradient clipping (AGC, NFNets): each output unit clipped relative to its weight.

A follower of the :class:`~gradwatch.act.clip.Clipper` protocol and its hot-path rules: every
decision is a device op, nothing is read back to the host, and a unit whose gradient norm is
non-finite is left unscaled for the watcher's ``on_nonfinite`` policy to handle.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from gradwatch.act.clip import Clipper
from gradwatch.collect.kernels import foreach_norms, norm_dtype, sparse_values
from gradwatch.collect.norms import GradBatch
from gradwatch.errors import ConfigError, ConfigTypeError, StateError
from gradwatch.validation import check_positive

__all__ = ["ClipUnitwise"]


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

    settings = ("clipping", "eps", "exclude")

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
        acc = norm_dtype(grad.dtype)
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

    @property
    def exclude(self) -> tuple[str, ...]:
        """What ``exclude`` named: parameter names, module class names, ``tensor(shape)``."""
        return tuple(self._labels)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _unit_norms(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """L2 norm of each slice along dim 0 (kept dims, float32 for half types)."""
    dtype = norm_dtype(x.dtype)  # complex tensors keep dtype=None: their norm is real
    return torch.linalg.vector_norm(
        x, 2.0, dim=dims, keepdim=True, dtype=None if dtype is x.dtype else dtype
    )
