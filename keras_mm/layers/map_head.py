"""Multihead attention pooling (MAP; Lee et al. 2019 "Set Transformer", big_vision ``MAPHead``,
the SigLIP image head): a learned probe query attends over all tokens, then a residual MLP::

    z = MHA(query=probe, keys/values=x)          [batch, 1, width]
    z = z + MLP(LN(z));   return z[:, 0]          [batch, width]
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.layers.attention import MultiHeadAttention
from keras_mm.layers.mlp import Mlp


@keras.saving.register_keras_serializable(package="keras_mm")
class MAPHead(keras.layers.Layer):
    """``[batch, tokens, width] -> [batch, width]``, invariant to the order of the tokens.

    Args:
        num_heads: attention heads.
        mlp_dim: hidden width of the MLP (big_vision: the encoder's mlp_dim).
        fused_qkv, use_qkv_bias, attention_impl, activation, layer_norm_epsilon: as elsewhere.

    Call args: ``x``; ``padding_mask`` ``[batch, tokens]`` (True = a real token), optional.
    """

    def __init__(self, num_heads, mlp_dim, fused_qkv=True, use_qkv_bias=True,
                 attention_impl=None, activation="gelu_approximate", layer_norm_epsilon=1e-6,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.fused_qkv = bool(fused_qkv)
        self.use_qkv_bias = bool(use_qkv_bias)
        self.activation = activation
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.attention = MultiHeadAttention(
            self.num_heads, fused_qkv=self.fused_qkv, use_qkv_bias=self.use_qkv_bias,
            attention_impl=attention_impl, dtype=self.dtype_policy, name="attention")
        self.attention_impl = self.attention.attention_impl
        self.norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="norm")
        self.mlp = Mlp(self.mlp_dim, activation=activation, dtype=self.dtype_policy, name="mlp")

    def build(self, input_shape):
        width = int(input_shape[-1])
        self.probe = self.add_weight(name="probe", shape=(1, 1, width),
                                     initializer="glorot_uniform")
        probe_shape = (input_shape[0], 1, width)
        self.attention.build(probe_shape, input_shape)
        self.norm.build(probe_shape)
        self.mlp.build(probe_shape)

    def call(self, x, padding_mask=None):
        probe = ops.broadcast_to(ops.cast(self.probe, x.dtype), (ops.shape(x)[0], 1, x.shape[-1]))
        z = self.attention(probe, x, attention_mask=padding_mask)      # [b, 1, d]
        z = z + self.mlp(self.norm(z))
        return z[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, fused_qkv=self.fused_qkv,
            use_qkv_bias=self.use_qkv_bias, attention_impl=self.attention_impl,
            activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon)
        return config
