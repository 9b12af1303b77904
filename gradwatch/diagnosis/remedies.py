"""What to change, by cause: the remedies every finding of that cause offers, most effective first.

Settings computed from the run (a ``max_norm``, a learning rate) are added by the rules; the texts
here are the standing advice for each cause, in one place so that two findings of one cause never
give different advice.
"""

from __future__ import annotations

__all__ = ["REMEDIES"]

REMEDIES: dict[str, tuple[str, ...]] = {
    "learning_rate": (
        "lower the learning rate (or its peak under a schedule)",
        "add or lengthen warm-up so the learning rate rises while the gradients settle",
    ),
    "data": (
        "find and fix the bad records (an outlier, a unit error, a corrupt or mislabelled record, "
        "NaN/Inf in inputs or targets): validate or normalise the data pipeline",
        'until then, keep such batches out of the weights: on_spike="skip" and '
        'on_nonfinite="skip", or clip by norm',
    ),
    "initialization": (
        "initialise for the depth: Kaiming (ReLU) or Xavier (tanh/sigmoid), e.g. "
        'nn.init.kaiming_normal_(layer.weight, nonlinearity="relu"), so each layer keeps the '
        "signal's scale",
        "add normalisation (BatchNorm/LayerNorm) or residual connections so the gain per layer "
        "stays near 1",
        "use fewer layers",
        "clip by norm so the first steps cannot throw the weights off",
    ),
    "saturation": (
        "saturating activations (sigmoid/tanh) in a deep stack squash the gradient: use "
        "ReLU/GELU in hidden layers",
        "initialise with Xavier (tanh/sigmoid) or Kaiming (ReLU) init",
        "add normalisation (LayerNorm/BatchNorm) or residual/skip connections",
    ),
    "recurrence": (
        "clip by norm: the standard fix for recurrent nets",
        "initialise the recurrent weight orthogonally or smaller (spectral radius below 1)",
        "use a gated cell (LSTM/GRU) or shorten the backpropagation-through-time window",
    ),
    "forward_numerics": (
        "make the operation safe: clamp before log/sqrt/division (x.clamp_min(eps)), add an "
        "epsilon to denominators (std + 1e-5), use torch.logsumexp instead of log(sum(exp))",
        "compute the loss from logits with the fused, stable forms: F.cross_entropy, "
        "F.binary_cross_entropy_with_logits, F.log_softmax",
    ),
    "precision": (
        "scale the loss: torch.amp.GradScaler with autocast(dtype=torch.float16), or train in "
        "bfloat16, whose range is float32's",
        "keep the overflowing operation (large activations, reductions, the loss) in float32",
        "bring the activations back in range: normalisation before the layer, smaller init",
    ),
    "dead_units": (
        "revive the layer: re-initialise its bias (e.g. to 0) and weights, or use "
        "LeakyReLU/GELU, which always pass some gradient",
        "lower the learning rate: a large step can push every unit of a layer below zero",
        "check for a detach(), a zero mask or a multiplication by zero on the path to the loss",
    ),
    "unused": (
        "if it should learn, check forward(): its output never reaches the loss",
        "otherwise remove it or freeze it (requires_grad_(False)) so optimizers skip it",
        "under DistributedDataParallel an unused parameter needs find_unused_parameters=True",
    ),
    "redundant_bias": (
        "drop the bias (bias=False): the normalisation that follows subtracts it again, so it "
        "can never learn; it costs memory and an optimizer slot",
    ),
    "unknown": ("run with GradWatch(model, forensics=True) to name the module where it starts",),
}
