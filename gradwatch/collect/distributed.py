"""torch.distributed support: full norms of sharded gradients, consistent decisions, rank blame.

gradwatch uses ``torch.distributed`` as its scale-out engine and adds nothing of its own:

* **DDP**: by the time gradwatch checks (before ``optimizer.step()`` or after backward), DDP has
  all-reduced the gradients, so every rank sees the same, synchronised gradients and computes the
  same norms with no extra communication.
* **FSDP2, HSDP, tensor parallel** (DTensors on any mesh): the norm of every parameter's *full*
  gradient comes from the shards' squared norms summed in one all-reduce per step for all
  parameters, each shard counted once (:mod:`gradwatch.collect.meshes`).
* **Pipeline parallel**: the stages' norms are combined over the pipeline group in one
  all-reduce (:mod:`gradwatch.collect.pipeline`), so every stage sees the global norm.
* **Decisions** (``"skip"``/``"raise"``) are all-reduced (max) so that no rank steps while another
  skips, which would desynchronise the replicas or deadlock the next collective.
* **Rank blame** (opt-in): a DDP communication hook checks each rank's *local* gradient bucket for
  NaN/Inf before the all-reduce, so a NaN produced on one rank is attributed to that rank. Cost:
  one extra read of the gradient memory per step (an ``isfinite().all()`` per bucket) plus one
  tiny all-gather of flags per step; no host synchronisation.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "RankBlame",
    "any_rank",
    "is_distributed",
    "is_dtensor",
    "rank",
    "unwrap_model",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 outside distributed runs)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 outside distributed runs)."""
    return dist.get_world_size() if is_distributed() else 1


def is_dtensor(tensor: Tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2/tensor-parallel parameters).

    Never imports ``torch.distributed.tensor`` (0.7-9 s on first import): a DTensor can only
    exist once that package was imported, so until then the answer is False.
    """
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)  # None also while the package is importing
    return dtensor is not None and isinstance(tensor, dtensor)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is True on any rank. A collective: every rank must call it."""
    if world_size() == 1:
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)  # a decision is being made: the one allowed sync


def unwrap_model(model: Any) -> Any:
    """The user's module inside ``DistributedDataParallel`` / ``torch.compile`` wrappers.

    Their parameter names (``module.``/``_orig_mod.`` prefixes) are not the names users know.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
    return model


class RankBlame:
    """A DDP communication hook that records which ranks had NaN/Inf before the all-reduce.

    Register it with :meth:`install` before the first backward. After each backward, :meth:`take`
    returns a device tensor with one 0/1 flag per rank (gathered asynchronously, read only when
    the step turned out non-finite) and resets the local flag.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._local_bad = torch.zeros((), dtype=torch.int32, device=device)

    def install(self, ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
        """Register the hook on ``ddp_model`` (averaging all-reduce, as DDP's default)."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
            buffer = bucket.buffer()
            self._local_bad |= (~torch.isfinite(buffer).all()).to(torch.int32)
            return allreduce_hook(state, bucket)

        # DDP validates the hook's annotations as objects; this module's are strings.
        hook.__annotations__ = {
            "state": object,
            "bucket": dist.GradBucket,
            "return": torch.futures.Future[torch.Tensor],
        }
        ddp_model.register_comm_hook(None, hook)

    def take(self) -> Tensor:
        """Flags of all ranks for the step just finished (a collective: every rank calls it)."""
        flags = torch.zeros(world_size(), dtype=torch.int32, device=self.device)
        _all_gather_single(flags, self._local_bad.reshape(1))
        self._local_bad.zero_()
        return flags


def _all_gather_single(output: Tensor, local: Tensor) -> None:
    """``dist.all_gather_single`` where torch has it (``all_gather_into_tensor`` is deprecated
    there, with a FutureWarning), else ``all_gather_into_tensor`` (its older name)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local)
