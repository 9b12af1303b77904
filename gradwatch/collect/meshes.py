"""Full norms of sharded (DTensor) gradients on any device mesh, in one collective per step.

A DTensor gradient on a mesh is split along its ``Shard`` mesh dimensions and copied along its
``Replicate`` ones (HSDP's replicate dimension, a TP-replicated bias or norm weight). The p-th
power of a full gradient's norm is the sum of its shards' p-th powers, each shard counted once:
so the ranks whose coordinate is 0 on every ``Replicate`` dimension of a parameter's placements
contribute its shard's p-th power, the others contribute 0, and one all-reduce (sum) over a
group covering the mesh gives every full norm, for all parameters and placements at once.

This replaces DTensor's own route (``full_tensor()`` of the partial norms), which runs one
all-reduce per sharded mesh dimension and per placement group, and warns about sequential
all-reduces on a 2-D mesh (FSDP2 + TP). The inf-norm of the shards is a maximum, not a sum: it
travels with the squares in one all-gather instead, and is combined on every rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["MeshReduction", "full_l2_norms", "mesh_reduction"]


class MeshReduction:
    """How this rank's shard norms become full norms: the group to reduce over, who counts what.

    Args:
        group: A process group covering every mesh of the sharded parameters (None: the world).
        over_root: Whether ``group`` covers the mesh the parameters' meshes were sliced from
            (else only their own mesh).
    """

    def __init__(self, group: dist.ProcessGroup | None, over_root: bool = True) -> None:
        self.group = group
        self.over_root = over_root
        self._counts: dict[tuple[int, tuple[Any, ...]], bool] = {}

    def counts(self, param: Any) -> bool:
        """Whether this rank contributes ``param``'s shard to the full norm.

        It does when its coordinate is 0 on every ``Replicate`` dimension of the parameter's
        mesh and, for a mesh sliced from a larger one (``mesh["dp"]`` of a dp × tp mesh), on
        every dimension of the larger mesh the slice leaves out (the shard is copied there too).
        """
        mesh = param.device_mesh
        key = (id(mesh), tuple(param.placements))
        found = self._counts.get(key)
        if found is None:
            coordinate = mesh.get_coordinate() or []
            found = all(c == 0 for c, p in zip(coordinate, param.placements) if p.is_replicate())
            root = mesh._get_root_mesh()
            if root is not mesh and self.over_root:
                kept = set(mesh.mesh_dim_names)
                found &= all(
                    c == 0
                    for c, name in zip(root.get_coordinate(), root.mesh_dim_names)
                    if name not in kept
                )
            self._counts[key] = found
        return found

    def reduce(
        self, squares: Tensor, powers: Tensor | None, norm_type: float
    ) -> tuple[Tensor, Tensor | None]:
        """Sum ``squares`` (and ``powers``, a 1-element tensor) over the group. One collective.

        Args:
            squares: The counted shards' squared L2 norms (zeros where this rank does not count).
            powers: The counted shards' sum of p-th powers for the global norm (their largest
                element for the inf-norm), or None when the global norm is the L2 norm.
            norm_type: The global norm's order.

        Returns:
            The full squared L2 norms, and the combined ``powers`` (or None).
        """
        send = squares if powers is None else torch.cat([squares, powers])
        if norm_type != math.inf or powers is None:
            dist.all_reduce(send, group=self.group)
            return send[: squares.numel()], None if powers is None else send[squares.numel() :]
        size = dist.get_world_size(self.group)
        gathered = send.new_empty(size * send.numel())
        _all_gather(gathered, send, self.group)
        gathered = gathered.view(size, send.numel())
        return gathered[:, :-1].sum(0), gathered[:, -1:].amax(0)


def mesh_reduction(params: list[Tensor], *, over_root: bool = True) -> MeshReduction | None:
    """The reduction for ``params``' DTensor meshes; None if one collective cannot cover them.

    ``over_root=False`` (a pipeline stage: the mesh the stage's meshes were sliced from spans
    the other stages too, which hold other parameters) reduces over the stage's one mesh.

    Meshes sliced from one mesh (FSDP2 on ``mesh["dp"]`` next to tensor parallel on the whole
    dp × tp mesh) are reduced over that one mesh, provided the parameters use every one of its
    dimensions: a dimension none of them lives on (``pp`` of a pp × dp mesh, when the watcher
    was not told about the pipeline) joins ranks that hold other parameters, so the reduction
    stays on the parameters' own mesh then. The group is the world when the mesh spans all
    ranks, else the mesh's (flattened) group. Parameters on unrelated meshes, or on slices
    whose dimensions have no names, keep DTensor's own reduction (correct, one collective per
    mesh and placement).
    """
    # Equal meshes are one mesh: slicing (mesh["dp"]) makes a new but equal object each time.
    meshes = {p.device_mesh: p.device_mesh for p in params}  # type: ignore[attr-defined]
    roots = {mesh._get_root_mesh(): mesh._get_root_mesh() for mesh in meshes.values()}
    sliced = any(mesh._get_root_mesh() is not mesh for mesh in meshes.values())
    if over_root and len(roots) == 1 and (not sliced or _named(meshes.values())):
        (root,) = roots.values()
        used = {name for mesh in meshes.values() for name in mesh.mesh_dim_names or ()}
        if not sliced or set(root.mesh_dim_names) <= used:
            return MeshReduction(_group(root))
    if len(meshes) != 1:
        return None
    (mesh,) = meshes.values()
    return MeshReduction(_group(mesh), over_root=False)


def full_l2_norms(tensors: list[Tensor]) -> Tensor:
    """L2 norm of each full DTensor of ``tensors`` (any meshes, any placements), 1-D float32 or
    float64 on their local device: one all-reduce, no warning about sequential collectives.

    For occasional use (weight norms sampled every few hundred steps): the reduction is
    planned at every call.
    """
    reduction = mesh_reduction(tensors)
    half = tensors[0].dtype in (torch.float16, torch.bfloat16)
    dtype = torch.float32 if half else tensors[0].dtype
    if reduction is None:  # meshes one collective cannot cover: DTensor's own way, per mesh
        return torch.stack([t.norm(dtype=dtype).full_tensor() for t in tensors])
    local = [t.to_local() for t in tensors]
    norms = torch.stack(torch._foreach_norm(local, 2.0, dtype=dtype if half else None))
    counted = torch.tensor([reduction.counts(t) for t in tensors], device=norms.device)
    squares = torch.where(counted, norms.square(), 0.0)
    full, _ = reduction.reduce(squares, None, 2.0)
    return full.sqrt()


def _group(mesh: Any) -> dist.ProcessGroup | None:
    """The process group of all of ``mesh``'s ranks: None (the world) when it spans all ranks,
    else its own group (its flattened mesh's, if it is n-D)."""
    if mesh.size() == dist.get_world_size():
        return None
    return mesh.get_group() if mesh.ndim == 1 else mesh._flatten().get_group()


def _named(meshes: Any) -> bool:
    """Whether every mesh and its root name their dimensions (a slice is matched by name)."""
    return all(
        m.mesh_dim_names is not None and m._get_root_mesh().mesh_dim_names is not None
        for m in meshes
    )


def _all_gather(output: Tensor, local: Tensor, group: dist.ProcessGroup | None) -> None:
    """``all_gather_single`` where torch has it, else ``all_gather_into_tensor``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local, group=group)
