"""Captioning (autoregressive language-modelling) loss and token accuracy over masked token sequences.

CoCa's captioning loss (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models",
Eq. 2) is the negative log-likelihood of the caption under teacher forcing:

    L_Cap = - sum_{t=1}^{T} log P_theta(y_t | y_<t, x).

As in big_vision and open_clip (and CapPa, MaMMUT, PaLI, which train the same way), the sum is normalised
per token: the loss is the mean of -log P(y_t | y_<t, x) over all counted tokens of the batch,

    L = sum_{b,t} m_bt * CE(logits_bt, y_bt) / sum_{b,t} m_bt,

so that a batch of long captions and one of short captions are on the same scale and the weight of
CoCa's "L = 1.0 contrastive + 2.0 captioning" applies to a per-token loss. Padding tokens (id 0) are not
counted by default.

With label smoothing eps (Szegedy et al. 2016) the target of every token is
(1 - eps) * one_hot(y) + eps / V over the V vocabulary entries, so

    CE = -(1 - eps) * log p_y - eps * mean_v log p_v.

Everything is computed in float32 whatever the logits' dtype (mixed precision).
"""

from keras import ops

PAD_ID = 0


def _token_weights(labels, mask):
    """[batch, tokens] float32 weights: ``mask`` if given, else 1 where labels != PAD_ID."""
    if mask is None:
        return ops.cast(ops.not_equal(labels, PAD_ID), "float32")
    return ops.cast(mask, "float32")


def _masked_mean(values, weights):
    """sum(values * weights) / sum(weights), 0.0 (not NaN) when every weight is 0. float32 scalar."""
    total = ops.sum(values * weights)
    count = ops.sum(weights)
    safe_count = ops.where(ops.greater(count, 0.0), count, ops.ones_like(count))
    return total / safe_count


def token_cross_entropy(logits, labels, label_smoothing=0.0):
    """Per-token cross-entropy, unreduced.

    Args:
        logits: [batch, tokens, vocab] next-token logits, any float dtype (cast to float32).
        labels: [batch, tokens] int target ids (the inputs shifted by one).
        label_smoothing: eps in [0, 1); the target is (1 - eps) * one_hot + eps / vocab.

    Returns:
        [batch, tokens] float32 cross-entropy of each position.
    """
    log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)  # [batch, tokens, vocab]
    labels = ops.cast(labels, "int32")
    target_log_prob = ops.take_along_axis(log_probs, ops.expand_dims(labels, -1), axis=-1)[..., 0]
    nll = -target_log_prob  # [batch, tokens]
    if label_smoothing:
        smooth = -ops.mean(log_probs, axis=-1)  # [batch, tokens]
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    return nll


def captioning_loss(logits, labels, mask=None, label_smoothing=0.0):
    """CoCa's L_Cap normalised per token: mean cross-entropy over the counted tokens.

    Args:
        logits: [batch, tokens, vocab] decoder logits (position t predicts labels[:, t]); any float dtype,
            computed in float32.
        labels: [batch, tokens] int target ids.
        mask: optional [batch, tokens] weights (1 = count, 0 = ignore; bool, int or float). Defaults to
            ``labels != 0`` (0 is the PAD id).
        label_smoothing: eps in [0, 1), 0 for none.

    Returns:
        float32 scalar, sum(mask * CE) / sum(mask); 0.0 when no token is counted (an all-padding batch),
        with zero gradients then.
    """
    nll = token_cross_entropy(logits, labels, label_smoothing)  # [batch, tokens]
    return _masked_mean(nll, _token_weights(labels, mask))


def token_accuracy(logits, labels, mask=None):
    """Fraction of counted tokens whose argmax logit is the label (teacher-forced next-token accuracy).

    Args:
        logits: [batch, tokens, vocab] logits, any float dtype.
        labels: [batch, tokens] int target ids.
        mask: optional [batch, tokens] weights; defaults to ``labels != 0``.

    Returns:
        float32 scalar in [0, 1]; 0.0 when no token is counted.
    """
    predicted = ops.argmax(ops.cast(logits, "float32"), axis=-1)  # [batch, tokens]
    hits = ops.cast(ops.equal(ops.cast(predicted, "int32"), ops.cast(labels, "int32")), "float32")
    return _masked_mean(hits, _token_weights(labels, mask))
