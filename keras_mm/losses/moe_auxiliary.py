"""Auxiliary losses of sparse mixture-of-experts routers (V-MoE, LIMoE), as pure functions.

Every loss takes router outputs of shape ``[batch, tokens, experts]`` (any leading shape works:
``[..., experts]``) and an optional ``mask`` ``[batch, tokens]`` (bool or 0/1 or non-negative
weights) selecting the tokens it is computed over, e.g. one modality's tokens in LIMoE. With no
mask all tokens count. Everything is computed in float32. A mask that selects no token gives 0 (not
NaN), so a batch without one modality does not poison the total loss.

V-MoE (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts", Appendix A.2), for
the router logits ``W x`` of the tokens ``x`` in a set ``X`` and gates ``g(x) = softmax(W x)``:

* importance loss: ``imp_e(X) = sum_{x in X} g(x)_e``,
  ``L_imp(X) = (std(imp(X)) / mean(imp(X)))^2`` (squared coefficient of variation over experts);
* load loss: with the noisy logits ``W x + eps`` of the routing (``eps ~ N(0, sigma^2)``) and
  ``threshold_k(x)`` the k-th largest noisy logit of ``x``, the probability that expert ``e`` is
  still selected if the noise of its logit alone were redrawn is
  ``p_e(x) = 1 - Phi((threshold_k(x) - (W x)_e) / sigma)``; ``load_e(X) = sum_{x in X} p_e(x)``,
  ``L_load(X) = (std(load(X)) / mean(load(X)))^2`` (following Shazeer et al. 2017's smooth load
  estimator; V-MoE's ``_load_auxiliary_loss``). V-MoE averages both losses over its token groups;
  here they are computed over all the tokens the mask selects.

LIMoE (Mustafa et al. 2022, "Multimodal Contrastive Learning with LIMoE", Sec. 3.1), for the
tokens ``X_m`` of modality ``m`` and ``H(p) = -sum_e p_e log p_e``:

* local entropy loss ``Omega_local(m) = 1/|X_m| sum_{x in X_m} H(g(x))``: minimised, it makes each
  token's routing confident (concentrated on few experts);
* global entropy loss ``Omega_global(m) = -H(p_m)`` with ``p_m = 1/|X_m| sum_{x in X_m} g(x)`` the
  modality's mean gate distribution: minimised, it spreads the modality over many experts;
* thresholded global entropy: ``max(0, log(tau) + Omega_global(m)) = max(0, log(tau) - H(p_m))``;
  it stops pushing once the modality's marginal entropy exceeds ``log(tau)``, i.e. once it uses
  "about tau experts" (``exp(H)`` is the perplexity), so a modality is not forced onto *all*
  experts. ``tau`` is given as a number of experts (``threshold=tau``, ``1 <= tau <= E``).

The seed texts (the LIMoE blog post) only name these "new auxiliary losses"; the formulas above are
the paper's (Sec. 3.1). LIMoE applies both entropy losses per modality and sums them with weights,
next to V-MoE's importance and load losses.
"""

from __future__ import annotations

import math

from keras import ops

_TINY = 1e-30  # inside log(): g log g -> 0 as g -> 0, without log(0) = -inf in the graph


def _weights(gates, mask):
    """``[..., 1]`` float32 token weights broadcastable against ``gates`` ``[..., E]``."""
    if mask is None:
        return ops.ones(ops.shape(gates)[:-1] + (1,), "float32")
    return ops.cast(mask, "float32")[..., None]


def _safe_divide(numerator, denominator):
    """``numerator / denominator``, 0 where ``denominator == 0`` (NaN-free gradients too)."""
    nonzero = ops.greater(denominator, 0.0)
    return ops.where(nonzero, numerator / ops.where(nonzero, denominator, 1.0), 0.0)


def _squared_cv(values):
    """``var(values) / mean(values)^2`` over the last axis ``[E]`` (population variance)."""
    mean = ops.mean(values, axis=-1)
    variance = ops.mean(ops.square(values - mean[..., None]), axis=-1)
    return _safe_divide(variance, ops.square(mean))


def gate_entropy(gates):
    """``H(g) = -sum_e g_e log g_e`` per token: ``[..., E] -> [...]`` float32 (nats)."""
    gates = ops.cast(gates, "float32")
    return -ops.sum(gates * ops.log(ops.maximum(gates, _TINY)), axis=-1)


def importance_loss(gates, mask=None):
    """V-MoE importance loss (Riquelme et al. 2021, Appendix A.2, "importance loss").

    Args:
        gates: ``[batch, tokens, E]`` softmax gates of the router (V-MoE uses the clean,
            noise-free ones: ``routing["gates"]``).
        mask: ``[batch, tokens]`` tokens to use; None = all.
    Returns:
        float32 scalar ``CV(imp)^2``, ``imp_e = sum_t mask_t g_te``.
    """
    gates = ops.cast(gates, "float32")
    importance = ops.sum(gates * _weights(gates, mask), axis=tuple(range(len(gates.shape) - 1)))
    return _squared_cv(importance)


def load_loss(logits, noisy_logits, noise_std, num_selected=1, mask=None):
    """V-MoE load loss (Riquelme et al. 2021, Appendix A.2, "load loss"; Shazeer et al. 2017).

    Args:
        logits: ``[batch, tokens, E]`` clean router logits (``routing["logits"]``).
        noisy_logits: ``[batch, tokens, E]`` the noisy logits the routing used
            (``routing["noisy_logits"]``).
        noise_std: the *absolute* std sigma of the noise (``MoeMlp.router.absolute_noise_std``
            = ``noise_std / E``), a python float.
        num_selected: k.
        mask: ``[batch, tokens]`` tokens to use; None = all.
    Returns:
        float32 scalar ``CV(load)^2``. With ``noise_std == 0`` the loss is not defined (the
        selection probability is a step function of the logits, with zero gradient): it returns
        0, as V-MoE's deterministic router leaves it out of its total auxiliary loss.
    """
    if not noise_std:
        return ops.convert_to_tensor(0.0, "float32")
    logits = ops.cast(logits, "float32")
    noisy_logits = ops.cast(noisy_logits, "float32")
    threshold = ops.top_k(noisy_logits, num_selected)[0][..., -1:]        # [..., 1]
    z = (threshold - logits) / float(noise_std)                           # noise needed to win
    probability = 0.5 * (1.0 - ops.erf(z / math.sqrt(2.0)))               # 1 - Phi(z)
    load = ops.sum(probability * _weights(logits, mask),
                   axis=tuple(range(len(logits.shape) - 1)))              # [E]
    return _squared_cv(load)


def local_entropy_loss(gates, mask=None):
    """LIMoE local entropy loss (Mustafa et al. 2022, Sec. 3.1): the mean per-token gate entropy.

    Args:
        gates: ``[batch, tokens, E]`` router gates.
        mask: ``[batch, tokens]`` the modality's tokens; None = all.
    Returns:
        float32 scalar ``sum_t mask_t H(g_t) / sum_t mask_t`` (nats).
    """
    gates = ops.cast(gates, "float32")
    weights = _weights(gates, mask)[..., 0]
    return _safe_divide(ops.sum(gate_entropy(gates) * weights), ops.sum(weights))


def global_entropy_loss(gates, mask=None, threshold=None):
    """LIMoE global entropy loss (Mustafa et al. 2022, Sec. 3.1), optionally thresholded.

    Args:
        gates: ``[batch, tokens, E]`` router gates.
        mask: ``[batch, tokens]`` the modality's tokens; None = all.
        threshold: tau, a number of experts (``1 <= tau <= E``): the loss is
            ``max(0, log(tau) - H(p_m))``, zero once the modality's mean gate distribution has
            entropy above ``log(tau)``. None: the plain ``-H(p_m)``.
    Returns:
        float32 scalar.
    """
    gates = ops.cast(gates, "float32")
    weights = _weights(gates, mask)
    axes = tuple(range(len(gates.shape) - 1))
    mean_gates = _safe_divide(ops.sum(gates * weights, axis=axes), ops.sum(weights))   # [E]
    entropy = gate_entropy(mean_gates)
    has_tokens = ops.cast(ops.greater(ops.sum(weights), 0.0), "float32")
    if threshold is None:
        return -entropy * has_tokens
    if threshold < 1:
        raise ValueError(f"threshold (a number of experts) must be >= 1, got {threshold}")
    return ops.maximum(0.0, math.log(threshold) - entropy) * has_tokens
