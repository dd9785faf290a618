"""SigLIP's pairwise sigmoid loss, gathered and chunked forms.

Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", Eq. (1) and Algorithm 1. For a batch B
of |B| pairs with L2-normalised image embeddings x_i, text embeddings y_j, t = exp(t') and bias b:

    L = -1/|B| * sum_{i=1}^{|B|} sum_{j=1}^{|B|} log sigmoid(z_ij * (t * x_i . y_j + b)),
    z_ij = +1 if i == j (a matching pair) else -1.

Every pair is an independent binary problem, so the global-batch loss splits into blocks of rows
(replicas) and columns (text chunks) that are summed:

* gathered form (``sigmoid_loss``): a replica's N local images against all G gathered texts, logits
  [N, G], positives at columns label_offset + i, summed and divided by G (the global batch size);
* chunked form (``chunked_sigmoid_loss``, paper Sec. 3.3): the same rows against the G texts taken one
  [N_k, D] chunk at a time, so only an [N, N_k] block of logits is needed at once; positives exist only
  in the replica's own chunk, on its diagonal.

Both return the replica's additive *share* of the global-batch loss (sum over its rows / G): the shares
of all replicas sum to L, and their gradients, summed over replicas (what Keras' TensorFlow optimizer
does under tf.distribute), are the gradients of L. On one device the share is L itself.

Everything is computed in float32 whatever the input dtype (mixed precision).
"""

from keras import ops


def sigmoid_logits(image_emb, text_emb, log_temperature, bias):
    """t * x . y + b with t = exp(t').

    Args:
        image_emb: [N, D] L2-normalised image embeddings.
        text_emb: [M, D] L2-normalised text embeddings.
        log_temperature: scalar t' (SigLIP init log 10).
        bias: scalar b (SigLIP init -10).

    Returns:
        [N, M] float32 logits.
    """
    image_emb = ops.cast(image_emb, "float32")
    text_emb = ops.cast(text_emb, "float32")
    t = ops.exp(ops.cast(log_temperature, "float32"))
    return t * ops.matmul(image_emb, ops.transpose(text_emb)) + ops.cast(bias, "float32")


def _pair_signs(num_rows, num_cols, label_offset):
    """[N, M] float32 z: +1 at (i, label_offset + i), -1 elsewhere."""
    labels = ops.arange(num_rows, dtype="int32") + ops.cast(label_offset, "int32")  # [N]
    positives = ops.one_hot(labels, num_cols, dtype="float32")  # [N, M]
    return 2.0 * positives - 1.0


def sigmoid_block_loss(image_emb, text_emb, log_temperature, bias, positive):
    """Unnormalised sum of -log sigmoid(z * logits) over one [N, M] block of pairs.

    Args:
        image_emb: [N, D] image embeddings (rows of the block).
        text_emb: [M, D] text embeddings (columns of the block).
        log_temperature, bias: scalars t', b.
        positive: bool or float scalar (python or tensor): 1 / True when the block is a replica's own chunk,
            with the positives on its diagonal (then M == N); 0 / False when every pair is a negative.

    Returns:
        float32 scalar, sum over the block's N x M pairs of -log sigmoid(z_ij * logit_ij).
    """
    logits = sigmoid_logits(image_emb, text_emb, log_temperature, bias)  # [N, M]
    rows, cols = ops.shape(logits)[0], ops.shape(logits)[1]
    diagonal = ops.eye(rows, cols, dtype="float32") * ops.cast(positive, "float32")  # [N, M]
    signs = 2.0 * diagonal - 1.0
    return -ops.sum(ops.log_sigmoid(signs * logits))


def sigmoid_loss(image_emb, text_emb, log_temperature, bias, *, label_offset=0, global_batch_size=None):
    """SigLIP loss, gathered form: local images against (all) texts, [N, M] logits.

    Args:
        image_emb: [N, D] L2-normalised image embeddings, this replica's rows (any float dtype).
        text_emb: [M, D] L2-normalised text embeddings: the whole global batch (gathered, M = G), or the
            same N pairs on one device (M = N).
        log_temperature: scalar t'; t = exp(t').
        bias: scalar b.
        label_offset: int or int scalar tensor, the global row of local row 0 (replica r of R with equal
            local batches: r * N); the positive of image i is text label_offset + i.
        global_batch_size: the |B| of Eq. (1); defaults to M, the number of text columns.

    Returns:
        float32 scalar: -sum_{i<N, j<M} log sigmoid(z_ij (t x_i . y_j + b)) / |B|. With M == N on one
        device this is Eq. (1); with gathered texts it is the replica's share of it.
    """
    logits = sigmoid_logits(image_emb, text_emb, log_temperature, bias)  # [N, M]
    signs = _pair_signs(ops.shape(logits)[0], ops.shape(logits)[1], label_offset)  # [N, M]
    total = -ops.sum(ops.log_sigmoid(signs * logits))
    if global_batch_size is None:
        global_batch_size = ops.shape(logits)[1]
    return total / ops.cast(global_batch_size, "float32")


def chunked_sigmoid_loss(image_emb, text_chunks, log_temperature, bias, *, own_chunk, global_batch_size=None):
    """SigLIP loss, chunked form: the local images meet the texts one chunk at a time.

    Args:
        image_emb: [N, D] L2-normalised image embeddings, this replica's rows.
        text_chunks: sequence of R text chunks, [N_k, D] each (replica k's texts); sum_k N_k = G.
        log_temperature, bias: scalars t', b.
        own_chunk: int or int scalar tensor, the index of this replica's chunk (the one whose diagonal holds
            the positives; N_own == N).
        global_batch_size: the |B| of Eq. (1); defaults to sum_k N_k.

    Returns:
        float32 scalar, sum_k sigmoid_block_loss(image_emb, text_chunks[k], ..., k == own_chunk) / |B|:
        equal to ``sigmoid_loss(image_emb, concat(text_chunks), ..., label_offset=sum_{k<own} N_k)``
        while only [N, N_k] logits are formed at a time.
    """
    total = 0.0
    for k, chunk in enumerate(text_chunks):
        positive = ops.equal(ops.cast(own_chunk, "int32"), k)
        total = total + sigmoid_block_loss(image_emb, chunk, log_temperature, bias, positive)
    if global_batch_size is None:
        global_batch_size = sum(ops.shape(chunk)[0] for chunk in text_chunks)
    return total / ops.cast(global_batch_size, "float32")
