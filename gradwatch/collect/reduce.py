"""Local gradient norms to full norms and the global norm, in one collective per step.

Plain gradients are complete on every rank and need nothing. Sharded (DTensor) gradients need
their shards' norms combined over the mesh (:mod:`gradwatch.collect.meshes`), and under
pipeline parallelism the stages' norms over the pipeline group
(:mod:`gradwatch.collect.pipeline`). :class:`NormReduction` does both for a step's groups: one
collective, or two when a pipeline stage is itself sharded (its mesh's, then the stages').
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradwatch.collect.kernels import foreach_norms, sparse_values
from gradwatch.collect.meshes import MeshReduction
from gradwatch.collect.pipeline import PipelineStages, Share

__all__ = ["NormReduction"]


class NormReduction:
    """Turns a step's gradient groups into ``(full L2 norms, global norm)``.

    Args:
        device: Where the statistics live.
        dtype: Their dtype.
        mesh: How shard norms become full norms; None when no parameter is sharded or when
            one collective cannot cover the meshes (DTensor's own reduction is used then).
        stages: The pipeline stages to combine, or None.
    """

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        mesh: MeshReduction | None,
        stages: PipelineStages | None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.mesh = mesh
        self.stages = stages

    def __call__(
        self,
        groups: list[Any],
        norm_type: float,
        share: Callable[[Tensor], Share] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(L2 norm of every full gradient in group order, global norm of order ``norm_type``).

        Args:
            groups: The step's :class:`~gradwatch.collect.norms.GradGroup` objects.
            norm_type: Order of the global norm.
            share: Pipeline only: what this stage sends along, given its norms in group order
                (:meth:`~gradwatch.collect.pipeline.PipelineStages.combine`).
        """
        device, dtype = self.device, self.dtype
        l2 = [_local_norms(g, 2.0, device, dtype) for g in groups]
        lp = l2 if norm_type == 2.0 else [_local_norms(g, norm_type, device, dtype) for g in groups]
        sharded = [i for i, g in enumerate(groups) if g.sharded is not None]
        complete = [i for i, g in enumerate(groups) if g.sharded is None]
        terms: list[Tensor] = []
        if sharded and self.mesh is None:  # meshes one collective cannot cover: DTensor's way
            for i in sharded:
                l2[i] = groups[i].norms(2.0).to(device, dtype)
                lp[i] = l2[i] if norm_type == 2.0 else groups[i].norms(norm_type).to(device, dtype)
            complete = list(range(len(groups)))
        elif sharded:
            squares = torch.cat([l2[i].square() for i in sharded])
            powers = None if norm_type == 2.0 else _powers([lp[i] for i in sharded], norm_type)
            full, powers = self.mesh.reduce(squares, powers, norm_type)  # type: ignore[union-attr]
            parts = full.sqrt().split([l2[i].numel() for i in sharded])
            for i, part in zip(sharded, parts):
                l2[i] = part
            if powers is not None:
                terms.append(powers.reshape(()))
        norms = torch.cat(l2) if l2 else torch.zeros(0, device=device, dtype=dtype)
        if norm_type == 2.0:
            total = torch.linalg.vector_norm(norms, 2.0)
        else:
            if complete:
                terms.append(_powers([lp[i] for i in complete], norm_type))
            if not terms:
                total = torch.zeros((), device=device, dtype=dtype)
            elif norm_type == math.inf:
                total = torch.stack(terms).amax()
            else:
                total = torch.stack(terms).sum().pow(1.0 / norm_type)
        if self.stages is not None:
            sent = None if share is None else share(norms)
            total = self.stages.combine(total, norm_type, share=sent)
        return norms, total


def _local_norms(group: Any, norm_type: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """1-D: the norm of each of ``group``'s local tensors (zeros for shards this rank does not
    count), on ``device`` in ``dtype``."""
    if not group.counted:
        return torch.zeros(len(group.grads), device=device, dtype=dtype)
    values = [sparse_values(g) for g in group.grads] if group.sparse else group.grads
    if norm_type == math.inf and group.sharded is not None:
        # An uneven split leaves some ranks empty shards, which have no largest element.
        values = [v if v.numel() else v.new_zeros(1) for v in values]
    norms = torch.stack(foreach_norms(group.device, values, norm_type))
    return norms.to(device, dtype, non_blocking=True)


def _powers(norms: list[Tensor], norm_type: float) -> Tensor:
    """Sum of the p-th powers of the ``norms`` (their maximum for the inf-norm), as a 1-element
    tensor: what the global norm of their tensors is made of."""
    joined = torch.cat(norms)
    if norm_type == math.inf:
        return joined.amax().reshape(1) if joined.numel() else joined.new_zeros(1)
    return joined.pow(norm_type).sum().reshape(1)
