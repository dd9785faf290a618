"""The global batch of a data-parallel step, on every backend: THE place that knows tf.distribute and JAX.

A contrastive train_step (CLIP, SigLIP) must see the texts and images of every replica. Where it runs
decides how:

* TensorFlow backend, inside ``strategy.run`` (a tf.distribute replica context with R > 1 replicas:
  MirroredStrategy, MultiWorkerMirroredStrategy, TPUStrategy): each replica holds its N local rows;
  ``gather`` is ``ReplicaContext.all_gather`` and the gradients flow back through it (its gradient is an
  all-reduce of the upstream gradient, sliced to the local rows).
* JAX backend under a jitted ``keras.distribution`` step (DataParallel / ModelParallel): the traced arrays
  are already the global batch; ``gather`` returns them unchanged and XLA inserts the collectives.
* JAX inside a ``jax.shard_map`` the caller wrote: pass its mesh axis as ``axis_name``; ``gather`` is
  ``jax.lax.all_gather(..., tiled=True)``.
* One device, the default strategy, a cross-replica context: nothing to gather.

Normalisation convention of the ``global_*`` losses (the one train_steps rely on). Each returns the
*share of the global-batch loss owned by the calling program*: (sum of the loss terms of its local rows)
/ (global batch size G).

* In a tf.distribute replica context the shares of the R replicas sum to the global-batch loss, and the
  gradient of a share w.r.t. the (mirrored) weights, SUM-all-reduced over replicas by Keras' TensorFlow
  optimizer, is the gradient of the global-batch loss. So a train_step differentiates the returned value
  AS IS: do not divide it by ``num_replicas_in_sync`` again, and do not pass it through a
  ``keras.losses.Loss.__call__`` (which scales by 1 / R). With equal local batches the share equals
  Keras' own per-replica convention (local mean / R), so for logging feed ``share * R`` (R =
  ``replica_info()[1]``; Keras' default train_step does the same with ``unscale_loss_for_distribution``)
  to a ``keras.metrics.Mean`` with ``sample_weight`` = local batch size: it reports the global-batch loss
  (checked with model.fit under MirroredStrategy: same logged losses as one device).
* Inside a caller's shard_map (``axis_name`` given) the same: per-device shares; ``psum`` them.
* Everywhere else (one device; jitted JAX over global arrays) the share is the full loss.

Label offsets: replica r's local row i is global row offset_r + i with offset_r = sum of the local batch
sizes of replicas 0..r-1 (r * N with equal batches); uneven last batches (MirroredStrategy splits a batch
of 7 into 4 + 3) are handled by gathering the local sizes.

Chunked sigmoid (SigLIP Sec. 3.3): the local images meet the texts one replica chunk at a time, so only
[N, N] logits are formed at once, each block rematerialised in the backward pass (``tf.recompute_grad`` /
``jax.checkpoint``) so that no [N, G] array is kept for the gradients either. TensorFlow: all_gather the
texts (G x D, small) and loop over the R chunks, one after another. JAX: a ring, ``jax.shard_map`` over
the batch mesh axis with ``jax.lax.ppermute`` passing the text chunks round; positives only in the first
(own) block.

tensorflow and jax are imported here only, lazily, for the backend in use; the loss maths is keras.ops
(keras_mm.losses).
"""

import keras
from keras import ops

from keras_mm.losses.focal_contrastive import focal_contrastive_loss
from keras_mm.losses.pair_accuracy import pair_hits
from keras_mm.losses.sigmoid_contrastive import sigmoid_block_loss, sigmoid_loss
from keras_mm.losses.softmax_contrastive import CLIP_MAX_LOGIT_SCALE, softmax_contrastive_loss


# --------------------------------------------------------------------------------------------- contexts
def _tf_replica_context():
    """The tf.distribute replica context when there is more than one replica in sync, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()  # None in a cross-replica context
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def gather(x, axis_name=None):
    """The global batch of ``x`` along axis 0.

    Args:
        x: [N, ...] this replica's rows.
        axis_name: JAX only: the mesh axis of an enclosing ``jax.shard_map`` over the batch.

    Returns:
        [G, ...]: ``all_gather(x, axis=0)`` in a tf.distribute replica context with R > 1 replicas (rows
        in replica order) or inside a shard_map with ``axis_name``; ``x`` unchanged otherwise (one
        replica, cross-replica context, jitted JAX over global arrays).
    """
    if axis_name is not None:
        import jax

        return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)
    context = _tf_replica_context()
    if context is None:
        return x
    return context.all_gather(x, axis=0)


def replica_info(axis_name=None):
    """(replica_id, num_replicas) of the calling program, in-graph.

    replica_id is an int32 scalar tensor under tf.distribute (``replica_id_in_sync_group``) and inside a
    shard_map (``jax.lax.axis_index``), 0 elsewhere; num_replicas is a Python int (static).
    """
    if axis_name is not None:
        import jax

        return jax.lax.axis_index(axis_name), jax.lax.axis_size(axis_name)
    context = _tf_replica_context()
    if context is None:
        return 0, 1
    import tensorflow as tf

    return tf.cast(context.replica_id_in_sync_group, tf.int32), context.num_replicas_in_sync


def local_batch_sizes(x, axis_name=None):
    """[R] int32: the local batch size (rows of ``x``) of every replica, in replica order.

    Under tf.distribute it is all-gathered (local batches may differ); under shard_map every shard has
    x's static row count.
    """
    if axis_name is not None:
        import jax

        return ops.full((jax.lax.axis_size(axis_name),), ops.shape(x)[0], dtype="int32")
    context = _tf_replica_context()
    if context is None:
        return ops.reshape(ops.cast(ops.shape(x)[0], "int32"), (1,))
    import tensorflow as tf

    return context.all_gather(tf.reshape(tf.shape(x)[0], [1]), axis=0)


def local_row_offset(x, axis_name=None):
    """int32 scalar: the global row of this replica's first local row of ``x`` (0 on one replica)."""
    replica_id, num_replicas = replica_info(axis_name)
    if num_replicas == 1:
        return 0
    if axis_name is not None:
        return replica_id * ops.shape(x)[0]
    sizes = local_batch_sizes(x)  # [R]
    before = ops.less(ops.arange(num_replicas, dtype="int32"), replica_id)  # [R] bool
    return ops.sum(ops.where(before, sizes, 0))


# ------------------------------------------------------------------------------------------ global losses
def global_softmax_loss(image_emb, text_emb, log_scale, *, max_scale=CLIP_MAX_LOGIT_SCALE, axis_name=None,
                        negative_emb=None, negative_valid=None, text_ids=None):
    """CLIP loss over the global batch: this program's share (see the module docstring).

    Args:
        image_emb: [N, D] local L2-normalised image embeddings.
        text_emb: [N, D] local L2-normalised text embeddings.
        log_scale: scalar log of the logit scale (ContrastiveLogits("softmax").log_scale).
        max_scale: clip of the scale (100).
        axis_name: JAX shard_map axis, if called inside one.
        negative_emb: [N, D] local L2-normalised hard negative captions (NegCLIP) or None: gathered,
            they join every image's image->text softmax (``softmax_contrastive_loss``).
        negative_valid: [N] bool, which local negatives exist, or None for all.
        text_ids: [N, L] local caption token ids, or None: gathered, identical captions of the
            global batch are left out of each other's softmax (``softmax_contrastive_loss``).

    Returns:
        float32 scalar share: sum over the local rows of (CE_i2t + CE_t2i) / (2 G).
    """
    image_emb = ops.cast(image_emb, "float32")
    text_emb = ops.cast(text_emb, "float32")
    negatives = {}
    if negative_emb is not None:
        negatives["global_negative_emb"] = gather(ops.cast(negative_emb, "float32"), axis_name)
        if negative_valid is not None:
            negatives["global_negative_valid"] = gather(ops.cast(negative_valid, "int32"), axis_name) > 0
    if text_ids is not None:
        negatives["text_ids"] = ops.cast(text_ids, "int32")
        negatives["global_text_ids"] = gather(negatives["text_ids"], axis_name)
    return softmax_contrastive_loss(
        image_emb, text_emb, log_scale,
        global_image_emb=gather(image_emb, axis_name), global_text_emb=gather(text_emb, axis_name),
        label_offset=local_row_offset(image_emb, axis_name), max_scale=max_scale, **negatives)


def global_focal_loss(image_emb, text_emb, temperature, *, gamma=2.0, alpha=None, axis_name=None):
    """RO-ViT's focal contrastive loss (MaMMUT) over the global batch: this program's share.

    Every local image against every gathered text (each pair of the global batch is counted
    once, by the replica holding its image), divided by the global batch size G:
    ``sum_{i local, j < G} focal_ij / G`` (``keras_mm.losses.focal_contrastive``).
    """
    image_emb = ops.cast(image_emb, "float32")
    all_text = gather(ops.cast(text_emb, "float32"), axis_name)
    return focal_contrastive_loss(
        image_emb, all_text, temperature, gamma=gamma, alpha=alpha,
        label_offset=local_row_offset(image_emb, axis_name),
        global_batch_size=ops.shape(all_text)[0])


def global_sigmoid_loss(image_emb, text_emb, log_temperature, bias, *, chunked=False, mesh=None,
                        axis_name=None):
    """SigLIP loss over the global batch: this program's share (see the module docstring).

    Args:
        image_emb: [N, D] local L2-normalised image embeddings.
        text_emb: [N, D] local L2-normalised text embeddings.
        log_temperature: scalar t' (ContrastiveLogits("sigmoid").log_scale).
        bias: scalar b (ContrastiveLogits("sigmoid").bias).
        chunked: False: gathered form, [N, G] logits. True: chunked form, [N, N] logits at a time
            (tf.distribute: gather + loop over the R chunks; JAX: ppermute ring).
        mesh: JAX only, for ``chunked``: the ``jax.sharding.Mesh`` whose ``axis_name`` axis (default: the
            first) shards the batch. Default: the mesh of the current ``keras.distribution``, whose batch
            axis is ``batch_dim_name``; without either the whole batch is one chunk.
        axis_name: JAX only: the batch mesh axis when called inside the caller's own shard_map.

    Returns:
        float32 scalar share: -sum_{local i, all j} log sigmoid(z_ij (t x_i . y_j + b)) / G.
    """
    image_emb = ops.cast(image_emb, "float32")
    text_emb = ops.cast(text_emb, "float32")
    if not chunked:
        all_texts = gather(text_emb, axis_name)  # [G, D]
        return sigmoid_loss(image_emb, all_texts, log_temperature, bias,
                            label_offset=local_row_offset(image_emb, axis_name),
                            global_batch_size=ops.shape(all_texts)[0])
    total, global_batch = sum_over_text_chunks(
        sigmoid_block_loss, image_emb, text_emb, log_temperature, bias, mesh=mesh, axis_name=axis_name)
    return total / ops.cast(global_batch, "float32")


def global_pair_hits(image_emb, text_emb, *, axis_name=None):
    """Image->text top-1 over the global batch: [N] float32 0/1 per local image (feed a keras Mean).

    Text->image: swap the arguments.
    """
    return pair_hits(image_emb, gather(ops.cast(text_emb, "float32"), axis_name),
                     label_offset=local_row_offset(image_emb, axis_name))


# --------------------------------------------------------------------------------------------- chunk loops
def sum_over_text_chunks(block_fn, image_emb, text_emb, *scalars, mesh=None, axis_name=None):
    """Sum a pairwise block loss over the local images and every replica's text chunk.

    Args:
        block_fn: ``block_fn(image [N, D], text_chunk [N_k, D], *scalars, positive) -> float32 scalar``,
            the unnormalised loss of one block; ``positive`` is a float32 scalar, 1.0 for the replica's
            own chunk (positives on the block's diagonal) and 0.0 for the others. E.g.
            ``keras_mm.losses.sigmoid_block_loss``.
        image_emb: [N, D] local image embeddings (float32).
        text_emb: [N, D] local text embeddings (float32).
        *scalars: scalar parameters passed to block_fn (t', b), replicated.
        mesh, axis_name: as in ``global_sigmoid_loss``.

    Returns:
        (total, G): total = this program's sum of block_fn over its rows and all G text columns (under a
        JAX ``mesh`` the program is global, so the psum over the ring); G = the global batch size.
    """
    scalars = tuple(ops.cast(s, "float32") for s in scalars)
    if keras.backend.backend() == "jax":
        return _jax_chunk_sum(block_fn, image_emb, text_emb, scalars, mesh, axis_name)
    context = _tf_replica_context()
    if context is None:
        return block_fn(image_emb, text_emb, *scalars, ops.ones((), "float32")), ops.shape(text_emb)[0]
    return _tf_chunk_sum(block_fn, image_emb, text_emb, scalars, context)


def _tf_chunk_sum(block_fn, image_emb, text_emb, scalars, context):
    """tf.distribute: gather the texts, then one [N, N_k] block per replica chunk, in sequence."""
    import tensorflow as tf

    num_replicas = context.num_replicas_in_sync
    replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
    if _equal_static_local_batches(text_emb):
        # XLA (TPU) needs static chunk shapes: gather [R, N, D] and take chunk k.
        chunks = tf.unstack(context.all_gather(text_emb[None], axis=0), num=num_replicas)  # R x [N, D]
        global_batch = num_replicas * text_emb.shape[0]
    else:
        # Local batches may differ (MirroredStrategy splits 7 into 4 + 3, each replica traced with its own
        # static shape): split the gathered texts by the gathered sizes.
        sizes = local_batch_sizes(text_emb)  # [R]
        all_texts = context.all_gather(text_emb, axis=0)  # [G, D]
        chunks = tf.split(all_texts, sizes, num=num_replicas, axis=0)  # R x [N_k, D]
        global_batch = tf.reduce_sum(sizes)

    # Rematerialise each block in the backward pass: only its inputs are kept, not its [N, N_k] logits.
    @tf.recompute_grad
    def block(image, chunk, positive, *block_scalars):
        return block_fn(image, chunk, *block_scalars, positive)

    total = tf.zeros((), tf.float32)
    for k, chunk in enumerate(chunks):
        # The control dependency runs the blocks one after another, so one block's logits are alive at a time.
        with tf.control_dependencies([total]):
            positive = tf.cast(tf.equal(replica_id, k), tf.float32)
            total = total + block(image_emb, chunk, positive, *scalars)
    return total, global_batch


def _equal_static_local_batches(x):
    """True where every replica's local batch has the same static size: under TPUStrategy (XLA, static
    shapes by construction). Elsewhere a static shape proves nothing about the other replicas."""
    import tensorflow as tf

    tpu_strategies = (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)
    return x.shape[0] is not None and isinstance(tf.distribute.get_strategy(), tpu_strategies)


def _jax_ring(block_fn, image, text, scalars, axis_name):
    """Inside shard_map: this device's [N, D] images against every device's texts, passed round a ring.

    After step k the device holds the texts of device (me - k) mod R; only step 0 (its own) has positives.
    Returns this device's unnormalised sum.
    """
    import jax

    size = jax.lax.axis_size(axis_name)
    block = jax.checkpoint(block_fn)  # keep only the block inputs for the backward pass
    total = block(image, text, *scalars, ops.ones((), "float32"))
    if size == 1:
        return total
    permutation = [(j, (j + 1) % size) for j in range(size)]

    def step(_, carry):
        chunk, subtotal = carry
        chunk = jax.lax.ppermute(chunk, axis_name, permutation)  # [N, D] from the previous device
        return chunk, subtotal + block(image, chunk, *scalars, ops.zeros((), "float32"))

    return jax.lax.fori_loop(1, size, step, (text, total))[1]


def _jax_chunk_sum(block_fn, image_emb, text_emb, scalars, mesh, axis_name):
    """JAX: the ring in the caller's shard_map, or in one over ``mesh`` / keras.distribution's mesh."""
    import jax

    if axis_name is not None and mesh is None:
        # Already inside the caller's shard_map: this device's sum; G = N * R.
        total = _jax_ring(block_fn, image_emb, text_emb, scalars, axis_name)
        return total, ops.shape(text_emb)[0] * jax.lax.axis_size(axis_name)
    if mesh is None:
        distribution = keras.distribution.distribution()
        if distribution is not None:
            mesh = distribution.device_mesh.backend_mesh
            axis_name = axis_name or distribution.batch_dim_name
    if mesh is None:
        # One program over the global arrays and no mesh to ring over: the batch is a single chunk.
        return block_fn(image_emb, text_emb, *scalars, ops.ones((), "float32")), ops.shape(text_emb)[0]
    axis_name = axis_name or mesh.axis_names[0]
    spec = jax.sharding.PartitionSpec

    def sharded(image, text, *ring_scalars):  # [N, D] shards -> the global sum, replicated
        return jax.lax.psum(_jax_ring(block_fn, image, text, ring_scalars, axis_name), axis_name)

    total = jax.shard_map(
        sharded, mesh=mesh, in_specs=(spec(axis_name), spec(axis_name)) + (spec(),) * len(scalars),
        out_specs=spec())(image_emb, text_emb, *scalars)
    return total, ops.shape(text_emb)[0]
