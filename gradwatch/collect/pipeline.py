"""Pipeline parallel: the process group joining the stages, and what each rank knows of it.

Under pipeline parallelism (``torch.distributed.pipelining``, or stages placed on ranks by hand)
a rank holds only its stage's parameters. The true global norm is over every stage: each stage
reduces its own gradients to one number (the p-th power of its norm, or its largest element for
the inf-norm), the stages exchange those numbers in one all-reduce over the pipeline group, and
every stage computes the same global norm from them, so clipping scales every stage by the same
factor and a skip/raise decision taken on it is the same everywhere (torchtitan's
``clip_grad_norm_(..., pp_mesh)`` does the same by hand). The exchanged numbers also say which
stage a NaN/Inf came from.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from gradwatch.collect.distributed import is_distributed
from gradwatch.errors import ConfigError, ConfigTypeError

__all__ = ["PipelineStages", "resolve_pipeline_group"]


def resolve_pipeline_group(name: str, value: Any) -> dist.ProcessGroup | None:
    """The pipeline process group from a ``ProcessGroup`` or a 1-D ``DeviceMesh``, or None.

    Args:
        name: The argument's name, for error messages.
        value: None, a ``torch.distributed.ProcessGroup`` or a 1-D ``DeviceMesh`` (``mesh["pp"]``).

    Raises:
        ConfigTypeError: ``value`` is neither.
        ConfigError: torch.distributed is not initialised, or the mesh is not 1-D.
    """
    if value is None:
        return None
    if not is_distributed():
        raise ConfigError(
            f"{name} needs an initialised torch.distributed run "
            "(call torch.distributed.init_process_group first), got a process group without one"
        )
    if isinstance(value, dist.ProcessGroup):
        return value
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(value, DeviceMesh):
        if value.ndim != 1:
            raise ConfigError(
                f"{name} must be a 1-D DeviceMesh (the pipeline dimension, e.g. mesh['pp']), "
                f"got a {value.ndim}-D mesh with dims {value.mesh_dim_names}"
            )
        return value.get_group()
    raise ConfigTypeError(
        f"{name} must be a torch.distributed ProcessGroup or a 1-D DeviceMesh such as "
        f"mesh['pp'], got {type(value).__name__}"
    )


class PipelineStages:
    """This rank's place in the pipeline group, and the per-step exchange between stages.

    Args:
        group: The pipeline process group (one rank per stage).
        device: Where the exchanged numbers live (the statistics device).
        dtype: Their dtype (the statistics dtype).
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype) -> None:
        self.group = group
        self.stage = dist.get_rank(group)
        self.stages = dist.get_world_size(group)
        self.ranks = [dist.get_global_rank(group, i) for i in range(self.stages)]
        self.device = device
        self.dtype = dtype
        self._ranks = torch.tensor(self.ranks, device=device)
        self._world = dist.get_world_size()

    def new_flags(self) -> torch.Tensor:
        """Zeroed flags, one per global rank, that :meth:`combine` marks for non-finite stages."""
        return torch.zeros(self._world, dtype=torch.int32, device=self.device)

    def combine(
        self, local: torch.Tensor, norm_type: float, flags: torch.Tensor | None
    ) -> torch.Tensor:
        """The global norm over all stages from this stage's norm ``local`` (0-d). A collective.

        Each stage writes the p-th power of its norm (its norm, for the inf-norm) into its own
        slot of a zero vector; summing the vectors (one all-reduce) leaves every slot exact, so
        every stage computes the same result from the same numbers. Stages whose slot is NaN/Inf
        are marked in ``flags`` at their global rank.
        """
        slots = torch.zeros(self.stages, device=self.device, dtype=self.dtype)
        value = local if norm_type in (1.0, float("inf")) else local.pow(norm_type)
        slots[self.stage] = value
        dist.all_reduce(slots, group=self.group)
        if flags is not None:
            flags.index_copy_(0, self._ranks, (~torch.isfinite(slots)).to(flags.dtype))
        if norm_type == float("inf"):
            return slots.amax()
        total = slots.sum()
        return total if norm_type == 1.0 else total.pow(1.0 / norm_type)
