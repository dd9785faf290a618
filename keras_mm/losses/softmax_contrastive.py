"""CLIP's softmax contrastive loss (symmetric InfoNCE) over a possibly global batch.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", Fig. 3 and
Sec. 2.5; the same form is CoCa's L_Con (Yu et al. 2022, Eq. 1). For L2-normalised image embeddings x_i
and text embeddings y_j of a batch of G pairs and a logit scale s = min(exp(log_scale), 100):

    L = 1 / (2G) * sum_i [ -log softmax_j(s x_i . y_j)[i]  -  log softmax_j(s y_i . x_j)[i] ]

i.e. the mean of the image->text and the text->image cross-entropies.

Data-parallel form: a replica that holds N local pairs (its rows of the global batch, starting at row
``label_offset``) and the gathered G x D embeddings of both towers computes only its own 2N rows of the
sum above and divides by 2G. That value is the replica's additive *share*: the shares of all replicas sum
to the global-batch loss, and the gradients of the shares, summed over replicas (what Keras' TensorFlow
optimizer does under tf.distribute), are the gradients of the global-batch loss. On one device (or under a
jitted JAX step over global arrays) N == G, the offset is 0 and the share is the loss itself.

Everything is computed in float32 whatever the input dtype (mixed precision).
"""

import math

from keras import ops

CLIP_MAX_LOGIT_SCALE = 100.0


def logit_scale(log_scale, max_scale=CLIP_MAX_LOGIT_SCALE):
    """s = exp(log_scale), clipped at ``max_scale`` (CLIP: 100). float32 scalar.

    The clip is applied to the log-scale, so its gradient is zero while clipped, as when the parameter
    itself is clamped after each step (open_clip, CLIP). ``max_scale=None`` disables the clip.
    """
    log_scale = ops.cast(log_scale, "float32")
    if max_scale is not None:
        log_scale = ops.minimum(log_scale, math.log(max_scale))
    return ops.exp(log_scale)


# A left-out column: exp(-1e9 - max) is exactly 0 in float32, and unlike -inf it keeps the
# gradients of ops.where finite.
_MASKED_LOGIT = -1e9


def _local_labels(num_rows, label_offset):
    """[N] int32: the global column of each local row's positive, label_offset + i."""
    return ops.arange(num_rows, dtype="int32") + ops.cast(label_offset, "int32")


def _duplicate_captions(text_ids, global_text_ids, labels):
    """[N, G] bool: local caption i equals global caption j (all token ids), j not i's own pair."""
    text_ids = ops.cast(text_ids, "int32")
    global_text_ids = text_ids if global_text_ids is None else ops.cast(global_text_ids, "int32")
    same = ops.all(ops.equal(text_ids[:, None, :], global_text_ids[None, :, :]), axis=-1)
    own = ops.equal(ops.arange(ops.shape(global_text_ids)[0], dtype="int32")[None, :],
                    labels[:, None])
    return ops.logical_and(same, ops.logical_not(own))


def _cross_entropy_sum(logits, labels):
    """sum_i (logsumexp_j logits[i, j] - logits[i, labels[i]]); logits [N, M] float32, labels [N]."""
    positive = ops.take_along_axis(logits, ops.expand_dims(labels, 1), axis=1)[:, 0]  # [N]
    return ops.sum(ops.logsumexp(logits, axis=1) - positive)


def softmax_contrastive_loss(
    image_emb,
    text_emb,
    log_scale,
    *,
    global_image_emb=None,
    global_text_emb=None,
    label_offset=0,
    max_scale=CLIP_MAX_LOGIT_SCALE,
    global_negative_emb=None,
    global_negative_valid=None,
    text_ids=None,
    global_text_ids=None,
):
    """CLIP loss: mean of image->text and text->image softmax cross-entropy (share of the global batch).

    Args:
        image_emb: [N, D] L2-normalised image embeddings, this replica's rows (any float dtype).
        text_emb: [N, D] L2-normalised text embeddings of the same N pairs.
        log_scale: scalar, learnable log of the logit scale (init log(1 / 0.07)); s = min(exp(.), max_scale).
        global_image_emb: [G, D] image embeddings of the whole global batch (gathered), or None when the
            local rows are the whole batch. Give both global arrays or neither.
        global_text_emb: [G, D] text embeddings of the whole global batch, or None.
        label_offset: int or int scalar tensor, the global row of local row 0 (replica r of R with equal
            local batches: r * N); the positive of local row i is global column label_offset + i.
        max_scale: clip of the logit scale (CLIP: 100), None for none.
        global_negative_emb: [G, D] L2-normalised embeddings of hard negative captions of the whole
            global batch (NegCLIP, Yuksekgonul et al. 2023), or None. They are extra columns of the
            image->text softmax only: logits_i2t becomes [N, 2G] (every text and every negative);
            text->image and the normalisation are unchanged.
        global_negative_valid: [G] bool, which negatives exist (False columns are left out), or None
            for all.
        text_ids: [N, L] int token ids of the local captions, or None. Pairs whose captions are
            identical (equal ids) are each other's true pairs too (a caption grammar or a
            dataset repeats captions: "a 3 and a 7" for many images), so they are left out of
            each other's image->text and text->image softmax: neither negative nor positive.
            Every row keeps its own pair as its positive.
        global_text_ids: [G, L] token ids of the whole global batch (with the global arrays), or
            None when the local rows are the whole batch.

    Returns:
        float32 scalar: (sum over the 2N local rows of the cross-entropy) / (2G), with
        logits_i2t = s * image_emb @ global_text_emb.T  [N, G] and logits_t2i = s * text_emb @
        global_image_emb.T [N, G]. Summed over replicas this is the loss of the global batch; with N == G
        it is the loss itself.
    """
    if (global_image_emb is None) != (global_text_emb is None):
        raise ValueError(
            "softmax_contrastive_loss: pass both global_image_emb and global_text_emb, or neither.")
    image_emb = ops.cast(image_emb, "float32")  # [N, D]
    text_emb = ops.cast(text_emb, "float32")  # [N, D]
    if global_image_emb is None:
        global_image_emb, global_text_emb = image_emb, text_emb
    else:
        global_image_emb = ops.cast(global_image_emb, "float32")  # [G, D]
        global_text_emb = ops.cast(global_text_emb, "float32")  # [G, D]
    scale = logit_scale(log_scale, max_scale)
    labels = _local_labels(ops.shape(image_emb)[0], label_offset)  # [N]
    logits_i2t = scale * ops.matmul(image_emb, ops.transpose(global_text_emb))  # [N, G]
    logits_t2i = scale * ops.matmul(text_emb, ops.transpose(global_image_emb))  # [N, G]
    if text_ids is not None:
        duplicate = _duplicate_captions(text_ids, global_text_ids, labels)      # [N, G]
        logits_i2t = ops.where(duplicate, _MASKED_LOGIT, logits_i2t)
        logits_t2i = ops.where(duplicate, _MASKED_LOGIT, logits_t2i)
    if global_negative_emb is not None:
        negative = scale * ops.matmul(
            image_emb, ops.transpose(ops.cast(global_negative_emb, "float32")))  # [N, G]
        if global_negative_valid is not None:
            negative = ops.where(ops.cast(global_negative_valid, "bool")[None, :], negative,
                                 _MASKED_LOGIT)
        logits_i2t = ops.concatenate([logits_i2t, negative], axis=1)  # [N, 2G]
    total = _cross_entropy_sum(logits_i2t, labels) + _cross_entropy_sum(logits_t2i, labels)
    global_batch = ops.cast(ops.shape(global_text_emb)[0], "float32")
    return total / (2.0 * global_batch)
