"""Transformer text encoder over token ids, in the two forms the two-tower methods use:

* CLIP (Radford et al. 2021): causal self-attention, the representation is the final-LayerNorm
  output at the EOS token (``causal=True, pool="eos"``).
* SigLIP (Zhai et al. 2023, big_vision): bidirectional attention, pooled at the last token
  (``causal=False, pool="last"``) or by MAP (``pool="map"``).

Token ids follow keras_mm's tokenizer: PAD = 0, BOS = 1, EOS = 2, right padding. Padding is
masked out of the keys of every attention layer (for both forms), so a text's embedding does not
depend on how much padding follows it. Presets: ``keras_mm.encoders.presets.text_config``.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.encoders.projection_head import ProjectionHead
from keras_mm.layers import pooling
from keras_mm.layers.learned_position_embedding import LearnedPositionEmbedding
from keras_mm.layers.map_head import MAPHead
from keras_mm.layers.transformer_encoder import TransformerEncoder

POOLS = ("eos", "last", "first", "map", "gap")


@keras.saving.register_keras_serializable(package="keras_mm")
class TextEncoder(keras.Model):
    """Token ids ``[batch, L]`` (int, ``L <= max_len``) -> embeddings ``[batch, D]`` (float32).

    ``D`` is ``output_dim`` when a projection head is configured, else ``width``.
    ``call(ids, return_tokens=True)`` also returns the tokens ``[batch, L, width]`` after the
    final LayerNorm (compute dtype).

    Args:
        vocab_size, max_len: vocabulary size and the longest token sequence.
        width, depth, heads, mlp_dim: transformer sizes.
        causal: causal self-attention (CLIP) instead of bidirectional (SigLIP).
        pool: ``"eos"`` (the first EOS token, or the last non-pad token of a text cut before
            its EOS; CLIP), ``"last"`` (the last non-pad token; SigLIP's "last" with right
            padding - for unpadded input it is ``x[:, -1]``), ``"first"`` (BOS), ``"map"``
            (attention pooling over the non-pad tokens) or ``"gap"`` (mean of non-pad tokens).
        output_dim: projection head width; None = no head.
        head_hidden_dim, head_bias: MLP head / head biases (see ``ProjectionHead``).
        pad_id, eos_id: special token ids.
        dropout, attention_dropout, drop_path, remat, qk_norm, qkv_bias, fused_qkv,
            attention_impl, layer_norm_epsilon: as in ``ViTEncoder``.
    """

    def __init__(self, vocab_size=32_000, max_len=64, width=768, depth=12, heads=12,
                 mlp_dim=3072, causal=False, pool="last", output_dim=None, head_hidden_dim=None,
                 head_bias=True, pad_id=0, eos_id=2, dropout=0.0, attention_dropout=0.0,
                 drop_path=0.0, remat=False, qk_norm=False, qkv_bias=True, fused_qkv=True,
                 attention_impl=None, layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.vocab_size, self.max_len = int(vocab_size), int(max_len)
        self.width, self.depth, self.heads = int(width), int(depth), int(heads)
        self.mlp_dim = int(mlp_dim)
        self.causal, self.pool = bool(causal), pool
        self.output_dim = None if output_dim is None else int(output_dim)
        self.head_hidden_dim = None if head_hidden_dim is None else int(head_hidden_dim)
        self.head_bias = bool(head_bias)
        self.pad_id, self.eos_id = int(pad_id), int(eos_id)
        self.dropout, self.attention_dropout = float(dropout), float(attention_dropout)
        self.drop_path = float(drop_path)
        self.remat, self.qk_norm = bool(remat), bool(qk_norm)
        self.qkv_bias, self.fused_qkv = bool(qkv_bias), bool(fused_qkv)
        self.layer_norm_epsilon = float(layer_norm_epsilon)

        policy = self.dtype_policy
        self.token_embedding = keras.layers.Embedding(
            self.vocab_size, self.width,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=policy, name="token_embedding")
        self.position_embedding = LearnedPositionEmbedding(self.max_len, dtype=policy,
                                                           name="position_embedding")
        self.embedding_dropout = keras.layers.Dropout(self.dropout, dtype=policy,
                                                      name="embedding_dropout")
        self.encoder = TransformerEncoder(
            self.depth, self.heads, self.mlp_dim, dropout=self.dropout,
            attention_dropout=self.attention_dropout, drop_path=self.drop_path,
            qk_norm=self.qk_norm, use_qkv_bias=self.qkv_bias, fused_qkv=self.fused_qkv,
            attention_impl=attention_impl, layer_norm_epsilon=self.layer_norm_epsilon,
            remat=self.remat, dtype=policy, name="encoder")
        self.attention_impl = self.encoder.attention_impl
        self.map_head = (MAPHead(self.heads, self.mlp_dim, fused_qkv=self.fused_qkv,
                                 use_qkv_bias=self.qkv_bias, attention_impl=attention_impl,
                                 layer_norm_epsilon=self.layer_norm_epsilon, dtype=policy,
                                 name="map_head")
                         if pool == "map" else None)
        self.head = (ProjectionHead(self.output_dim, hidden_dim=self.head_hidden_dim,
                                    use_bias=self.head_bias, dtype=policy, name="head")
                     if self.output_dim else None)

    def build(self, input_shape):
        batch = input_shape[0]
        length = input_shape[1] or self.max_len
        tokens_shape = (batch, length, self.width)
        self.token_embedding.build((batch, length))
        self.position_embedding.build(tokens_shape)
        self.encoder.build(tokens_shape)
        if self.map_head is not None:
            self.map_head.build(tokens_shape)
        if self.head is not None:
            self.head.build((batch, self.width))

    def call(self, token_ids, training=None, return_tokens=False):
        token_ids = ops.cast(token_ids, "int32")                           # [b, L]
        not_pad = ops.not_equal(token_ids, self.pad_id)                    # [b, L]
        x = self.token_embedding(token_ids)                                # [b, L, width]
        x = self.position_embedding(x)
        x = self.embedding_dropout(x, training=training)
        tokens = self.encoder(x, attention_mask=not_pad, use_causal_mask=self.causal,
                              training=training)
        if self.pool == "eos":
            pooled = pooling.gather_tokens(
                tokens, pooling.eos_positions(token_ids, self.eos_id, self.pad_id))
        elif self.pool == "last":
            pooled = pooling.gather_tokens(
                tokens, pooling.last_non_pad_positions(token_ids, self.pad_id))
        elif self.pool == "first":
            pooled = pooling.first_token(tokens)
        elif self.pool == "gap":
            pooled = pooling.global_average(tokens, not_pad)
        else:
            pooled = self.map_head(tokens, padding_mask=not_pad)
        embedding = self.head(pooled) if self.head is not None else pooled
        embedding = ops.cast(embedding, "float32")                        # [b, D]
        return (embedding, tokens) if return_tokens else embedding

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size, max_len=self.max_len, width=self.width,
            depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim, causal=self.causal,
            pool=self.pool, output_dim=self.output_dim, head_hidden_dim=self.head_hidden_dim,
            head_bias=self.head_bias, pad_id=self.pad_id, eos_id=self.eos_id,
            dropout=self.dropout, attention_dropout=self.attention_dropout,
            drop_path=self.drop_path, remat=self.remat, qk_norm=self.qk_norm,
            qkv_bias=self.qkv_bias, fused_qkv=self.fused_qkv,
            attention_impl=self.attention_impl, layer_norm_epsilon=self.layer_norm_epsilon)
        return config
