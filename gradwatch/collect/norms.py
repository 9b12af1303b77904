"""One read pass over the gradients: per-parameter norms and the global norm, on device.

Gradients are grouped by (device, dtype) once, from the parameters (autograd and ``.grad``
assignment keep a gradient's device and dtype equal to its parameter's), and each group is reduced
by one ``torch._foreach_norm`` call, the same kernels ``torch.nn.utils.clip_grad_norm_`` uses.
Norms of half-precision gradients are accumulated in float32. Nothing here reads a value back to
the host.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from itertools import repeat

import torch
from torch import Tensor
from torch.utils._foreach_utils import _device_has_foreach_support

__all__ = ["GradBatch", "GradCollector", "foreach_norms", "has_foreach"]

_HALF = (torch.float16, torch.bfloat16)


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a gradient's norm: float32 for half types, else its own."""
    return torch.float32 if dtype in _HALF else dtype


@dataclass
class GradBatch:
    """The gradients present at one step, with their parameters, grouped for foreach kernels.

    Attributes:
        params: Parameters that have a gradient, in the watcher's order.
        grads: Their gradients, same order.
        positions: Their positions in the watcher's parameter list (None when all are present).
        groups: ``(device, dtype) -> (params, grads)`` of the same tensors, for foreach kernels.
    """

    params: list[Tensor]
    grads: list[Tensor]
    positions: list[int] | None
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]]

    def grouped(self) -> list[tuple[torch.device, list[Tensor]]]:
        """``(device, grads)`` per group, the unit foreach kernels operate on."""
        return [(device, grads) for (device, _), (_, grads) in self.groups.items()]


@functools.cache
def has_foreach(device: torch.device) -> bool:
    """Whether foreach kernels run on ``device`` (cached: the answer never changes)."""
    return _device_has_foreach_support(device)


def foreach_norms(device: torch.device, grads: list[Tensor], norm_type: float) -> list[Tensor]:
    """Norm of each tensor (0-d tensors), one fused kernel where the device supports it."""
    dtype = _norm_dtype(grads[0].dtype)
    if has_foreach(device) and not grads[0].is_sparse:
        if dtype is grads[0].dtype:
            return list(torch._foreach_norm(grads, norm_type))
        return list(torch._foreach_norm(grads, norm_type, dtype=dtype))
    return [torch.linalg.vector_norm(g, norm_type, dtype=dtype) for g in grads]


class GradCollector:
    """Reads the gradients of a fixed list of parameters and reduces them to norms.

    Args:
        params: The watched parameters, in the order norms are stored.
        device: Where the statistics live (the first parameter's device).
        dtype: Dtype of the statistics buffer (float32, or float64 if any parameter is float64).
    """

    def __init__(self, params: list[Tensor], device: torch.device, dtype: torch.dtype) -> None:
        self.params = params
        self.device = device
        self.dtype = dtype
        layout: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            layout.setdefault((p.device, p.dtype), []).append(i)
        self._layout = layout
        # The all-present fast path: one group whose norms can be stacked straight into the row.
        key = next(iter(layout))
        self._single_group = len(layout) == 1
        self._direct = self._single_group and key[0] == device and _norm_dtype(key[1]) == dtype
        self._all_order: Tensor | None = None

    def gather(self) -> GradBatch | None:
        """The gradients present now, grouped; None if no parameter has a gradient."""
        params = self.params
        grads = [p.grad for p in params]
        if all(map(operator.is_not, grads, repeat(None))):
            if self._single_group:
                key = next(iter(self._layout))
                groups = {key: (params, grads)}
            else:
                groups = {
                    key: ([params[i] for i in idx], [grads[i] for i in idx])
                    for key, idx in self._layout.items()
                }
            return GradBatch(params, grads, None, groups)
        positions = [i for i, g in enumerate(grads) if g is not None]
        if not positions:
            return None
        present_params = [params[i] for i in positions]
        present_grads = [grads[i] for i in positions]
        groups = {}
        for p, g in zip(present_params, present_grads):
            entry = groups.setdefault((g.device, g.dtype), ([], []))
            entry[0].append(p)
            entry[1].append(g)
        return GradBatch(present_params, present_grads, positions, groups)

    def param_norms_(self, batch: GradBatch, out: Tensor) -> None:
        """Write the L2 norm of every gradient into ``out`` (one slot per watched parameter).

        Parameters without a gradient get 0.
        """
        if self._direct and batch.positions is None:
            ((device, grads),) = batch.grouped()
            torch.stack(foreach_norms(device, grads, 2.0), out=out)
            return
        norms = [
            n.to(self.device, self.dtype, non_blocking=True)
            for device, grads in batch.grouped()
            for n in foreach_norms(device, grads, 2.0)
        ]
        stacked = torch.stack(norms)
        order = self._order(batch)
        if batch.positions is None and order is None:
            out.copy_(stacked)
            return
        out.zero_()
        out.index_copy_(0, order, stacked)

    def _order(self, batch: GradBatch) -> Tensor | None:
        """Positions (in watcher order) of the norms as ``param_norms_`` stacks them."""
        if batch.positions is None:
            if self._single_group:
                return None
            if self._all_order is None:
                flat = [i for idx in self._layout.values() for i in idx]
                self._all_order = torch.tensor(flat, device=self.device)
            return self._all_order
        index = {id(p): i for i, p in enumerate(self.params)}
        flat = [index[id(p)] for params, _ in batch.groups.values() for p in params]
        return torch.tensor(flat, device=self.device)

    def global_norm_(
        self, batch: GradBatch, param_norms: Tensor, norm_type: float, out: Tensor
    ) -> None:
        """Write the norm of all gradients as one vector (order ``norm_type``) into ``out``.

        For the L2 norm this reuses the per-parameter norms already computed: the norm of the
        vector of per-parameter norms is the norm of all gradients concatenated.
        """
        if norm_type == 2.0:
            torch.linalg.vector_norm(param_norms, 2.0, out=out)
            return
        norms = [
            n.to(self.device, self.dtype, non_blocking=True)
            for device, grads in batch.grouped()
            for n in foreach_norms(device, grads, norm_type)
        ]
        out.copy_(torch.linalg.vector_norm(torch.stack(norms), norm_type))

    @staticmethod
    def statistics_dtype(params: list[Tensor]) -> torch.dtype:
        """float64 if any parameter is float64 (so its norm is exact), else float32."""
        return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
