"""Outputs and gradients of a layer on the current backend (TensorFlow: GradientTape; JAX:
``jax.value_and_grad`` over ``stateless_call``), for the rematerialisation tests."""

from __future__ import annotations

import keras
import numpy as np


def _loss(y):
    y = keras.ops.cast(y, "float32")
    weights = keras.ops.cos(keras.ops.arange(y.shape[-1], dtype="float32"))
    return keras.ops.sum(keras.ops.square(y) * weights)


def outputs_and_gradients(layer, x, **call_kwargs):
    """Returns ``(outputs, [d loss / d x] + [d loss / d w for w in trainable weights])`` as
    NumPy, with ``loss = sum(y^2 * cos(feature index))`` (float inputs only get a gradient)."""
    backend = keras.backend.backend()
    float_input = np.issubdtype(np.asarray(x).dtype, np.floating)
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            if float_input:
                tape.watch(x)
            y = layer(x, **call_kwargs)
            loss = _loss(y)
        sources = ([x] if float_input else []) + list(layer.trainable_variables)
        grads = tape.gradient(loss, sources)
        grads = [tf.convert_to_tensor(g) for g in grads]
        return np.asarray(y), [np.asarray(g) for g in grads]
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def f(params, inputs):
            y, new_state = layer.stateless_call(params, non_trainable, inputs, **call_kwargs)
            return _loss(y), (y, new_state)

        # Jitted and returning the updated seed states, like Keras' JAX trainer: a random op
        # drawn inside jax.checkpoint would leak a tracer here.
        argnums = (0, 1) if float_input else (0,)
        step = jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))
        (_, (y, new_state)), grads = step(trainable, x)
        [np.asarray(v) for v in new_state]
        grads = ([grads[1]] if float_input else []) + list(grads[0])
        return np.asarray(y), [np.asarray(g) for g in grads]
    raise NotImplementedError(backend)
