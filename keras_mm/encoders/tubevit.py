"""TubeViT video encoder (Piergiovanni et al. 2023, "Rethinking Video ViTs: Sparse Video Tubes
for Joint Image and Video Learning"): sparse video tubes (``SparseTubeEmbedding``) with fixed 3-D
sin-cos position embeddings at the tube centres, then the ViT's pre-LN transformer with a final
LayerNorm, then pooling (``gap`` / ``map``) and an optional projection head. Presets:
``keras_mm.encoders.presets.tubevit_config``.

MaMMUT video variant (Kuo et al. 2023, Sec. "MaMMUT for Video Tasks"):
``image_position_embedding=True`` keeps the image model's *learned* position embeddings on the
2-D image-patch tube (a ``LearnedPositionEmbedding`` over its ``h x w`` patch grid, the same
table for every sampled frame) and adds the fixed tube embeddings through a learned gate::

    x = tokens + learned_pos + tanh(gate) * fixed_pos    (gate: a scalar, initialised to 0 or
                                                          position_gate_init)

``learned_pos`` is zero on the tokens of the other tubes; ``fixed_pos`` is ``sincos3d`` at every
token's centre. With the gate at 0 the image tokens are exactly those of the image ViT (patch
embedding + learned table), so an image checkpoint loads unchanged, and the gate learns how much
of the fixed spatio-temporal embeddings to mix in (TubeViT's Eq. 8 uses the same
``tanh(alpha)``, alpha initialised at 0, for its gated connection).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.encoders.vit import build_trunk
from keras_mm.layers import pooling
from keras_mm.layers.learned_position_embedding import LearnedPositionEmbedding
from keras_mm.layers.tube_embedding import SparseTubeEmbedding, normalize_tubes

POOLS = ("gap", "map")


@keras.saving.register_keras_serializable(package="keras_mm")
class TubeViTEncoder(keras.Model):
    """Videos ``[batch, T, H, W, 3]`` (float, normalised) -> embeddings ``[batch, D]``.

    Images ``[batch, H, W, 3]`` are one-frame videos: only the tubes with a temporal kernel of 1
    (the 2-D patches) fit, which gives TubeViT's joint image / video model.
    ``D`` is ``output_dim`` with a projection head, else ``width``; the embedding is float32
    under mixed precision. ``call(video, return_tokens=True)`` also returns the tokens
    ``[batch, N_tokens, width]`` after the final LayerNorm (compute dtype);
    ``call(video, pre_head=True)`` gives the pooled features ``[batch, width]`` before the
    projection head (linear-probe features).

    Args:
        video_size: ``(T, H, W)`` used to build the model and to size the learned image-tube
            position grid; other sizes work too (the token count follows the video shape).
        tubes: tube specs of ``SparseTubeEmbedding`` (default: the paper's ``PAPER_TUBES``).
        width, depth, heads, mlp_dim: transformer sizes.
        pool: ``"gap"`` (mean of the tokens) or ``"map"`` (multihead attention pooling; the
            paper's figure pools by attention).
        output_dim, head_hidden_dim, head_bias: projection head as ``ViTEncoder``.
        dropout, attention_dropout, drop_path, remat, qk_norm, qkv_bias, fused_qkv,
            attention_impl, layer_norm_epsilon, block: as ``ViTEncoder``.
        temperature: of the fixed sin-cos embeddings.
        image_position_embedding: the MaMMUT variant above (learned image-tube positions + gated
            fixed embeddings); False = TubeViT (fixed embeddings added to every token).
        image_tube: index of the image-patch tube for ``image_position_embedding``; None = the
            first tube whose temporal kernel is 1.
        tube_impl: ``SparseTubeEmbedding``'s ``impl``: ``"einsum"`` (default) or ``"conv"``.
        position_gate_init: the gate's initial value ``alpha`` (``image_position_embedding``
            only). 0 (the default) starts from exactly the image model's tokens; started from
            a frame-average run, the gate then stayed within 0.015 of 0 in 1500 steps on
            moving digits, so the fixed tube embeddings, the only token positions in time,
            never entered. A positive value lets them in from the start.
    """

    def __init__(self, video_size=(32, 224, 224), tubes=None, width=768, depth=12, heads=12,
                 mlp_dim=3072, pool="gap", output_dim=None, head_hidden_dim=None,
                 head_bias=True, dropout=0.0, attention_dropout=0.0, drop_path=0.0,
                 remat=False, qk_norm=False, qkv_bias=True, fused_qkv=True, attention_impl=None,
                 layer_norm_epsilon=1e-6, block="pre_ln", temperature=10_000.0,
                 image_position_embedding=False, image_tube=None, tube_impl="einsum",
                 position_gate_init=0.0, **kwargs):
        super().__init__(**kwargs)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.video_size = tuple(int(s) for s in video_size)
        if len(self.video_size) != 3:
            raise ValueError(f"video_size must be (T, H, W), got {video_size}")
        self.width, self.depth, self.heads = int(width), int(depth), int(heads)
        self.mlp_dim = int(mlp_dim)
        self.pool = pool
        self.output_dim = None if output_dim is None else int(output_dim)
        self.head_hidden_dim = None if head_hidden_dim is None else int(head_hidden_dim)
        self.head_bias = bool(head_bias)
        self.dropout, self.attention_dropout = float(dropout), float(attention_dropout)
        self.drop_path = float(drop_path)
        self.remat, self.qk_norm = bool(remat), bool(qk_norm)
        self.qkv_bias, self.fused_qkv = bool(qkv_bias), bool(fused_qkv)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.block = block
        self.temperature = float(temperature)
        self.image_position_embedding = bool(image_position_embedding)
        self.position_gate_init = float(position_gate_init)
        if self.position_gate_init and not self.image_position_embedding:
            raise ValueError("position_gate_init needs image_position_embedding=True")

        policy = self.dtype_policy
        self.tube_embedding = SparseTubeEmbedding(
            self.width, tubes=tubes, position_embedding=not self.image_position_embedding,
            temperature=self.temperature, impl=tube_impl, dtype=policy, name="tube_embedding")
        self.tubes = self.tube_embedding.tubes
        self.image_tube = None
        self.position_embedding = None
        if self.image_position_embedding:
            self.image_tube = _image_tube(self.tubes, image_tube)
            _, nh, nw = self.tube_embedding.tube_grids(self.video_size)[self.image_tube]
            if nh * nw == 0:
                raise ValueError(f"the image tube {self.tubes[self.image_tube]} does not fit "
                                 f"in video_size {self.video_size}")
            self.position_embedding = LearnedPositionEmbedding(
                (nh, nw), dtype=policy, name="position_embedding")
        elif image_tube is not None:
            raise ValueError("image_tube needs image_position_embedding=True")
        build_trunk(self, attention_impl, block)

    def _video_shape(self, shape):
        """``[batch, T, H, W, C]`` from a video or image shape, unknown sizes from video_size."""
        shape = tuple(shape)
        if len(shape) == 4:                                   # an image: a one-frame video
            shape = (shape[0], 1) + shape[1:]
        if len(shape) != 5:
            raise ValueError(f"TubeViTEncoder takes videos [batch, T, H, W, C] or images "
                             f"[batch, H, W, C], got {shape}")
        size = tuple(s if s is not None else d for s, d in zip(shape[1:4], self.video_size))
        return (shape[0],) + size + (shape[4],)

    def build(self, input_shape):
        shape = self._video_shape(input_shape)
        self.tube_embedding.build(shape)
        tokens_shape = (shape[0], sum(self.tube_embedding.token_counts(shape)), self.width)
        if self.image_position_embedding:
            nh, nw = self.position_embedding.grid_size
            self.position_embedding.build((shape[0], nh * nw, self.width))
            self.position_gate = self.add_weight(
                name="position_gate", shape=(),
                initializer=keras.initializers.Constant(self.position_gate_init))
        self.encoder.build(tokens_shape)
        if self.map_head is not None:
            self.map_head.build(tokens_shape)
        if self.head is not None:
            self.head.build((shape[0], self.width))

    def gated_positions(self, video_shape):
        """MaMMUT variant: ``learned_pos + tanh(gate) * fixed_pos``, ``[N_tokens, width]``
        float32 (``learned_pos`` only on the image tube's tokens, tiled over its frames)."""
        nt, nh, nw = self.tube_embedding.tube_grids(video_shape)[self.image_tube]
        start, stop = self.tube_embedding.token_slices(video_shape)[self.image_tube]
        total = sum(self.tube_embedding.token_counts(video_shape))
        learned = ops.cast(self.position_embedding.table((nh, nw)), "float32")  # [nh*nw, d]
        learned = ops.tile(learned, (nt, 1))                                     # [stop-start, d]
        learned = ops.pad(learned, ((start, total - stop), (0, 0)))              # [N, d]
        fixed = ops.convert_to_tensor(self.tube_embedding.position_table(video_shape))
        gate = ops.tanh(ops.cast(self.position_gate, "float32"))
        return learned + gate * fixed

    def call(self, video, training=None, return_tokens=False, pre_head=False):
        if len(video.shape) == 4:
            video = ops.expand_dims(video, 1)                  # [b, 1, H, W, C]
        x = self.tube_embedding(video)                        # [b, n, width]
        if self.image_position_embedding:
            x = x + ops.cast(self.gated_positions(tuple(video.shape)), x.dtype)[None]
        x = self.embedding_dropout(x, training=training)
        tokens = self.encoder(x, training=training)
        pooled = (pooling.global_average(tokens) if self.pool == "gap"
                  else self.map_head(tokens))
        # pre_head: the pooled features before the projection head (linear-probe features)
        embedding = self.head(pooled) if self.head is not None and not pre_head else pooled
        embedding = ops.cast(embedding, "float32")            # [b, D]
        return (embedding, tokens) if return_tokens else embedding

    def get_config(self):
        config = super().get_config()
        config.update(
            video_size=list(self.video_size),
            tubes=[[list(k), list(s), list(o)] for k, s, o in self.tubes],
            width=self.width, depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim,
            pool=self.pool, output_dim=self.output_dim, head_hidden_dim=self.head_hidden_dim,
            head_bias=self.head_bias, dropout=self.dropout,
            attention_dropout=self.attention_dropout, drop_path=self.drop_path,
            remat=self.remat, qk_norm=self.qk_norm, qkv_bias=self.qkv_bias,
            fused_qkv=self.fused_qkv, attention_impl=self.attention_impl,
            layer_norm_epsilon=self.layer_norm_epsilon, block=self.block,
            temperature=self.temperature,
            image_position_embedding=self.image_position_embedding,
            image_tube=self.image_tube, tube_impl=self.tube_embedding.impl,
            position_gate_init=self.position_gate_init)
        return config


def _image_tube(tubes, image_tube):
    """The index of the image-patch tube: ``image_tube`` or the first with temporal kernel 1."""
    tubes = normalize_tubes(tubes)
    if image_tube is None:
        candidates = [i for i, (kernel, _, _) in enumerate(tubes) if kernel[0] == 1]
        if not candidates:
            raise ValueError("image_position_embedding needs a 2-D image tube (temporal kernel "
                             f"1) among the tubes, got {tubes}")
        return candidates[0]
    image_tube = int(image_tube)
    if not 0 <= image_tube < len(tubes):
        raise ValueError(f"image_tube {image_tube} is not a tube index (0..{len(tubes) - 1})")
    return image_tube
