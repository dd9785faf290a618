"""One transformer for images and text (LIMoE, Mustafa et al. 2022, Sec. 3): each modality has its
own stem (patch embedding + learned 2-D positions for images, token embedding + learned positions
for text), the transformer blocks are shared, some of them sparse mixture-of-experts blocks, and
each modality has its own pooling and projection head.

Images and texts of a batch run as ONE token sequence ``[batch, patches + text_len, width]``: the
attention mask is block diagonal (an image token attends only to its image's patches, a text token
only to its text's non-pad tokens), so the result equals two separate passes through the shared
blocks, except in the MoE layers, whose routing groups (``group_size`` tokens) mix image and text
tokens that compete for the same expert capacity, as in LIMoE. Text padding takes no expert slot.

    encoder = OneTowerEncoder(**presets.limoe_config("tiny"))
    out = encoder(images, token_ids, training=True)
    out["image_emb"], out["text_emb"]      # [B, D] float32 (not normalised)
    out["routing"]                         # one routing dict per MoE block (keras_mm.moe.MoeMlp)
    out["image_mask"], out["text_mask"]    # [B, T] the modality's real tokens in the sequence
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.encoders.projection_head import ProjectionHead
from keras_mm.layers import pooling
from keras_mm.layers.learned_position_embedding import LearnedPositionEmbedding
from keras_mm.layers.map_head import MAPHead
from keras_mm.layers.patch_embedding import PatchEmbedding
from keras_mm.layers.transformer_block import TransformerBlock
from keras_mm.moe.moe_block import MoeTransformerBlock, moe_layer_indices

IMAGE_POOLS = ("map", "gap")
TEXT_POOLS = ("last", "eos", "gap")


@keras.saving.register_keras_serializable(package="keras_mm")
class OneTowerEncoder(keras.Model):
    """``(images [B, H, W, 3], token_ids [B, L])`` -> per-modality embeddings and routing.

    Either input may be None (that modality is skipped): ``encoder(images=x)`` embeds images only.

    Args:
        image_size, patch_size: image stem (patches in row-major order, learned positions).
        vocab_size, max_len, pad_id, eos_id: text stem.
        width, depth, heads, mlp_dim: the shared transformer (``mlp_dim``: hidden width of the
            dense MLPs and of every expert, so per-token compute equals the dense model's).
        num_experts: experts of each MoE block (0: a dense model, no MoE block).
        moe_every, moe_last: MoE placement (``keras_mm.moe.moe_block.moe_layer_indices``):
            every ``moe_every``-th block counting from the last, or the last ``moe_last`` blocks.
        num_selected, capacity_factor, eval_capacity_factor, group_size, bpr, noise_std: the MoE
            routing (``keras_mm.moe.moe_mlp.MoeMlp``; LIMoE: k = 1, BPR on).
        image_pool: ``"map"`` (attention pooling) or ``"gap"``; text_pool: ``"last"`` (last
            non-pad token), ``"eos"`` or ``"gap"``.
        output_dim: width of the two linear projection heads (the shared embedding space).
        dropout, attention_dropout, remat, layer_norm_epsilon: as ``ViTEncoder``.
    """

    def __init__(self, image_size=224, patch_size=16, vocab_size=32_000, max_len=64, width=768,
                 depth=12, heads=12, mlp_dim=3072, num_experts=8, moe_every=2, moe_last=None,
                 num_selected=1, capacity_factor=1.0, eval_capacity_factor=None, group_size=256,
                 bpr=True, noise_std=0.0, image_pool="map", text_pool="last", output_dim=None,
                 pad_id=0, eos_id=2, dropout=0.0, attention_dropout=0.0, remat=False,
                 layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        if image_pool not in IMAGE_POOLS:
            raise ValueError(f"image_pool must be one of {IMAGE_POOLS}, got {image_pool!r}")
        if text_pool not in TEXT_POOLS:
            raise ValueError(f"text_pool must be one of {TEXT_POOLS}, got {text_pool!r}")
        self.image_size = ((int(image_size),) * 2 if isinstance(image_size, int)
                           else tuple(int(s) for s in image_size))
        self.patch_size = int(patch_size)
        self.vocab_size, self.max_len = int(vocab_size), int(max_len)
        self.width, self.depth, self.heads = int(width), int(depth), int(heads)
        self.mlp_dim = int(mlp_dim)
        self.num_experts = int(num_experts)
        self.moe_every = None if moe_every is None else int(moe_every)
        self.moe_last = None if moe_last is None else int(moe_last)
        self.num_selected = int(num_selected)
        self.capacity_factor = float(capacity_factor)
        self.eval_capacity_factor = (None if eval_capacity_factor is None
                                     else float(eval_capacity_factor))
        self.group_size, self.bpr = int(group_size), bool(bpr)
        self.noise_std = float(noise_std)
        self.image_pool, self.text_pool = image_pool, text_pool
        self.output_dim = int(output_dim) if output_dim else self.width
        self.pad_id, self.eos_id = int(pad_id), int(eos_id)
        self.dropout, self.attention_dropout = float(dropout), float(attention_dropout)
        self.remat = bool(remat)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.grid_size = (self.image_size[0] // self.patch_size,
                          self.image_size[1] // self.patch_size)
        self.moe_indices = (tuple(moe_layer_indices(self.depth, every=self.moe_every,
                                                    last=self.moe_last))
                            if self.num_experts else ())

        policy = self.dtype_policy
        self.patch_embedding = PatchEmbedding(self.patch_size, self.width, dtype=policy,
                                              name="patch_embedding")
        self.image_position = LearnedPositionEmbedding(self.grid_size, dtype=policy,
                                                       name="image_position_embedding")
        self.token_embedding = keras.layers.Embedding(
            self.vocab_size, self.width,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=policy, name="token_embedding")
        self.text_position = LearnedPositionEmbedding(self.max_len, dtype=policy,
                                                      name="text_position_embedding")
        common = dict(dropout=self.dropout, attention_dropout=self.attention_dropout,
                      layer_norm_epsilon=self.layer_norm_epsilon, remat=self.remat,
                      dtype=policy)
        self.blocks = []
        for i in range(self.depth):
            if i in self.moe_indices:
                block = MoeTransformerBlock(
                    self.heads, self.mlp_dim, self.num_experts, num_selected=self.num_selected,
                    capacity_factor=self.capacity_factor,
                    eval_capacity_factor=self.eval_capacity_factor, group_size=self.group_size,
                    bpr=self.bpr, noise_std=self.noise_std, name=f"moe_block_{i}", **common)
            else:
                block = TransformerBlock(self.heads, self.mlp_dim, name=f"block_{i}", **common)
            self.blocks.append(block)
        self.norm = keras.layers.LayerNormalization(epsilon=self.layer_norm_epsilon,
                                                    dtype=policy, name="norm")
        self.image_map = (MAPHead(self.heads, self.mlp_dim,
                                  layer_norm_epsilon=self.layer_norm_epsilon, dtype=policy,
                                  name="image_map_head")
                          if image_pool == "map" else None)
        self.image_head = ProjectionHead(self.output_dim, dtype=policy, name="image_head")
        self.text_head = ProjectionHead(self.output_dim, dtype=policy, name="text_head")

    def build(self, input_shape=None):
        gh, gw = self.grid_size
        n, length = gh * gw, self.max_len
        self.patch_embedding.build((None, *self.image_size, 3))
        self.image_position.build((None, n, self.width))
        self.token_embedding.build((None, length))
        self.text_position.build((None, length, self.width))
        for block in self.blocks:
            block.build((None, n + length, self.width))
        self.norm.build((None, n + length, self.width))
        if self.image_map is not None:
            self.image_map.build((None, n, self.width))
        self.image_head.build((None, self.width))
        self.text_head.build((None, self.width))
        self.built = True

    # ------------------------------------------------------------------ stems
    def _image_tokens(self, images):
        x = self.patch_embedding(images)                                    # [B, N, w]
        return self.image_position(x, grid_size=self.patch_embedding.grid_size(images.shape))

    def _text_tokens(self, token_ids):
        x = self.token_embedding(token_ids)                                 # [B, L, w]
        return self.text_position(x)

    # ------------------------------------------------------------------ forward
    def call(self, images=None, token_ids=None, training=None):
        if images is None and token_ids is None:
            raise ValueError("give images, token_ids or both")
        parts, keep, modality = [], [], []
        n = length = 0
        if images is not None:
            image_tokens = self._image_tokens(images)
            n = image_tokens.shape[1]
            parts.append(image_tokens)
            keep.append(ops.ones(ops.shape(image_tokens)[:2], "bool"))
            modality.append(ops.zeros((n,), "int32"))
        if token_ids is not None:
            token_ids = ops.cast(token_ids, "int32")
            text_tokens = self._text_tokens(token_ids)
            length = text_tokens.shape[1]
            parts.append(ops.cast(text_tokens, parts[0].dtype) if parts else text_tokens)
            keep.append(ops.not_equal(token_ids, self.pad_id))
            modality.append(ops.ones((length,), "int32"))
        x = ops.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]  # [B, T, w]
        keep = ops.concatenate(keep, axis=1) if len(keep) > 1 else keep[0]  # [B, T] bool
        modality = ops.concatenate(modality) if len(modality) > 1 else modality[0]  # [T]
        # Block-diagonal attention: same modality (same example), key not padding.
        same = ops.equal(modality[:, None], modality[None, :])              # [T, T]
        mask = ops.logical_and(same[None, None], keep[:, None, None, :])    # [B, 1, T, T]

        routing = []
        for block in self.blocks:
            if isinstance(block, MoeTransformerBlock):
                x, info = block(x, attention_mask=mask, training=training,
                                token_mask=keep, return_routing=True)
                routing.append(info)
            else:
                x = block(x, attention_mask=mask, training=training)
        x = self.norm(x)

        out = {"routing": routing}
        real = ops.cast(keep, "float32")
        is_text = ops.cast(modality, "float32")[None, :]
        out["image_mask"] = real * (1.0 - is_text)                         # [B, T]
        out["text_mask"] = real * is_text
        if images is not None:
            tokens = x[:, :n]
            pooled = (self.image_map(tokens) if self.image_map is not None
                      else pooling.global_average(tokens))
            out["image_emb"] = ops.cast(self.image_head(pooled), "float32")  # [B, D]
        if token_ids is not None:
            tokens = x[:, n:]
            if self.text_pool == "last":
                pooled = pooling.gather_tokens(
                    tokens, pooling.last_non_pad_positions(token_ids, self.pad_id))
            elif self.text_pool == "eos":
                pooled = pooling.gather_tokens(
                    tokens, pooling.eos_positions(token_ids, self.eos_id, self.pad_id))
            else:
                pooled = pooling.global_average(tokens, ops.not_equal(token_ids, self.pad_id))
            out["text_emb"] = ops.cast(self.text_head(pooled), "float32")    # [B, D]
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=list(self.image_size), patch_size=self.patch_size,
            vocab_size=self.vocab_size, max_len=self.max_len, width=self.width,
            depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim,
            num_experts=self.num_experts, moe_every=self.moe_every, moe_last=self.moe_last,
            num_selected=self.num_selected, capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor, group_size=self.group_size,
            bpr=self.bpr, noise_std=self.noise_std, image_pool=self.image_pool,
            text_pool=self.text_pool, output_dim=self.output_dim, pad_id=self.pad_id,
            eos_id=self.eos_id, dropout=self.dropout, attention_dropout=self.attention_dropout,
            remat=self.remat, layer_norm_epsilon=self.layer_norm_epsilon)
        return config
