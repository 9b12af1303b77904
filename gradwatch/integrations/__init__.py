"""Adapters that run gradwatch inside training frameworks, and the few parts they share.

Each framework has its own module, imported on demand so that ``import gradwatch`` never imports a
framework: :mod:`gradwatch.integrations.lightning` (``GradWatchCallback`` for Lightning) and
:mod:`gradwatch.integrations.transformers` (``GradWatchCallback`` for the Hugging Face
``Trainer``). A missing framework raises :class:`~gradwatch._optional.MissingExtraError` naming
the extra that installs it.

Both adapters follow one plan. The watcher checks the gradients once per optimizer step at the
last moment they are still raw: accumulated, synchronised across ranks, unscaled, and not yet
clipped by the framework. When the framework then clips them itself (Lightning's
``gradient_clip_val``, the Trainer's ``max_grad_norm``), the adapter measures the global norm again
after that clipping, so the norms before and after clipping are both measured, not inferred.

The adapters are thin: what a callback does without its framework is one core,
:class:`~gradwatch.integrations.core.CallbackCore` (the watcher, windows, the framework's clipping
counted into the summary, checkpoint state), over the per-window statistics an adapter logs
(:class:`~gradwatch.integrations.window.WindowStats`, with :func:`post_clip_norm`); the Hugging
Face adapter also needs a hook that runs after a backward pass has finished
(:class:`~gradwatch.integrations.backward.AfterBackward`).
"""

from gradwatch.integrations.backward import AfterBackward
from gradwatch.integrations.window import PREFIX, UNCLIPPED, WindowStats, post_clip_norm

__all__ = ["PREFIX", "UNCLIPPED", "AfterBackward", "WindowStats", "post_clip_norm"]
