"""The transformer MLP block: Dense -> GELU -> dropout -> Dense (Vaswani et al. 2017; ViT)."""

from __future__ import annotations

import keras

from keras_mm.layers.dropout import dropout as _dropout


@keras.saving.register_keras_serializable(package="keras_mm")
class Mlp(keras.layers.Layer):
    """``[..., width] -> [..., hidden_dim] -> [..., output_dim or width]``.

    Args:
        hidden_dim: width of the hidden layer (``mlp_dim`` in the ViT papers).
        output_dim: output width; default the input width.
        activation: of the hidden layer; ``"gelu_approximate"`` (tanh form, as flax's default
            and big_vision / SigLIP) or any Keras activation name (``"gelu"`` is the exact erf).
        dropout: rate after the activation (training only).
        kernel_initializer, bias_initializer: of both Dense layers. The default bias init
            (normal, stddev 1e-6) follows big_vision's MlpBlock.

    Call args: ``x``, ``training``, ``seed`` (optional seed tensor ``[2]`` for the dropout).
    """

    def __init__(self, hidden_dim, output_dim=None, activation="gelu_approximate", dropout=0.0,
                 kernel_initializer="glorot_uniform", bias_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.output_dim = None if output_dim is None else int(output_dim)
        self.activation = activation
        self.dropout = float(dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(
            bias_initializer or keras.initializers.RandomNormal(stddev=1e-6))
        self.seed_generator = keras.random.SeedGenerator() if self.dropout else None
        act = _gelu_approximate if activation == "gelu_approximate" else activation
        self.fc1 = keras.layers.Dense(
            self.hidden_dim, activation=act, kernel_initializer=self.kernel_initializer,
            bias_initializer=keras.initializers.get(
                keras.initializers.serialize(self.bias_initializer)),
            dtype=self.dtype_policy, name="fc1")
        self.fc2 = None  # built once the input width is known

    def build(self, input_shape):
        width = self.output_dim or int(input_shape[-1])
        self.fc2 = keras.layers.Dense(
            width, kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)),
            bias_initializer=keras.initializers.get(
                keras.initializers.serialize(self.bias_initializer)),
            dtype=self.dtype_policy, name="fc2")
        self.fc1.build(input_shape)
        self.fc2.build(tuple(input_shape[:-1]) + (self.hidden_dim,))

    def call(self, x, training=None, seed=None):
        h = self.fc1(x)
        if training and self.dropout:
            h = _dropout(h, self.dropout, seed if seed is not None else self.seed_generator)
        return self.fc2(h)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim, output_dim=self.output_dim, activation=self.activation,
            dropout=self.dropout,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer))
        return config


def _gelu_approximate(x):
    return keras.activations.gelu(x, approximate=True)
