"""Shared helpers of the training tests: a small real problem (an MLP on sklearn's 1797 digits), an
OptimizerConfig-like namespace, and the learning-rate schedule written from its definition.

The digits stream is deterministic given the seed: shuffled (reshuffled every pass), repeated forever.
"""

import math
import types

import numpy as np

FEATURES = 64
CLASSES = 10


def digits_arrays():
    """sklearn's digits as float32 [1797, 64] in [0, 1] and int32 labels [1797]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int32)


def make_dataset(batch_size, seed=0):
    """Batches (x [B, 64], y [B]) of the shuffled, repeated digits."""
    import tensorflow as tf

    x, y = digits_arrays()
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).repeat()
    return ds.batch(batch_size, drop_remainder=True)


def make_model(hidden=32, dropout=0.1):
    """64 -> hidden (relu, LayerNorm, dropout) -> 10 logits; dropout makes the RNG state matter."""
    import keras

    return keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(hidden, activation="relu", name="hidden"),
        keras.layers.LayerNormalization(name="norm"),
        keras.layers.Dropout(dropout, name="dropout"),
        keras.layers.Dense(CLASSES, name="logits"),
    ], name="digits_mlp")


def compile_model(model, optimizer, jit_compile=False):
    import keras

    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=jit_compile)
    return model


def optimizer_config(**kwargs):
    """The fields of recipes' OptimizerConfig (without importing the recipes), overridable."""
    values = dict(lr=1e-3, end_lr=0.0, weight_decay=0.0, warmup_steps=0, total_steps=None, clip=None,
                  accumulation=1, b1=0.9, b2=0.999, eps=1e-8, no_decay=None)
    values.update(kwargs)
    return types.SimpleNamespace(**values)


def schedule_formula(step, lr, total, warmup, end_lr):
    """Linear warmup from 0, then cosine to end_lr at ``total`` (written from the definition)."""
    if step < warmup:
        return lr * step / warmup
    t = min(step, total)
    return end_lr + 0.5 * (lr - end_lr) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
