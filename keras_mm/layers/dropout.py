"""Dropout and drop-path (stochastic depth) driven by seeds drawn *before* rematerialised code.

A rematerialised (gradient-checkpointed) function is run twice: once forward, once again in the
backward pass. If it drew its own random numbers from a stateful ``keras.random.SeedGenerator``,
the second run would draw a different dropout mask (TensorFlow's ``tf.recompute_grad``), or store
a tracer in the generator's state (JAX's ``jax.checkpoint``). So the callers in this package draw a
seed tensor outside (``seed_generator.next()``) and hand it in; ``FixedSeed`` lets ``keras.random``
use that tensor, which makes the mask a pure function of the seed on every backend.
"""

from __future__ import annotations

import keras


class FixedSeed(keras.random.SeedGenerator):
    """A ``SeedGenerator`` that always returns the same, already drawn seed tensor ``[2]``.

    It owns no state (no variable), so it may be created inside a traced / rematerialised call.
    """

    def __init__(self, seed):  # noqa: D107 - deliberately no SeedGenerator.__init__ (no variable)
        self._seed = seed
        self.name = "fixed_seed"

    def next(self, ordered=True):
        return self._seed


def _as_seed(seed):
    if seed is None or isinstance(seed, (int, keras.random.SeedGenerator)):
        return seed
    return FixedSeed(seed)


def dropout(x, rate, seed):
    """Inverted dropout. ``seed``: a SeedGenerator, an int, or a seed tensor ``[2]``."""
    if not rate:
        return x
    return keras.random.dropout(x, rate, seed=_as_seed(seed))


def drop_path(x, rate, seed):
    """Stochastic depth (Huang et al. 2016): drops the whole residual branch per example.

    ``x``: ``[batch, ...]``; every example is kept with probability ``1 - rate`` and scaled by
    ``1 / (1 - rate)``.
    """
    if not rate:
        return x
    noise_shape = (None,) + (1,) * (len(x.shape) - 1)  # None: the batch size at run time
    return keras.random.dropout(x, rate, noise_shape=noise_shape, seed=_as_seed(seed))
