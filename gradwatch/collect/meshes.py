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

__all__ = ["MeshReduction", "mesh_reduction"]


class MeshReduction:
    """How this rank's shard norms become full norms: the group to reduce over, who counts what.

    Args:
        group: A process group covering every mesh of the sharded parameters (None: the world).
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self._counts: dict[tuple[int, tuple[Any, ...]], bool] = {}

    def counts(self, param: Any) -> bool:
        """Whether this rank contributes ``param``'s shard (coordinate 0 on its Replicate dims)."""
        key = (id(param.device_mesh), tuple(param.placements))
        found = self._counts.get(key)
        if found is None:
            coordinate = param.device_mesh.get_coordinate() or []
            found = all(c == 0 for c, p in zip(coordinate, param.placements) if p.is_replicate())
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


def mesh_reduction(params: list[Tensor]) -> MeshReduction | None:
    """The reduction for ``params``' DTensor meshes; None if one collective cannot cover them.

    The group is the world when every mesh spans all ranks, else the (flattened) group of the
    one mesh they share. Parameters on different meshes that do not each span the world keep
    DTensor's own reduction (correct, one collective per mesh and placement).
    """
    meshes = {id(p.device_mesh): p.device_mesh for p in params}  # type: ignore[attr-defined]
    world = dist.get_world_size()
    if all(mesh.size() == world for mesh in meshes.values()):
        return MeshReduction(None)
    if len(meshes) != 1:
        return None
    (mesh,) = meshes.values()
    if mesh.ndim == 1:
        return MeshReduction(mesh.get_group())
    flatten = getattr(mesh, "_flatten", None)
    if flatten is None:  # pragma: no cover - older torch
        return None
    return MeshReduction(flatten().get_group())


def _all_gather(output: Tensor, local: Tensor, group: dist.ProcessGroup | None) -> None:
    """``all_gather_single`` where torch has it, else ``all_gather_into_tensor``."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local, group=group)
