"""Projection of a pooled representation into the shared embedding space of two towers: linear
(CLIP, SigLIP's text head) or a small MLP (Dense -> GELU -> Dense)."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="keras_mm")
class ProjectionHead(keras.layers.Layer):
    """``[batch, width] -> [batch, output_dim]``.

    Args:
        output_dim: embedding width.
        hidden_dim: None for a linear projection, else the hidden width of an MLP head.
        activation: of the MLP head.
        use_bias: biases (big_vision heads have one; CLIP's projections do not).
        kernel_initializer: e.g. ``"zeros"`` for big_vision's zero-initialised classifier heads.
    """

    def __init__(self, output_dim, hidden_dim=None, activation="gelu", use_bias=True,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.output_dim = int(output_dim)
        self.hidden_dim = None if hidden_dim is None else int(hidden_dim)
        self.activation = activation
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.hidden = (keras.layers.Dense(
            self.hidden_dim, activation=activation, use_bias=self.use_bias,
            dtype=self.dtype_policy, name="hidden") if self.hidden_dim else None)
        self.projection = keras.layers.Dense(
            self.output_dim, use_bias=self.use_bias, kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy, name="projection")

    def build(self, input_shape):
        if self.hidden is not None:
            self.hidden.build(input_shape)
            input_shape = tuple(input_shape[:-1]) + (self.hidden_dim,)
        self.projection.build(input_shape)

    def call(self, x):
        if self.hidden is not None:
            x = self.hidden(x)
        return self.projection(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            output_dim=self.output_dim, hidden_dim=self.hidden_dim, activation=self.activation,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer))
        return config
