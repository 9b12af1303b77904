"""Pipeline parallel: the process group joining the stages, and what each rank knows of it.

Under pipeline parallelism (``torch.distributed.pipelining``, or stages placed on ranks by hand)
a rank holds only its stage's parameters. The true global norm is over every stage: each stage
reduces its own gradients to one number (the p-th power of its norm, or its largest element for
the inf-norm), the stages exchange those numbers in one all-reduce over the pipeline group, and
every stage computes the same global norm from them, so clipping scales every stage by the same
factor and a skip/raise decision taken on it is the same everywhere (torchtitan's
``clip_grad_norm_(..., pp_mesh)`` does the same by hand). The exchanged numbers also say which
stage a NaN/Inf came from.

The same all-reduce carries every stage's per-parameter norms, so each stage's reports cover the
whole model under the parameters' names (:class:`StageLayout`, gathered once when the watcher is
created): the logging rank sees every layer at no extra collective, and a NaN is named wherever
it started.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from gradwatch.collect.distributed import is_distributed
from gradwatch.errors import ConfigError, ConfigTypeError
from gradwatch.records import ParamInfo

__all__ = [
    "ABSENT",
    "SHARED_LOSS",
    "SHARED_LOSSES",
    "SHARED_NORMS",
    "PipelineStages",
    "Share",
    "StageLayout",
    "resolve_pipeline_group",
]

ABSENT = -1.0
"""A parameter without a gradient at a step, in the shared norms (a norm is never negative)."""

SHARED_LOSS, SHARED_LOSSES, SHARED_NORMS = 0, 1, 2
"""Layout of what the stages share at each step besides their norms (the last columns of a stats
row): the sum of the stages' losses, how many stages had one, then every stage's parameter norms
in :class:`StageLayout` order."""


class Share(NamedTuple):
    """What a stage sends along with its norm, and where every stage's comes back.

    Attributes:
        norms: This stage's per-parameter L2 norms (those with a gradient).
        columns: Their positions in the stage's parameter list.
        out: Receives :data:`SHARED_NORMS` + every stage's parameter count numbers.
        loss: This stage's loss (0-d), or None: usually only the last stage computes one.
    """

    norms: torch.Tensor
    columns: torch.Tensor
    out: torch.Tensor
    loss: torch.Tensor | None


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


@dataclass(frozen=True)
class StageLayout:
    """Every stage's watched parameters, in stage order: the columns of the whole model.

    Built once per watcher by :meth:`gather` (one collective, when the watcher is created), so a
    stage that later rebuilds its watched tensors alone (a dtype change) joins no collective the
    others do not.

    Attributes:
        group: The pipeline process group.
        stage: This rank's stage (its rank in ``group``).
        ranks: The global rank of each stage.
        params: Every stage's parameters, stage 0's first. Where two stages use the same name
            (stages built as separate modules, each counting from ``0.weight``), every name is
            prefixed with its stage, ``stage1.0.weight``.
        owner_types: Class name of the module owning each of ``params``.
        blocks: Each stage's columns in ``params``.
    """

    group: Any
    stage: int
    ranks: tuple[int, ...]
    params: tuple[ParamInfo, ...]
    owner_types: tuple[str, ...]
    blocks: tuple[slice, ...]

    @classmethod
    def gather(
        cls, group: dist.ProcessGroup, params: Sequence[ParamInfo], owner_types: Sequence[str]
    ) -> StageLayout:
        """Exchange the stages' parameters (names, shapes, dtypes, owner types) over ``group``.

        A collective: every stage's watcher must be created at the same point of the program.
        """
        stages = dist.get_world_size(group)
        gathered: list[Any] = [None] * stages
        dist.all_gather_object(gathered, (tuple(params), tuple(owner_types)), group=group)
        names = [p.name for stage_params, _ in gathered for p in stage_params]
        prefix = len(set(names)) != len(names)
        everyone: list[ParamInfo] = []
        types: list[str] = []
        blocks: list[slice] = []
        for index, (stage_params, stage_types) in enumerate(gathered):
            start = len(everyone)
            for p in stage_params:
                name = f"stage{index}.{p.name}" if prefix else p.name
                everyone.append(ParamInfo(name, tuple(p.shape), p.dtype))
            types.extend(stage_types)
            blocks.append(slice(start, len(everyone)))
        return cls(
            group=group,
            stage=dist.get_rank(group),
            ranks=tuple(dist.get_global_rank(group, i) for i in range(stages)),
            params=tuple(everyone),
            owner_types=tuple(types),
            blocks=tuple(blocks),
        )

    @cached_property
    def names(self) -> tuple[str, ...]:
        """Every stage's parameter names, stage 0's first."""
        return tuple(p.name for p in self.params)

    @property
    def shared(self) -> int:
        """How many numbers the stages share at each step (:data:`SHARED_NORMS` onwards)."""
        return SHARED_NORMS + len(self.params)

    @property
    def own(self) -> slice:
        """This stage's columns."""
        return self.blocks[self.stage]

    def stage_of(self, column: int) -> int:
        """The stage holding the parameter in ``column``."""
        return next(i for i, block in enumerate(self.blocks) if block.start <= column < block.stop)


class PipelineStages:
    """This rank's place in the pipeline group, and the per-step exchange between stages.

    Args:
        layout: Every stage's parameters (:meth:`StageLayout.gather`).
        device: Where the exchanged numbers live (the statistics device).
        dtype: Their dtype (the statistics dtype).
    """

    def __init__(self, layout: StageLayout, device: torch.device, dtype: torch.dtype) -> None:
        self.layout = layout
        self.group = layout.group
        self.stage = layout.stage
        self.stages = len(layout.ranks)
        self.ranks = list(layout.ranks)
        self.device = device
        self.dtype = dtype
        own = layout.own
        start = self.stages + SHARED_NORMS
        self._buffer = torch.zeros(start + len(layout.params), device=device, dtype=dtype)
        self._own = self._buffer[start + own.start : start + own.stop]
        self._loss = self._buffer[self.stages + SHARED_LOSS]
        self._losses = self._buffer[self.stages + SHARED_LOSSES]

    def combine(
        self,
        local: torch.Tensor,
        norm_type: float,
        *,
        share: Share | None = None,
    ) -> torch.Tensor:
        """The global norm over all stages from this stage's norm ``local`` (0-d). A collective.

        Each stage writes the p-th power of its norm (its norm, for the inf-norm) into its own
        slot of a zero vector; summing the vectors (one all-reduce) leaves every slot exact, so
        every stage computes the same result from the same numbers.

        Args:
            local: This stage's norm of order ``norm_type``.
            norm_type: Order of the norms.
            share: What this stage sends along in the same all-reduce (its per-parameter norms,
                its loss), and where every stage's go. Every stage must pass one, or none.
        """
        if share is None:
            slots = torch.zeros(self.stages, device=self.device, dtype=self.dtype)
        else:
            self._buffer.zero_()
            self._own.fill_(ABSENT)
            self._own.index_copy_(0, share.columns, share.norms)
            if share.loss is not None:
                self._loss.copy_(share.loss)
                self._losses.fill_(1.0)
            slots = self._buffer[: self.stages]
        value = local if norm_type in (1.0, float("inf")) else local.pow(norm_type)
        slots[self.stage] = value
        dist.all_reduce(slots if share is None else self._buffer, group=self.group)
        if share is not None:
            share.out.copy_(self._buffer[self.stages :])
        if norm_type == float("inf"):
            return slots.amax()
        total = slots.sum()
        return total if norm_type == 1.0 else total.pow(1.0 / norm_type)
