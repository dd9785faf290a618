"""AdamW with weight-decay masks, linear warmup + cosine decay, global-norm clipping, gradient accumulation.

``make_optimizer(config, total_steps)`` builds the optimizer of a recipe
(keras_mm.recipes.config.OptimizerConfig: ``lr``, ``end_lr``, ``weight_decay``, ``warmup_steps``,
``total_steps``, ``clip``, ``accumulation``, ``b1``, ``b2``, ``eps``, ``no_decay``).

Steps. Every step count (``warmup_steps``, ``total_steps``, TrainConfig's ``steps``, checkpoint and log
periods) counts *train steps*: batches given to ``model.fit``. With ``accumulation = K`` the weights move
every K train steps, with the mean of the K micro-batch gradients (Keras' ``gradient_accumulation_steps``),
so K train steps of batch B make one update of batch K * B. The learning rate is held for each window of
K steps (``AccumulationAlignedSchedule``): a run with batch B, accumulation K and step counts K times
larger reproduces the run with batch K * B, update for update (tested).

Schedule. Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``end_lr`` at
``total_steps``, constant after (Keras' ``CosineDecay`` with ``warmup_target``):

    lr(s) = lr * s / W                                           s < W
    lr(s) = end_lr + (lr - end_lr) * (1 + cos(pi * p)) / 2,       p = min(s - W, T - W) / (T - W)

Weight decay. Decoupled (Loshchilov & Hutter), Keras' / PyTorch's convention: each update also does
``w -= lr(s) * weight_decay * w``; big_vision's decoupled ``wd`` (multiplied by the schedule only, not by
the learning rate) equals ``weight_decay * lr``, so SigLIP's wd 1e-4 at lr 1e-3 is ``weight_decay=0.1``
here. The mask rule (``decays``): a trainable variable decays iff

  1. it has rank >= 2 (so vector biases, LayerNorm / RMSNorm scales and offsets, LayerScale vectors, and
     the scalar contrastive temperature / logit scale ``t'`` and bias ``b`` never decay), and
  2. its path matches none of ``NO_DECAY_PATTERNS`` (``re.search`` on ``variable.path``): biases of any
     rank (``.../qkv_bias`` is [3, heads, head_dim]), token embeddings (``.../embeddings``), learned
     position embeddings (``pos_embed``, ``position_embedding``), class tokens and MAP probes.

So exactly the matmul / conv kernels decay (the patch embedding's conv kernel and the attention's
``qkv_kernel`` included; tested on keras_mm's ViT and text encoders), as in big_vision's ``.*/kernel$``
rule and timm's ``no_weight_decay``.

Clipping. ``clip`` is a global-norm clip of the gradient of the global batch. Keras 3's TensorFlow
optimizer clips *before* its cross-replica all-reduce, i.e. each replica's share by its own norm, which is
not the single-device result under MirroredStrategy / TPUStrategy; ``AdamW`` here clips by the norm of
the summed gradient (one extra all-reduce of the gradients per update; tested against one device).

Accumulation under tf.distribute. Keras 3's own accumulation fails under MirroredStrategy ("merge_call
called while defining a new graph": its update / accumulate cond runs in the replica context and both
branches synchronise replicas); ``AdamW`` here takes that branch in the cross-replica context, as
``LossScaleOptimizer`` does (tested against one device, with clipping). Each replica accumulates its own
share, and a checkpoint holds the first replica's accumulators only: keep ``checkpoint_every`` a multiple
of ``accumulation`` so checkpoints fall on update steps, where the accumulators are zero (ExperimentConfig
checks it). On JAX (``keras.distribution``) Keras' accumulation works as is.
"""

import math
import re

import keras
from keras import ops

from keras_mm.training import mixed_precision

NO_DECAY_PATTERNS = (
    r"bias$",                       # biases of any rank (attention's qkv_bias is [3, heads, head_dim])
    r"(^|/)embeddings$",            # keras.layers.Embedding, learned position embeddings
    r"pos(ition)?_?embed",          # pos_embed, position_embedding, posembed...
    r"(^|/)(cls|class)_token$",     # ViT class token
    r"(^|/)probe$",                 # MAP head probe
)


def _path(variable):
    return getattr(variable, "path", None) or variable.name


def decays(variable, no_decay=NO_DECAY_PATTERNS, min_rank=2):
    """Whether weight decay applies to ``variable`` (the rule of the module docstring)."""
    if len(variable.shape) < min_rank:
        return False
    path = _path(variable)
    return not any(re.search(pattern, path) for pattern in no_decay)


def _tf_replica_context():
    """The tf.distribute replica context when more than one replica is in sync, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


@keras.saving.register_keras_serializable(package="keras_mm")
class AdamW(keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` with the weight-decay mask rule and a cross-replica global-norm clip.

    Args:
      no_decay: regexes (``re.search`` on ``variable.path``) of variables that never decay.
      decay_min_rank: variables of lower rank never decay.
      **kwargs: ``keras.optimizers.AdamW`` arguments (``learning_rate``, ``weight_decay``, ``beta_1``,
        ``beta_2``, ``epsilon``, ``global_clipnorm``, ``gradient_accumulation_steps``...).
    """

    def __init__(self, *args, no_decay=NO_DECAY_PATTERNS, decay_min_rank=2, **kwargs):
        super().__init__(*args, **kwargs)
        self.no_decay = tuple(no_decay)
        self.decay_min_rank = int(decay_min_rank)
        for pattern in self.no_decay:
            re.compile(pattern)  # fail early on a bad pattern

    def build(self, variables):
        excluded = [v for v in variables
                    if not decays(v, self.no_decay, self.decay_min_rank)]
        # The public mask API; it must be set before the optimizer is built.
        self.exclude_from_weight_decay(var_list=excluded)
        super().build(variables)

    def _clip_gradients(self, grads):
        context = _tf_replica_context()
        if context is None or not self.global_clipnorm or self.global_clipnorm <= 0:
            return super()._clip_gradients(grads)
        # Under tf.distribute each replica holds its share of the gradient; the update uses their SUM.
        present = [g for g in grads if g is not None]
        import tensorflow as tf

        total = context.all_reduce(tf.distribute.ReduceOp.SUM, present)
        norm = tf.linalg.global_norm(total)
        clip = tf.cast(self.global_clipnorm, norm.dtype)
        factor = clip / tf.maximum(norm, clip)
        return [None if g is None else g * tf.cast(factor, g.dtype) for g in grads]

    def _backend_apply_gradients(self, grads, trainable_variables):
        context = _tf_replica_context()
        if context is None or not self.gradient_accumulation_steps:
            return super()._backend_apply_gradients(grads, trainable_variables)
        if self.use_ema:
            raise NotImplementedError("EMA with gradient accumulation under tf.distribute")
        # Keras branches between "update" and "accumulate" with a cond in the replica context, and both
        # branches synchronise replicas (merge_call), which tf.distribute rejects ("merge_call called
        # while defining a new graph"). As keras.optimizers.LossScaleOptimizer does, take the branch in
        # the cross-replica context and run each branch on every replica. Accumulators hold each
        # replica's local sum; the update all-reduces (and clips) their mean as Keras does without
        # accumulation.
        steps = self.gradient_accumulation_steps
        accumulators = [self._accumulated_gradients[self._get_variable_index(v)]
                        for v in trainable_variables]

        def update(grads, variables):
            grads = [(g + a) / steps for g, a in zip(grads, accumulators)]
            grads = self._clip_gradients(grads)
            self._apply_weight_decay(variables)
            self._backend_update_step(grads, variables, self.learning_rate)
            self._backend_reset_gradient_accumulators()

        def accumulate(grads):
            self._backend_increment_gradient_accumulators(grads, accumulators)

        def cross_replica(distribution, grads, variables):
            ops.cond(
                (self._iterations + 1) % steps == 0,
                lambda: distribution.extended.call_for_each_replica(update, args=(grads, variables)),
                lambda: distribution.extended.call_for_each_replica(accumulate, args=(grads,)),
            )

        context.merge_call(cross_replica, args=(grads, list(trainable_variables)))

    def get_config(self):
        config = super().get_config()
        config.update(no_decay=list(self.no_decay), decay_min_rank=self.decay_min_rank)
        return config


@keras.saving.register_keras_serializable(package="keras_mm")
class AccumulationAlignedSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """``schedule`` held constant over each window of ``steps`` train steps: lr(s) = schedule(floor(s /
    steps) * steps). Keras evaluates the schedule at every micro-step with gradient accumulation; this
    makes the update of window u use schedule(u * steps), which equals the big-batch run's lr at update u
    when the schedule's step counts are ``steps`` times larger."""

    def __init__(self, schedule, steps):
        if steps < 1:
            raise ValueError(f"AccumulationAlignedSchedule needs steps >= 1, got {steps}")
        self.schedule = schedule
        self.steps = int(steps)

    def __call__(self, step):
        step = ops.convert_to_tensor(step)
        return self.schedule(ops.multiply(ops.floor_divide(step, self.steps), self.steps))

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule), "steps": self.steps}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = keras.optimizers.schedules.deserialize(config["schedule"])
        return cls(**config)


def warmup_cosine(lr, total_steps, warmup_steps=0, end_lr=0.0):
    """Linear warmup 0 -> ``lr`` over ``warmup_steps``, cosine decay to ``end_lr`` at ``total_steps``.

    Returns:
      a ``keras.optimizers.schedules.CosineDecay``.
    """
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(
            f"the schedule needs 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}")
    if lr <= 0 or not 0 <= end_lr <= lr:
        raise ValueError(f"the schedule needs lr > 0 and 0 <= end_lr <= lr, got lr={lr}, end_lr={end_lr}")
    alpha = end_lr / lr
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(float(lr), int(total_steps), alpha=alpha)
    return keras.optimizers.schedules.CosineDecay(
        0.0, int(total_steps - warmup_steps), alpha=alpha, warmup_target=float(lr),
        warmup_steps=int(warmup_steps))


def warmup_cosine_reference(step, lr, total_steps, warmup_steps=0, end_lr=0.0):
    """The schedule of the module docstring in plain Python (documentation and tests)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    p = min(step - warmup_steps, total_steps - warmup_steps) / (total_steps - warmup_steps)
    return end_lr + (lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def make_schedule(config, total_steps=None):
    """The learning-rate schedule of an OptimizerConfig (see the module docstring); it ends at
    ``config.total_steps``, else at ``total_steps``."""
    total = config.total_steps if config.total_steps is not None else total_steps
    if total is None:
        raise ValueError("make_optimizer needs total_steps (OptimizerConfig.total_steps or the run's "
                         "train steps as argument)")
    schedule = warmup_cosine(config.lr, total, config.warmup_steps, config.end_lr)
    if config.accumulation > 1:
        schedule = AccumulationAlignedSchedule(schedule, config.accumulation)
    return schedule


def make_optimizer(config, total_steps=None, precision=None):
    """AdamW of an OptimizerConfig.

    Args:
      config: an OptimizerConfig (or any object with its fields).
      total_steps: the run's train steps: where the cosine ends unless ``config.total_steps`` is set.
      precision: "float32", "mixed_bfloat16" or "mixed_float16"; default the global dtype policy. Under
        mixed_float16 the optimizer is wrapped in a ``keras.optimizers.LossScaleOptimizer``.

    Returns:
      a keras optimizer. Create it inside ``strategy.scope()`` on the TensorFlow backend.
    """
    if config.accumulation < 1:
        raise ValueError(f"accumulation must be >= 1, got {config.accumulation}")
    optimizer = AdamW(
        learning_rate=make_schedule(config, total_steps),
        weight_decay=config.weight_decay,
        beta_1=config.b1,
        beta_2=config.b2,
        epsilon=config.eps,
        global_clipnorm=config.clip if config.clip else None,
        gradient_accumulation_steps=config.accumulation if config.accumulation > 1 else None,
        no_decay=NO_DECAY_PATTERNS if config.no_decay is None else config.no_decay,
    )
    return mixed_precision.wrap_optimizer(optimizer, precision)


def current_learning_rate(optimizer):
    """The learning rate the next update uses, as a Python float."""
    return float(ops.convert_to_numpy(optimizer.learning_rate))
