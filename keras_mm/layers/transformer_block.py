"""Pre-LayerNorm transformer block (ViT / big_vision ``Encoder1DBlock``)::

    x = x + drop_path(dropout(attn(LN(x))))
    x = x + drop_path(dropout(mlp(LN(x))))

with optional rematerialisation (gradient checkpointing) of the whole block.

Rematerialisation uses ``keras.remat`` (Keras 3.15: ``tf.recompute_grad`` on TensorFlow,
``jax.checkpoint`` on JAX) around the block's forward function. Keras also offers
``keras.RematScope``, which marks every layer *constructed* inside the scope; around a block it
would rematerialise each sublayer again inside the block's own recomputation, and Keras' stateful
dropout inside a recomputed function draws a different mask in the backward pass (TensorFlow) or
leaks a tracer into the seed state (JAX). So the block draws its dropout seeds before the
recomputed function (``keras_mm.layers.dropout``) and wraps only itself.
"""

from __future__ import annotations

import keras

from keras_mm.layers.attention import MultiHeadAttention
from keras_mm.layers.dropout import drop_path, dropout
from keras_mm.layers.mlp import Mlp

# keras.remat is tf.recompute_grad on TensorFlow, jax.checkpoint on JAX (torch has it too);
# other backends run the block as is.
REMAT_BACKENDS = ("tensorflow", "jax", "torch")


@keras.saving.register_keras_serializable(package="keras_mm")
class TransformerBlock(keras.layers.Layer):
    """``[batch, tokens, width] -> [batch, tokens, width]``.

    Args:
        num_heads, mlp_dim: attention heads and MLP hidden width.
        dropout: rate after the attention and after the MLP (and inside the MLP).
        attention_dropout: rate on the attention probabilities.
        drop_path: stochastic-depth rate of both residual branches.
        qk_norm, use_qkv_bias, fused_qkv, attention_impl: see ``MultiHeadAttention``.
        activation: of the MLP.
        layer_norm_epsilon: of the two LayerNorms (1e-6 as big_vision; CLIP uses 1e-5).
        remat: recompute the block's activations in the backward pass instead of storing them
            (``keras.remat``: ``tf.recompute_grad`` / ``jax.checkpoint``). Dropout seeds are drawn
            outside the recomputed function so both passes use the same masks.

    Call args:
        x: ``[batch, tokens, width]``.
        attention_mask: see ``keras_mm.layers.attention.attention_mask`` (True = attend).
        use_causal_mask: causal self-attention.
        training: enables dropout / drop-path.
    """

    def __init__(self, num_heads, mlp_dim, dropout=0.0, attention_dropout=0.0, drop_path=0.0,
                 qk_norm=False, use_qkv_bias=True, fused_qkv=True, attention_impl=None,
                 activation="gelu_approximate", layer_norm_epsilon=1e-6, remat=False, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.drop_path = float(drop_path)
        self.qk_norm = bool(qk_norm)
        self.use_qkv_bias = bool(use_qkv_bias)
        self.fused_qkv = bool(fused_qkv)
        self.activation = activation
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.remat = bool(remat)
        self.norm1 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="norm1")
        self.attention = MultiHeadAttention(
            self.num_heads, qk_norm=self.qk_norm, use_qkv_bias=self.use_qkv_bias,
            fused_qkv=self.fused_qkv, dropout=self.attention_dropout,
            attention_impl=attention_impl, dtype=self.dtype_policy, name="attention")
        self.attention_impl = self.attention.attention_impl
        self.norm2 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="norm2")
        self.mlp = Mlp(self.mlp_dim, activation=activation, dropout=self.dropout,
                       dtype=self.dtype_policy, name="mlp")
        self._num_seeds = sum(bool(r) for r in (self.attention_dropout, self.dropout,
                                                self.dropout, self.dropout, self.drop_path,
                                                self.drop_path))
        self.seed_generator = keras.random.SeedGenerator() if self._num_seeds else None

    def build(self, input_shape):
        self.norm1.build(input_shape)
        self.attention.build(input_shape)
        self.norm2.build(input_shape)
        self.mlp.build(input_shape)

    def _draw_seeds(self, training):
        """Seed tensors for every random op of one call (outside any rematerialised code)."""
        if not training or not self._num_seeds:
            return {}
        rates = dict(attention=self.attention_dropout, attention_out=self.dropout,
                     mlp_hidden=self.dropout, mlp_out=self.dropout,
                     drop_path_attention=self.drop_path, drop_path_mlp=self.drop_path)
        return {name: self.seed_generator.next() for name, rate in rates.items() if rate}

    def call(self, x, attention_mask=None, use_causal_mask=False, training=None):
        seeds = self._draw_seeds(training)

        def forward(x):
            y = self.attention(self.norm1(x), attention_mask=attention_mask,
                               use_causal_mask=use_causal_mask, training=training,
                               seed=seeds.get("attention"))
            if seeds:
                y = drop_path(dropout(y, self.dropout, seeds.get("attention_out")),
                              self.drop_path, seeds.get("drop_path_attention"))
            x = x + y
            y = self.mlp(self.norm2(x), training=training, seed=seeds.get("mlp_hidden"))
            if seeds:
                y = drop_path(dropout(y, self.dropout, seeds.get("mlp_out")),
                              self.drop_path, seeds.get("drop_path_mlp"))
            return x + y

        if self.remat and keras.backend.backend() in REMAT_BACKENDS:
            return keras.remat(forward)(x)
        return forward(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
            attention_dropout=self.attention_dropout, drop_path=self.drop_path,
            qk_norm=self.qk_norm, use_qkv_bias=self.use_qkv_bias, fused_qkv=self.fused_qkv,
            attention_impl=self.attention_impl, activation=self.activation,
            layer_norm_epsilon=self.layer_norm_epsilon, remat=self.remat)
        return config
