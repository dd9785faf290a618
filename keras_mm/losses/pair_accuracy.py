"""Pair accuracy: does a query's top-1 match over the (global) batch hit its own pair?

Image->text: query = image embeddings [N, D] (local rows), keys = text embeddings [G, D] (the gathered
global batch, or the same N pairs on one device); the pair of query i is key label_offset + i. Text->image
swaps the towers. A monotone logit map (t * cos + b, s * cos) leaves the argmax unchanged, so the raw dot
products are used.

``pair_hits`` returns one 0/1 value per local query; feed it to a ``keras.metrics.Mean``: under
tf.distribute the metric sums totals and counts over replicas, which gives the global-batch accuracy
even when local batches differ in size.
"""

from keras import ops


def pair_hits(query_emb, key_emb, *, label_offset=0):
    """Per-query top-1 hit.

    Args:
        query_emb: [N, D] query embeddings (local rows).
        key_emb: [M, D] key embeddings (all columns).
        label_offset: int or int scalar tensor; query i's pair is key label_offset + i.

    Returns:
        [N] float32, 1.0 where argmax_j query_i . key_j == label_offset + i (first index on ties), else 0.
    """
    query_emb = ops.cast(query_emb, "float32")
    key_emb = ops.cast(key_emb, "float32")
    scores = ops.matmul(query_emb, ops.transpose(key_emb))  # [N, M]
    labels = ops.arange(ops.shape(query_emb)[0], dtype="int32") + ops.cast(label_offset, "int32")  # [N]
    predicted = ops.cast(ops.argmax(scores, axis=1), "int32")  # [N]
    return ops.cast(ops.equal(predicted, labels), "float32")


def pair_accuracy(query_emb, key_emb, *, label_offset=0):
    """Mean of ``pair_hits`` over the local queries: float32 scalar in [0, 1]."""
    return ops.mean(pair_hits(query_emb, key_emb, label_offset=label_offset))
