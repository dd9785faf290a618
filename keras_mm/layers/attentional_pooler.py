"""Attentional pooling (CoCa, Yu et al. 2022, Algorithm 1)::

    out = LayerNorm(MultiHeadAttention(query=learned queries [n, width], keys/values=features))

CoCa pools the image encoder's tokens twice: one query for the contrastive image embedding and
N queries (256 in the paper) for the captioning decoder's cross-attention.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.layers.attention import MultiHeadAttention


@keras.saving.register_keras_serializable(package="keras_mm")
class AttentionalPooler(keras.layers.Layer):
    """``[batch, tokens, C] -> [batch, num_queries, width]``.

    Args:
        num_queries: learned queries n.
        num_heads: attention heads.
        width: output width (and the queries'); default the input width C.
        layer_norm_epsilon: of the output LayerNorm.

    Call args: ``features [batch, tokens, C]``, ``padding_mask [batch, tokens]`` (optional,
    True = a real token).
    """

    def __init__(self, num_queries, num_heads, width=None, layer_norm_epsilon=1e-6,
                 attention_impl=None, **kwargs):
        super().__init__(**kwargs)
        self.num_queries, self.num_heads = int(num_queries), int(num_heads)
        self.width = None if width is None else int(width)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.attention = MultiHeadAttention(self.num_heads, attention_impl=attention_impl,
                                            dtype=self.dtype_policy, name="attention")
        self.attention_impl = self.attention.attention_impl
        self.norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="norm")

    def build(self, features_shape):
        width = self.width or int(features_shape[-1])
        self.queries = self.add_weight(
            name="queries", shape=(self.num_queries, width),
            initializer=keras.initializers.RandomNormal(stddev=0.02))
        query_shape = (features_shape[0], self.num_queries, width)
        self.attention.build(query_shape, features_shape)
        self.norm.build(query_shape)

    def call(self, features, padding_mask=None):
        queries = ops.cast(self.queries, features.dtype)[None]             # [1, n, width]
        queries = ops.broadcast_to(queries, (ops.shape(features)[0],) + tuple(queries.shape[1:]))
        out = self.attention(queries, features, attention_mask=padding_mask)
        return self.norm(out)                                              # [b, n, width]

    def compute_output_shape(self, features_shape):
        return (features_shape[0], self.num_queries, self.width or features_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(num_queries=self.num_queries, num_heads=self.num_heads, width=self.width,
                      layer_norm_epsilon=self.layer_norm_epsilon,
                      attention_impl=self.attention_impl)
        return config
