"""A hook that runs once a backward pass has finished: where a framework offers no callback.

The Hugging Face ``Trainer`` runs no callback between the last backward of an optimizer step and
its own gradient clipping; :class:`AfterBackward` gives the adapter that moment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["AfterBackward"]


class AfterBackward:
    """Calls ``fn()`` once at the very end of every backward pass that reaches ``params``.

    "The end" means after every gradient has been accumulated into ``.grad`` and after the
    callbacks other parts of torch queue for the end of the pass: DDP waits for its all-reduce
    there, so ``fn`` sees the synchronised gradients. Backward passes nested inside another (the
    recomputation of reentrant activation checkpointing) are ignored: ``fn`` runs once, at the end
    of the outermost pass.

    This is the hook a framework lacks when it offers no callback between the last backward and
    its own gradient clipping (the Hugging Face ``Trainer``). It relies on torch's autograd engine
    callback queue, the mechanism DDP and FSDP use for the same purpose.

    Args:
        params: Parameters whose gradients mark a backward pass (those not requiring grad are
            ignored).
        fn: Called with no arguments at the end of each outermost backward pass.
    """

    def __init__(self, params: Iterable[torch.Tensor], fn: Callable[[], None]) -> None:
        self._fn = fn
        self._task = -1
        self._engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
        self._handles = [p.register_hook(self._on_grad) for p in params if p.requires_grad]

    def _on_grad(self, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:  # first gradient of this pass: ask to be called at its end
            self._task = task
            self._engine.queue_callback(self._requeue)

    def _requeue(self) -> None:
        # Callbacks queued during the pass (DDP's) run in order after this one; queue again so
        # that fn runs after all of them.
        self._engine.queue_callback(self._run)

    def _run(self) -> None:
        if torch._C._current_autograd_node() is None:  # outermost pass, not a nested one
            self._fn()

    def remove(self) -> None:
        """Remove the hooks from the parameters (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
