"""Pre-LayerNorm transformer decoder block (Vaswani et al. 2017; the CoCa / PaLI / CapPa text
decoders)::

    x = x + dropout(self_attn(LN1(x)))                       causal, or bidirectional
    x = x + dropout(cross_attn(LNc(x), context))             only in blocks with cross-attention
    x = x + dropout(mlp(LN2(x)))

A block built with cross-attention can skip it for a call (``use_cross_attention=False``): MaMMUT
runs the same decoder once without the image (contrastive pass) and once with it (captioning).
:meth:`DecoderBlock.step` runs one token against a key / value cache (incremental decoding).
"""

from __future__ import annotations

import keras

from keras_mm.layers.attention import MultiHeadAttention
from keras_mm.layers.mlp import Mlp


@keras.saving.register_keras_serializable(package="keras_mm")
class DecoderBlock(keras.layers.Layer):
    """``[batch, tokens, width] -> [batch, tokens, width]``.

    Args:
        num_heads, mlp_dim: attention heads and MLP hidden width.
        cross_attention: the block has a cross-attention sublayer over a context.
        dropout: rate after each sublayer (and inside the MLP).
        attention_dropout: rate on the attention probabilities.
        qk_norm, use_qkv_bias, fused_qkv, attention_impl, activation, layer_norm_epsilon: as in
            :class:`~keras_mm.layers.transformer_block.TransformerBlock`.

    Call args:
        x: ``[batch, tokens, width]``.
        context: ``[batch, context_tokens, context_width]`` for the cross-attention, or None.
        attention_mask: self-attention mask (``keras_mm.layers.attention.attention_mask``
            forms; True = attend), e.g. the padding mask ``[batch, tokens]``.
        use_causal_mask: causal self-attention.
        context_mask: ``[batch, context_tokens]`` (True = attend) or None.
        use_cross_attention: False skips the cross-attention of a block that has one.
        training: enables dropout.
    """

    def __init__(self, num_heads, mlp_dim, cross_attention=False, dropout=0.0,
                 attention_dropout=0.0, qk_norm=False, use_qkv_bias=True, fused_qkv=True,
                 attention_impl=None, activation="gelu_approximate", layer_norm_epsilon=1e-6,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.mlp_dim = int(num_heads), int(mlp_dim)
        self.cross_attention = bool(cross_attention)
        self.dropout, self.attention_dropout = float(dropout), float(attention_dropout)
        self.qk_norm, self.use_qkv_bias = bool(qk_norm), bool(use_qkv_bias)
        self.fused_qkv = bool(fused_qkv)
        self.activation = activation
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        policy = self.dtype_policy

        def norm(name):
            return keras.layers.LayerNormalization(epsilon=self.layer_norm_epsilon,
                                                   dtype=policy, name=name)

        def attention(name):
            return MultiHeadAttention(
                self.num_heads, qk_norm=self.qk_norm, use_qkv_bias=self.use_qkv_bias,
                fused_qkv=self.fused_qkv, dropout=self.attention_dropout,
                attention_impl=attention_impl, dtype=policy, name=name)

        self.self_norm = norm("self_norm")
        self.self_attention = attention("self_attention")
        self.attention_impl = self.self_attention.attention_impl
        if self.cross_attention:
            self.cross_norm = norm("cross_norm")
            self.cross_attention_layer = attention("cross_attention")
        self.mlp_norm = norm("mlp_norm")
        self.mlp = Mlp(self.mlp_dim, activation=activation, dropout=self.dropout, dtype=policy,
                       name="mlp")
        self.output_dropout = keras.layers.Dropout(self.dropout, dtype=policy,
                                                   name="output_dropout")

    def build(self, x_shape, context_shape=None):
        self.self_norm.build(x_shape)
        self.self_attention.build(x_shape)
        if self.cross_attention:
            if context_shape is None:           # the context width defaults to the width
                context_shape = tuple(x_shape)
            self.cross_norm.build(x_shape)
            self.cross_attention_layer.build(x_shape, context_shape)
        self.mlp_norm.build(x_shape)
        self.mlp.build(x_shape)

    def call(self, x, context=None, attention_mask=None, use_causal_mask=True,
             context_mask=None, use_cross_attention=True, training=None):
        y = self.self_attention(self.self_norm(x), attention_mask=attention_mask,
                                use_causal_mask=use_causal_mask, training=training)
        x = x + self.output_dropout(y, training=training)
        if self.cross_attention and use_cross_attention:
            if context is None:
                raise ValueError(f"{self.name} has cross-attention: give a context, or "
                                 "use_cross_attention=False")
            y = self.cross_attention_layer(self.cross_norm(x), context,
                                           attention_mask=context_mask, training=training)
            x = x + self.output_dropout(y, training=training)
        y = self.mlp(self.mlp_norm(x), training=training)
        return x + self.output_dropout(y, training=training)

    # -- incremental decoding ----------------------------------------------------------------
    def context_key_values(self, context):
        """The cross-attention keys / values of ``context`` (computed once per sequence), or
        ``()`` for a block without cross-attention."""
        if not self.cross_attention:
            return ()
        return self.cross_attention_layer.context_key_values(context)

    def step(self, x, key_cache, value_cache, index, context_kv=(), context_mask=None):
        """One token ``x [b, 1, width]`` at position ``index`` -> ``(y [b, 1, width],
        key_cache, value_cache)``; caches ``[b, max_len, heads, head_dim]`` (inference only).
        ``context_kv``: :meth:`context_key_values` of the context (cross-attention blocks)."""
        y, key_cache, value_cache = self.self_attention.self_attention_step(
            self.self_norm(x), key_cache, value_cache, index)
        x = x + y
        if self.cross_attention:
            keys, values = context_kv
            x = x + self.cross_attention_layer.attend_key_values(
                self.cross_norm(x), keys, values, padding_mask=context_mask)
        return x + self.mlp(self.mlp_norm(x)), key_cache, value_cache

    def compute_output_shape(self, x_shape, context_shape=None):
        return tuple(x_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim,
            cross_attention=self.cross_attention, dropout=self.dropout,
            attention_dropout=self.attention_dropout, qk_norm=self.qk_norm,
            use_qkv_bias=self.use_qkv_bias, fused_qkv=self.fused_qkv,
            attention_impl=self.attention_impl, activation=self.activation,
            layer_norm_epsilon=self.layer_norm_epsilon)
        return config
