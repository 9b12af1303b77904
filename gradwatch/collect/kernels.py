"""The norm kernels: one fused ``torch._foreach_norm`` per group, float32 for half types.

The same kernels ``torch.nn.utils.clip_grad_norm_`` uses; sparse (COO) tensors are reduced to
their coalesced values, which have the norm of their dense equivalent.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.utils._foreach_utils import _device_has_foreach_support

__all__ = ["foreach_norms", "has_foreach", "norm_dtype", "sparse_values"]

_HALF = (torch.float16, torch.bfloat16)


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of a gradient's norm: float32 for half types, else its own."""
    return torch.float32 if dtype in _HALF else dtype


@functools.cache
def has_foreach(device: torch.device) -> bool:
    """Whether foreach kernels run on ``device`` (cached: the answer never changes)."""
    return _device_has_foreach_support(device)


def foreach_norms(device: torch.device, grads: list[Tensor], norm_type: float) -> list[Tensor]:
    """Norm of each dense tensor (0-d tensors), one fused kernel where the device supports it.

    Sparse tensors are not accepted here: see :func:`sparse_values`.
    """
    dtype = norm_dtype(grads[0].dtype)
    if has_foreach(device):
        if dtype is grads[0].dtype:
            return list(torch._foreach_norm(grads, norm_type))
        return list(torch._foreach_norm(grads, norm_type, dtype=dtype))
    return [torch.linalg.vector_norm(g, norm_type, dtype=dtype) for g in grads]


def sparse_values(grad: Tensor) -> Tensor:
    """A dense tensor with the same norm (of any order) as ``grad``, dense or sparse COO.

    For a sparse gradient: its coalesced values (duplicate indices summed, as in the dense
    equivalent), or one zero when it stores nothing. A dense gradient is returned as it is.
    """
    if not grad.is_sparse:
        return grad
    values = grad.coalesce().values()
    return values if values.numel() else values.new_zeros(1)
