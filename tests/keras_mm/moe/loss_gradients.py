"""Gradients of any scalar function of a layer's outputs ``(y, routing)`` w.r.t. its trainable
weights on the current backend (TensorFlow: GradientTape; JAX: ``jax.grad`` over
``stateless_call``), for the auxiliary-loss and remat tests. ``tests/keras_mm/layers/gradients.py``
covers the plain ``sum(y^2 cos)`` loss."""

from __future__ import annotations

import keras
import numpy as np


def loss_and_gradients(layer, x, loss_fn, **call_kwargs):
    """``loss_fn(layer(x, return_routing=True, **call_kwargs))`` and its gradients, as NumPy
    ``(loss, [d loss / d w for w in layer.trainable_variables])``."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(layer(x, return_routing=True, **call_kwargs))
        grads = tape.gradient(loss, layer.trainable_variables)
        # None: the loss does not depend on that weight (JAX returns zeros there).
        return float(loss), [np.zeros(v.shape, "float32") if g is None
                             else np.asarray(tf.convert_to_tensor(g))
                             for v, g in zip(layer.trainable_variables, grads)]
    if backend == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def f(params):
            outputs, _ = layer.stateless_call(params, non_trainable, x, return_routing=True,
                                              **call_kwargs)
            return loss_fn(outputs)

        loss, grads = jax.jit(jax.value_and_grad(f))([v.value for v in layer.trainable_variables])
        return float(loss), [np.asarray(g) for g in grads]
    raise NotImplementedError(backend)
