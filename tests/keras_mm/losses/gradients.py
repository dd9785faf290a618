"""Shared helper of the loss tests: a value and its gradients on the active backend."""

import keras
import numpy as np
import pytest


def value_and_grads(fn, *args):
    """fn(*tensors) -> scalar; returns (value, [d value / d arg]) as NumPy, on the active backend."""
    args = [np.asarray(a, np.float32) for a in args]
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            value = fn(*tensors)
        grads = tape.gradient(value, tensors)
    elif backend == "jax":
        import jax

        value, grads = jax.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)
    else:
        pytest.skip(f"no gradient helper for backend {backend}")
    return np.asarray(value), [np.asarray(g) for g in grads]
