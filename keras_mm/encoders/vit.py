"""Vision Transformer image encoder (Dosovitskiy et al. 2021), in the big_vision form: patch
embedding + position embedding (+ a [CLS] token, added after the position embedding), pre-LN
transformer with a final LayerNorm, then pooling (``cls`` / ``gap`` / ``map``) and an optional
projection head. Presets: ``keras_mm.encoders.presets.vit_config``."""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.encoders.projection_head import ProjectionHead
from keras_mm.layers import pooling
from keras_mm.layers.learned_position_embedding import LearnedPositionEmbedding
from keras_mm.layers.map_head import MAPHead
from keras_mm.layers.patch_embedding import PatchEmbedding
from keras_mm.layers.sincos_position_embedding import SinCos2DPositionEmbedding
from keras_mm.layers.transformer_encoder import TransformerEncoder

POOLS = ("cls", "gap", "map")
POS_EMBEDDINGS = ("learned", "sincos2d")


@keras.saving.register_keras_serializable(package="keras_mm")
class ViTEncoder(keras.Model):
    """Images ``[batch, H, W, 3]`` (float, already normalised) -> embeddings ``[batch, D]``.

    ``D`` is ``output_dim`` when a projection head is configured, else ``width``. The embedding is
    returned in float32 under mixed precision. ``call(images, return_tokens=True)`` also returns
    the token sequence ``[batch, tokens, width]`` after the final LayerNorm (with the [CLS] token
    first when ``pool="cls"``), in the compute dtype, for captioners and LiT.

    Args:
        image_size: int or ``(H, W)``; defines the position-embedding grid. Other sizes work too:
            learned embeddings are resized bilinearly, sin-cos ones recomputed.
        patch_size: patch side ``p`` (int or pair).
        width, depth, heads, mlp_dim: transformer sizes.
        pool: ``"cls"`` (a learned [CLS] token), ``"gap"`` (mean of the tokens) or ``"map"``
            (multihead attention pooling, SigLIP).
        pos_embedding: ``"learned"`` or ``"sincos2d"`` (fixed).
        output_dim: projection head width; None = no head.
        head_hidden_dim: None = linear head, else an MLP head with this hidden width.
        head_bias: biases in the head.
        dropout, attention_dropout, drop_path: regularisation (drop_path: last block's rate).
        remat: rematerialise every transformer block (gradient checkpointing).
        qk_norm, qkv_bias, fused_qkv, attention_impl: attention options (see
            ``keras_mm.layers.attention``).
        patch_impl: ``"conv"`` or ``"matmul"`` (see ``PatchEmbedding``).
        layer_norm_epsilon: of all LayerNorms.
    """

    def __init__(self, image_size=224, patch_size=16, width=768, depth=12, heads=12,
                 mlp_dim=3072, pool="cls", pos_embedding="learned", output_dim=None,
                 head_hidden_dim=None, head_bias=True, dropout=0.0, attention_dropout=0.0,
                 drop_path=0.0, remat=False, qk_norm=False, qkv_bias=True, fused_qkv=True,
                 attention_impl=None, patch_impl="conv", layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(f"pos_embedding must be one of {POS_EMBEDDINGS}, "
                             f"got {pos_embedding!r}")
        self.image_size = ((int(image_size),) * 2 if isinstance(image_size, int)
                           else tuple(int(s) for s in image_size))
        self.patch_size = ((int(patch_size),) * 2 if isinstance(patch_size, int)
                           else tuple(int(s) for s in patch_size))
        self.width, self.depth, self.heads = int(width), int(depth), int(heads)
        self.mlp_dim = int(mlp_dim)
        self.pool, self.pos_embedding = pool, pos_embedding
        self.output_dim = None if output_dim is None else int(output_dim)
        self.head_hidden_dim = None if head_hidden_dim is None else int(head_hidden_dim)
        self.head_bias = bool(head_bias)
        self.dropout, self.attention_dropout = float(dropout), float(attention_dropout)
        self.drop_path = float(drop_path)
        self.remat, self.qk_norm = bool(remat), bool(qk_norm)
        self.qkv_bias, self.fused_qkv = bool(qkv_bias), bool(fused_qkv)
        self.patch_impl = patch_impl
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.grid_size = (self.image_size[0] // self.patch_size[0],
                          self.image_size[1] // self.patch_size[1])

        policy = self.dtype_policy
        self.patch_embedding = PatchEmbedding(self.patch_size, self.width,
                                              implementation=patch_impl, dtype=policy,
                                              name="patch_embedding")
        if pos_embedding == "learned":
            self.position_embedding = LearnedPositionEmbedding(self.grid_size, dtype=policy,
                                                               name="position_embedding")
        else:
            self.position_embedding = SinCos2DPositionEmbedding(self.grid_size, dtype=policy,
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
        input_shape = tuple(input_shape)
        self.patch_embedding.build(input_shape)
        height = input_shape[1] or self.image_size[0]
        width = input_shape[2] or self.image_size[1]
        gh, gw = self.patch_embedding.grid_size((None, height, width))
        tokens_shape = (input_shape[0], gh * gw, self.width)
        self.position_embedding.build(tokens_shape)
        if self.pool == "cls":
            self.cls_token = self.add_weight(name="cls_token", shape=(1, 1, self.width),
                                             initializer="zeros")
            tokens_shape = (input_shape[0], gh * gw + 1, self.width)
        self.encoder.build(tokens_shape)
        if self.map_head is not None:
            self.map_head.build(tokens_shape)
        if self.head is not None:
            self.head.build((input_shape[0], self.width))

    def call(self, images, training=None, return_tokens=False):
        x = self.patch_embedding(images)                                   # [b, n, width]
        x = self.position_embedding(x, grid_size=self.patch_embedding.grid_size(images.shape))
        if self.pool == "cls":
            cls = ops.broadcast_to(ops.cast(self.cls_token, x.dtype),
                                   (ops.shape(x)[0], 1, self.width))
            x = ops.concatenate([cls, x], axis=1)                          # [b, 1 + n, width]
        x = self.embedding_dropout(x, training=training)
        tokens = self.encoder(x, training=training)
        if self.pool == "cls":
            pooled = pooling.first_token(tokens)
        elif self.pool == "gap":
            pooled = pooling.global_average(tokens)
        else:
            pooled = self.map_head(tokens)
        embedding = self.head(pooled) if self.head is not None else pooled
        embedding = ops.cast(embedding, "float32")                        # [b, D]
        return (embedding, tokens) if return_tokens else embedding

    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=list(self.image_size), patch_size=list(self.patch_size),
            width=self.width, depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim,
            pool=self.pool, pos_embedding=self.pos_embedding, output_dim=self.output_dim,
            head_hidden_dim=self.head_hidden_dim, head_bias=self.head_bias,
            dropout=self.dropout, attention_dropout=self.attention_dropout,
            drop_path=self.drop_path, remat=self.remat, qk_norm=self.qk_norm,
            qkv_bias=self.qkv_bias, fused_qkv=self.fused_qkv,
            attention_impl=self.attention_impl, patch_impl=self.patch_impl,
            layer_norm_epsilon=self.layer_norm_epsilon)
        return config
