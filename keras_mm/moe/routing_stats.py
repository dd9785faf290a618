"""Routing statistics of a MoE layer per modality (LIMoE, Mustafa et al. 2022, Sec. 4-5):
expert load, routing success rate, mean gate entropy.

All functions take the ``routing`` dict of ``MoeMlp(..., return_routing=True)`` /
``MoeTransformerBlock(..., return_routing=True)`` and an optional ``mask`` ``[batch, tokens]``
(1 = the modality's token; None = all tokens), use keras.ops only and return float32 tensors, so
they can run inside a ``train_step`` / ``test_step`` and be logged as metrics. A mask selecting no
token gives zeros, not NaN.
"""

from __future__ import annotations

from keras import ops

from keras_mm.losses.moe_auxiliary import gate_entropy


def _weights(routing, mask):
    """``[batch, tokens]`` float32 weights of the selected tokens."""
    if mask is None:
        return ops.ones_like(routing["kept"], dtype="float32")
    return ops.cast(mask, "float32")


def _ratio(numerator, denominator):
    nonzero = ops.greater(denominator, 0.0)
    return ops.where(nonzero, numerator / ops.where(nonzero, denominator, 1.0), 0.0)


def expert_load(routing, mask=None, dispatched_only=False):
    """``[E]`` share of the modality's expert choices that went to each expert.

    ``load_e = #(token, choice) pairs choosing e / (k * #tokens)``: sums to 1 over experts. With
    k = 1 (LIMoE) it is the fraction of the modality's tokens routed to expert e. The routing
    decision counts whether or not capacity let the token in; with ``dispatched_only=True`` only
    the choices that got a slot count (the rows then sum to the dispatched share, <= 1).
    """
    indices = routing["expert_indices"]                                  # [b, n, k]
    num_experts = routing["gates"].shape[-1]
    weights = _weights(routing, mask)                                    # [b, n]
    choice = ops.one_hot(indices, num_experts, dtype="float32")          # [b, n, k, E]
    if dispatched_only:
        choice = choice * ops.cast(routing["dispatched"], "float32")[..., None]
    counts = ops.sum(choice * weights[:, :, None, None], axis=(0, 1, 2))  # [E]
    k = indices.shape[-1]
    return _ratio(counts, ops.sum(weights) * float(k))


def routing_success_rate(routing, mask=None):
    """Scalar: fraction of the modality's tokens routed to at least one expert (not dropped)."""
    weights = _weights(routing, mask)
    return _ratio(ops.sum(ops.cast(routing["kept"], "float32") * weights), ops.sum(weights))


def mean_gate_entropy(routing, mask=None):
    """Scalar: mean over the modality's tokens of the entropy (nats) of their gate distribution."""
    weights = _weights(routing, mask)
    return _ratio(ops.sum(gate_entropy(routing["gates"]) * weights), ops.sum(weights))


def routing_summary(routing, masks):
    """All three statistics for each modality.

    Args:
        routing: a routing dict.
        masks: ``{modality: [batch, tokens] mask}``, e.g. ``{"image": ..., "text": ...}``.
    Returns:
        ``{"expert_load_<m>": [E], "routing_success_<m>": scalar, "gate_entropy_<m>": scalar}``
        (``routing_success_image`` / ``_text`` are the run-summary metric names of DESIGN.md).
    """
    summary = {}
    for modality, mask in masks.items():
        summary[f"expert_load_{modality}"] = expert_load(routing, mask)
        summary[f"routing_success_{modality}"] = routing_success_rate(routing, mask)
        summary[f"gate_entropy_{modality}"] = mean_gate_entropy(routing, mask)
    return summary
