"""One read pass over the gradients: per-parameter norms and the global norm, on device.

Gradients are grouped by (device, dtype) once, from the parameters (autograd and ``.grad``
assignment keep a gradient's device and dtype equal to its parameter's), and each group is reduced
by one ``torch._foreach_norm`` call, the same kernels ``torch.nn.utils.clip_grad_norm_`` uses.
Norms of half-precision gradients are accumulated in float32. Nothing here reads a value back to
the host.

Sharded gradients (FSDP2, HSDP, tensor parallel: DTensors) are grouped by mesh and placements as
well; their per-shard norms become the norms of the full gradients, and stage norms become the
global norm under pipeline parallelism, in one collective per step for all parameters
(:mod:`gradwatch.collect.meshes`, :mod:`gradwatch.collect.pipeline`). In-place operations
(clipping) act on the local shards.

Gradients are read from ``p.grad`` unless the watcher is told where they are (``grad_attr``: an
attribute such as Megatron's ``main_grad``, or a callable).

Sparse (COO) gradients, e.g. of ``nn.Embedding(sparse=True)``, live in groups of their own: the
norm of a sparse gradient is the norm of its coalesced values, which is the norm of its dense
equivalent. A parameter's gradient layout is not known from the parameter, so it is learnt: when
the norms of a plain group fail because a gradient in it came sparse, that parameter moves to a
sparse group for good and the step is regrouped. Dense models never pay for this.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat

import torch
from torch import Tensor

from gradwatch.collect.distributed import is_dtensor
from gradwatch.collect.kernels import foreach_norms, has_foreach, norm_dtype, sparse_values
from gradwatch.collect.meshes import mesh_reduction
from gradwatch.collect.pipeline import PipelineStages, Share, StageLayout
from gradwatch.collect.reduce import NormReduction
from gradwatch.errors import ConfigError, ConfigTypeError

__all__ = [
    "GradAttr",
    "GradBatch",
    "GradCollector",
    "GradGroup",
    "foreach_norms",
    "group_key",
    "has_foreach",
    "resolve_grad_attr",
    "sparse_values",
]

GradAttr = str | Callable[[Tensor], Tensor | None]
"""Where a parameter's gradient is: an attribute (``"grad"``, ``"main_grad"``) or a callable."""


def resolve_grad_attr(name: str, value: object) -> GradAttr:
    """``value`` checked as a :data:`GradAttr`.

    Raises:
        ConfigError: A string that is not an attribute name.
        ConfigTypeError: Neither a string nor a callable.
    """
    if isinstance(value, str):
        if not value.isidentifier():
            raise ConfigError(
                f"{name} must be the name of the parameters' gradient attribute, such as "
                f"'grad' or 'main_grad', got {value!r}"
            )
        return value
    if callable(value):
        return value  # type: ignore[return-value]
    raise ConfigTypeError(
        f"{name} must be an attribute name such as 'main_grad' or a callable "
        f"param -> Tensor | None, got {type(value).__name__}"
    )


@dataclass
class GradGroup:
    """Gradients of one (device, dtype[, mesh][, sparse]) group.

    Attributes:
        device: Device of the local tensors.
        params: The parameters (DTensors when sharded: use ``to_local()`` for their shard).
        grads: Local gradient tensors (the shard, for DTensors), for in-place operations.
        sharded: The DTensor gradients when the group is sharded, else None.
        positions: Watcher positions of the group's parameters.
        sparse: True for a group of parameters whose gradients come sparse (COO): foreach
            kernels do not take them, so in-place operations go tensor by tensor, on the values.
            Such a group may also hold a dense gradient (a parameter's layout can change).
        counted: For a sharded group, whether this rank's shards count towards the full norms
            (False on the copies along a ``Replicate`` mesh dimension).
    """

    device: torch.device
    params: list[Tensor]
    grads: list[Tensor]
    sharded: list[Tensor] | None
    positions: list[int]
    sparse: bool = False
    counted: bool = True

    def norms(self, norm_type: float) -> Tensor:
        """1-D tensor: the norm of each full gradient of the group (one collective if sharded)."""
        if self.sparse:
            values = [sparse_values(g) for g in self.grads]
            return torch.stack(foreach_norms(self.device, values, norm_type))
        if self.sharded is None:
            return torch.stack(foreach_norms(self.device, self.grads, norm_type))
        partial = torch.stack(list(torch._foreach_norm(self.sharded, norm_type)))
        return partial.full_tensor().to(norm_dtype(partial.dtype))


@dataclass
class GradBatch:
    """The gradients present at one step, grouped for foreach kernels.

    Attributes:
        params: Parameters that have a gradient, in the watcher's order.
        positions: Their positions in the watcher's parameter list (None when all are present).
        groups: The same gradients grouped by device and dtype (and mesh, when sharded).
        l2_norms: The present gradients' L2 norms in group order, once computed (None when they
            were written straight into the stats row).
        total: The global norm (of the collector's order) when it was computed with the norms,
            in the same collective (sharded or pipeline-parallel runs), else None.
        reduce: For sharded or pipeline-parallel runs, the function turning groups into
            ``(full L2 norms, global norm)`` with one collective; None when norms are local.
    """

    params: list[Tensor]
    positions: list[int] | None
    groups: list[GradGroup]
    l2_norms: Tensor | None = None
    total: Tensor | None = None
    reduce: Callable[[list[GradGroup], float], tuple[Tensor, Tensor]] | None = None

    def grouped(self) -> list[tuple[torch.device, list[Tensor]]]:
        """``(device, local grads)`` per group, the unit in-place foreach kernels operate on."""
        return [(g.device, g.grads) for g in self.groups]

    def total_norm(self, norm_type: float, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Norm of all (full) gradients as one vector, as a 0-d tensor on ``device``."""
        if self.reduce is not None:
            return self.reduce(self.groups, norm_type)[1].to(device, dtype, non_blocking=True)
        norms = [g.norms(norm_type).to(device, dtype, non_blocking=True) for g in self.groups]
        return torch.linalg.vector_norm(torch.cat(norms), norm_type)


class GradCollector:
    """Reads the gradients of a fixed list of parameters and reduces them to norms.

    Args:
        params: The watched parameters, in the order norms are stored.
        device: Where the statistics live (the first parameter's local device).
        dtype: Dtype of the statistics buffer (float32, or float64 if any parameter is float64).
        norm_type: Order of the global norm (computed with the per-parameter norms, in the same
            collective, when the norms need one).
        grad_attr: Where the gradients are (see :data:`GradAttr`).
        pipeline: Under pipeline parallelism, every stage's parameters (the
            :class:`~gradwatch.collect.pipeline.StageLayout` gathered over the pipeline group),
            else None.
    """

    def __init__(
        self,
        params: list[Tensor],
        device: torch.device,
        dtype: torch.dtype,
        *,
        norm_type: float = 2.0,
        grad_attr: GradAttr = "grad",
        pipeline: StageLayout | None = None,
    ) -> None:
        self.params = params
        self.device = device
        self.dtype = dtype
        self.norm_type = norm_type
        self._grad_attr = grad_attr
        stages = None if pipeline is None else PipelineStages(pipeline, device, dtype)
        dtensors = [p for p in params if is_dtensor(p)]
        mesh = mesh_reduction(dtensors, over_root=stages is None) if dtensors else None
        self._stages, self._mesh = stages, mesh
        # Norms that need a collective (sharded or pipeline-parallel): reduced all at once.
        self._reduction = None
        if stages is not None or dtensors:
            self._reduction = NormReduction(device, dtype, mesh, stages)
        self._reduced = self._reduction is not None
        self._sparse: set[int] = set()  # positions whose gradients were seen sparse
        self._build_layout()

    def _grads(self, params: list[Tensor]) -> list[Tensor | None]:
        """The gradients of ``params``, read where ``grad_attr`` says."""
        attr = self._grad_attr
        if attr == "grad":
            return [p.grad for p in params]
        if isinstance(attr, str):
            return [getattr(p, attr, None) for p in params]
        return [attr(p) for p in params]

    def _build_layout(self) -> None:
        """Group the parameters by :func:`group_key`, the sparse ones apart."""
        params, device, dtype = self.params, self.device, self.dtype
        layout: dict[tuple[object, ...], list[int]] = {}
        for i, p in enumerate(params):
            layout.setdefault(group_key(p), []).append(i)
        if self._sparse:
            layout = _split_sparse(layout, self._sparse)
        self._layout = layout
        self.sharded = any(key[2] is not None for key in layout)
        # Fast path: one plain group whose norms can be stacked straight into the row.
        key = next(iter(layout))
        self._direct = (
            not self._reduced
            and len(layout) == 1
            and key[2] is None
            and not key[3]
            and key[0] == device
            and norm_dtype(key[1]) == dtype  # type: ignore[arg-type]
        )
        order = [i for idx in layout.values() for i in idx]
        self._identity_order = order == list(range(len(params)))
        self._all_order = torch.tensor(order, device=device)

    def gather(self) -> GradBatch | None:
        """The gradients present now, grouped; None if no parameter has a gradient."""
        params = self.params
        grads = self._grads(params)
        reduce = self._reduction
        if all(map(operator.is_not, grads, repeat(None))):
            if self._direct:
                group = GradGroup(self.device, params, grads, None, [])
                return GradBatch(params, None, [group])
            groups = [
                self._group([params[i] for i in idx], [grads[i] for i in idx], idx, key[3])
                for key, idx in self._layout.items()
            ]
            return GradBatch(params, None, groups, reduce=reduce)
        positions = [i for i, g in enumerate(grads) if g is not None]
        if not positions:
            # A stage without gradients still joins the step's collective.
            return GradBatch([], [], [], reduce=reduce) if self._stages is not None else None
        by_key: dict[tuple[object, ...], list[int]] = {}
        for i in positions:
            by_key.setdefault(group_key(params[i]), []).append(i)
        if self._sparse:
            by_key = _split_sparse(by_key, self._sparse)
        groups = [
            self._group([params[i] for i in idx], [grads[i] for i in idx], idx, key[3])
            for key, idx in by_key.items()
        ]
        return GradBatch([params[i] for i in positions], positions, groups, reduce=reduce)

    def _group(
        self, params: list[Tensor], grads: list[Tensor], positions: list[int], sparse: object
    ) -> GradGroup:
        """One group; ``sparse`` is the group key's sparse flag."""
        if sparse:
            return GradGroup(grads[0].device, params, grads, None, positions, sparse=True)
        if is_dtensor(params[0]):
            local_grads = [g.to_local() for g in grads]
            counted = self._mesh is None or self._mesh.counts(params[0])
            device = local_grads[0].device
            return GradGroup(device, params, local_grads, grads, positions, counted=counted)
        return GradGroup(grads[0].device, params, grads, None, positions)

    def _learn_sparse(self) -> bool:
        """Move the parameters whose gradient is sparse now into sparse groups.

        Returns:
            True if any parameter moved (the layout was rebuilt), False if none is new.
        """
        found = {
            i
            for i, g in enumerate(self._grads(self.params))
            if g is not None and g.is_sparse and i not in self._sparse
        }
        if not found:
            return False
        self._sparse |= found
        self._build_layout()
        return True

    def param_norms_(
        self,
        batch: GradBatch,
        out: Tensor,
        shared: Tensor | None = None,
        loss: Tensor | None = None,
    ) -> None:
        """Write the L2 norm of every (full) gradient into ``out``, one slot per parameter.

        Parameters without a gradient get 0. This is the step's first read of the gradients: a
        gradient that came sparse in a plain group makes the kernels fail; its parameter then
        moves to a sparse group (see :meth:`_learn_sparse`) and ``batch`` is regrouped in place,
        so the clippers that receive it next see the new groups.

        Args:
            batch: The step's gradients (:meth:`gather`).
            out: One slot per watched parameter.
            shared: Pipeline parallel: receives what the stages share in the same collective
                as the global norm (their losses, every stage's parameter norms; see
                :data:`~gradwatch.collect.pipeline.SHARED_NORMS`).
            loss: Pipeline parallel: this stage's loss (0-d), or None.
        """
        batch.l2_norms = None
        try:  # free until it raises: dense models pay nothing for the sparse fallback
            if self._direct and batch.positions is None:
                (group,) = batch.groups
                torch.stack(foreach_norms(self.device, group.grads, 2.0), out=out)
                return
            order = None
            if self._reduced:
                reduction = self._reduction
                share = None
                if shared is not None and self._stages is not None:
                    columns = order = self._order(batch)

                    def share(norms: Tensor) -> Share:
                        return Share(norms, columns, shared, loss)

                norms, batch.total = reduction(batch.groups, self.norm_type, share)  # type: ignore[misc]
            else:
                norms = torch.cat(
                    [
                        g.norms(2.0).to(self.device, self.dtype, non_blocking=True)
                        for g in batch.groups
                    ]
                )
        except (NotImplementedError, RuntimeError):
            if not self._learn_sparse():
                raise
            regrouped = self.gather()
            if regrouped is None:  # pragma: no cover - the gradients were there a moment ago
                raise
            batch.params, batch.positions = regrouped.params, regrouped.positions
            batch.groups = regrouped.groups
            self.param_norms_(batch, out, shared, loss)
            return
        batch.l2_norms = norms  # the present norms in group order: torch reduces them so
        if batch.positions is None and self._identity_order:
            out.copy_(norms)
            return
        out.zero_()
        out.index_copy_(0, self._order(batch) if order is None else order, norms)

    def _order(self, batch: GradBatch) -> Tensor:
        """The watched position of each of ``batch``'s gradients, in group order."""
        if batch.positions is None:
            return self._all_order
        return torch.tensor(
            [i for g in batch.groups for i in g.positions], dtype=torch.long, device=self.device
        )

    def global_norm_(
        self, batch: GradBatch, param_norms: Tensor, norm_type: float, out: Tensor
    ) -> None:
        """Write the norm of all gradients as one vector (order ``norm_type``) into ``out``.

        For the L2 norm this reuses the per-parameter norms already computed: the norm of the
        vector of per-parameter norms is the norm of all gradients concatenated. When the norms
        needed a collective, the global norm came with them (:attr:`GradBatch.total`).
        """
        if batch.total is not None and norm_type == self.norm_type:
            out.copy_(batch.total)
            return
        if norm_type == 2.0 and not self._reduced:
            # Same values in the same order as torch's get_total_norm: bit-identical results.
            present = param_norms if batch.l2_norms is None else batch.l2_norms
            torch.linalg.vector_norm(present, 2.0, out=out)
            return
        out.copy_(batch.total_norm(norm_type, self.device, self.dtype))

    @staticmethod
    def statistics_dtype(params: list[Tensor]) -> torch.dtype:
        """float64 if any parameter is float64 (so its norm is exact), else float32."""
        return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def group_key(param: Tensor) -> tuple[object, ...]:
    """(device, dtype, mesh, sparse) of a parameter's gradient; mesh is None for plain tensors.

    ``sparse`` is always False here: only the gradients tell, see :func:`_split_sparse`.
    """
    if is_dtensor(param):
        local = param.to_local()  # type: ignore[attr-defined]
        mesh = param.device_mesh  # type: ignore[attr-defined]
        return (local.device, param.dtype, (id(mesh), tuple(param.placements)), False)  # type: ignore[attr-defined]
    return (param.device, param.dtype, None, False)


def _split_sparse(
    layout: dict[tuple[object, ...], list[int]], sparse: set[int]
) -> dict[tuple[object, ...], list[int]]:
    """``layout`` with the ``sparse`` positions moved to groups keyed ``(..., True)``."""
    split: dict[tuple[object, ...], list[int]] = {}
    for key, idx in layout.items():
        for i in idx:
            split.setdefault((*key[:3], i in sparse), []).append(i)
    return split
