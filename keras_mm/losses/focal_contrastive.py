"""Focal contrastive loss (RO-ViT), the image-text loss MaMMUT trains with.

Kim, Angelova, Kuo 2023, "Region-Aware Pretraining for Open-Vocabulary Object Detection with Vision
Transformers" (RO-ViT), Sec. 3, the focal-loss form of the image-to-text loss; used by MaMMUT (Kuo et al.
2023, "Focal Contrastive Loss", p. 6). Every image-text pair of the batch is a binary problem, as in
SigLIP, weighted by the focal factor of Lin et al. 2017 ("Focal Loss for Dense Object Detection") so that
hard pairs dominate. For L2-normalised image embeddings x_i and text embeddings y_j of a batch of B pairs
and a temperature tau:

    p_ij = sigmoid(x_i . y_j / tau),
    p_t  = p_ij if i == j (the matching pair) else 1 - p_ij,
    L_img2txt = -1/B * sum_{i=1}^{B} sum_{j=1}^{B} (1 - p_t)^gamma * log(p_t).

With alpha weighting (Lin et al.'s alpha-balanced form; off by default, as in the RO-ViT equation) each term
is multiplied by alpha_t = alpha for the positives and 1 - alpha for the negatives.

RO-ViT's total loss is L_img2txt + L_txt2img, the text-to-image loss being "symmetrical". With sigmoid
probabilities the text-to-image matrix is the transpose of the image-to-text one, so on one batch the two
terms are equal and the total is 2 * L_img2txt: this module returns L_img2txt (the equation above); a
recipe that wants RO-ViT's sum gives the loss weight 2.

gamma: the RO-ViT equation leaves it a hyper-parameter and its value is not stated in the texts this
project ships (shared/seeds holds only a MaMMUT reading note); the default here is Lin et al.'s
recommended gamma = 2.0. gamma = 0 gives the plain pairwise sigmoid cross-entropy summed over pairs / B
(SigLIP's loss with t = 1 / tau and b = 0).

Numerics: log(p_t) = log_sigmoid(z * s / tau) and (1 - p_t)^gamma = exp(gamma * log_sigmoid(-z * s / tau))
with z = +1 on the diagonal, -1 elsewhere, so nothing overflows or takes log(0) at large logits, and the
gradient stays finite at gamma = 0.

Data-parallel form (the conventions of ``sigmoid_loss``): a replica holding N local images and the
gathered G texts passes ``label_offset`` (the global row of its first image) and the global batch size;
it returns its additive share of the global-batch loss. On one device N == M == B and the offset is 0.

Everything is computed in float32 whatever the input dtype (mixed precision).
"""

from keras import ops

DEFAULT_GAMMA = 2.0


def focal_contrastive_logits(image_emb, text_emb, temperature):
    """s_ij / tau = x_i . y_j / tau.

    Args:
        image_emb: [N, D] L2-normalised image embeddings.
        text_emb: [M, D] L2-normalised text embeddings.
        temperature: scalar tau > 0 (python float or scalar tensor, e.g. a learned exp(log_tau)).

    Returns:
        [N, M] float32 logits.
    """
    image_emb = ops.cast(image_emb, "float32")
    text_emb = ops.cast(text_emb, "float32")
    return ops.matmul(image_emb, ops.transpose(text_emb)) / ops.cast(temperature, "float32")


def focal_contrastive_loss(
    image_emb,
    text_emb,
    temperature,
    *,
    gamma=DEFAULT_GAMMA,
    alpha=None,
    label_offset=0,
    global_batch_size=None,
):
    """RO-ViT focal contrastive loss, L_img2txt (see the module docstring).

    Args:
        image_emb: [N, D] image embeddings, L2-normalised by the caller (as for the other contrastive
            losses of keras_mm.losses); any float dtype.
        text_emb: [M, D] L2-normalised text embeddings: the same N pairs (M = N) or the gathered global
            batch (M = G).
        temperature: scalar tau > 0, fixed or learned (python float or scalar tensor).
        gamma: python float, focusing parameter >= 0 (default 2.0; 0 = sigmoid cross-entropy).
        alpha: optional weight in [0, 1] of the positive pairs (negatives get 1 - alpha); None for none.
        label_offset: int or int scalar tensor, the global row of local row 0; the positive of image i is
            text label_offset + i.
        global_batch_size: the B of the equation; defaults to M, the number of text columns.

    Returns:
        float32 scalar: -sum_{i<N, j<M} alpha_t (1 - p_t)^gamma log(p_t) / B.
    """
    logits = focal_contrastive_logits(image_emb, text_emb, temperature)  # [N, M]
    rows, cols = ops.shape(logits)[0], ops.shape(logits)[1]
    positive_cols = ops.arange(rows, dtype="int32") + ops.cast(label_offset, "int32")  # [N]
    positives = ops.one_hot(positive_cols, cols, dtype="float32")  # [N, M], 1 on the matching pairs
    signs = 2.0 * positives - 1.0  # z: +1 matching, -1 otherwise
    log_p_t = ops.log_sigmoid(signs * logits)  # [N, M]
    terms = -log_p_t
    if gamma:
        log_one_minus_p_t = ops.log_sigmoid(-signs * logits)
        terms = ops.exp(ops.cast(gamma, "float32") * log_one_minus_p_t) * terms
    if alpha is not None:
        alpha = ops.cast(alpha, "float32")
        terms = (positives * alpha + (1.0 - positives) * (1.0 - alpha)) * terms
    if global_batch_size is None:
        global_batch_size = cols
    return ops.sum(terms) / ops.cast(global_batch_size, "float32")
