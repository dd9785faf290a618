"""Vision Transformer image encoder (Dosovitskiy et al. 2021), in the big_vision form: patch
embedding + position embedding (+ a [CLS] token, added after the position embedding), pre-LN
transformer with a final LayerNorm, then pooling (``cls`` / ``gap`` / ``map``) and an optional
projection head. Presets: ``keras_mm.encoders.presets.vit_config``.

Options of later papers:

* FlexiViT (Beyer et al. 2023): ``patch_sizes=(8, 12, 16)`` keeps one underlying patch kernel
  (``FlexiPatchEmbedding``, PI-resized per patch size) and resizes the learned position
  embeddings bilinearly to each patch grid; ``call(images, patch_size=p)`` or
  ``set_patch_size(p)`` picks the size. Training draws one size per step, uniformly from
  ``patch_sizes``, with ``FlexiPatchSizeCallback`` (below): the patch size changes tensor shapes,
  so it is chosen on the host between steps, and the model keeps one compiled train function per
  patch size (``tf.function`` on TensorFlow, ``jax.jit`` on JAX), each traced on first use.
* ViT-22B (Dehghani et al. 2023): ``block="parallel"`` (+ ``qk_norm=True, qkv_bias=False``, see
  ``presets.vit22b_style``).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_mm.encoders.projection_head import ProjectionHead
from keras_mm.layers import pooling
from keras_mm.layers.conv_stem import ConvStem
from keras_mm.layers.flexi_patch_embedding import FlexiPatchEmbedding
from keras_mm.layers.learned_position_embedding import LearnedPositionEmbedding
from keras_mm.layers.map_head import MAPHead
from keras_mm.layers.patch_embedding import PatchEmbedding
from keras_mm.layers.cropped_position_embedding import crop_box, cropped_position_table
from keras_mm.layers.sincos_position_embedding import SinCos2DPositionEmbedding
from keras_mm.layers.transformer_encoder import TransformerEncoder

POOLS = ("cls", "gap", "map")
POS_EMBEDDINGS = ("learned", "sincos2d")
STEMS = ("patch", "conv", "cnn")
# the convolutional stems: ConvStem's downsampling of each
CONV_STEM_DOWNSAMPLING = {"conv": "stride", "cnn": "max_pool"}


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
        patch_sizes: None (one fixed patch size, ``patch_size``) or FlexiViT's set of square
            patch sizes (ints) drawn from in training; ``patch_size`` must be one of them and
            is the size used when none is asked for (inference default, position-embedding
            grid ``image_size // patch_size``). Any positive patch size works at inference.
        base_patch_size: FlexiViT's underlying kernel size (int); default ``max(patch_sizes)``,
            so that every training size is reached by PI-resizing down (least squares) or not
            at all. FlexiViT uses 32 for sizes 8..48.
        block: ``"pre_ln"`` or ``"parallel"`` (ViT-22B), see ``TransformerEncoder``.
        position_crop: cropped positional embeddings in training (RO-ViT / MaMMUT,
            ``keras_mm.layers.cropped_position_embedding``): the upsampling factor of the
            learned position grid before a random crop is resized back (0 = off; RO-ViT: 224 ->
            1024, about 4.6).
        stem: ``"patch"`` (the patchify convolution), ``"conv"`` (Xiao et al. 2021's
            convolutional stem, ``keras_mm.layers.conv_stem``; square power-of-two patches) or
            ``"cnn"`` (the hybrid ViT's small CNN: stride-1 3x3 convolutions and 2x2
            max-pooling, ``ConvStem(downsample="max_pool")``; square power-of-two patches).

    ``patch_sizes``, ``base_patch_size``, ``block``, ``position_crop`` and ``stem`` appear in the config
    only when set, so
    the configs of fixed-patch pre-LN encoders are unchanged.

    Call args: ``images``, ``training``, ``return_tokens``, ``patch_size`` (int, static; None =
    the size set by ``set_patch_size``, else ``patch_size``; a fixed-patch encoder accepts only
    its own), ``pre_head`` (return the pooled features ``[b, width]`` before the projection
    head: the features CLIP's linear probes use).
    """

    def __init__(self, image_size=224, patch_size=16, width=768, depth=12, heads=12,
                 mlp_dim=3072, pool="cls", pos_embedding="learned", output_dim=None,
                 head_hidden_dim=None, head_bias=True, dropout=0.0, attention_dropout=0.0,
                 drop_path=0.0, remat=False, qk_norm=False, qkv_bias=True, fused_qkv=True,
                 attention_impl=None, patch_impl="conv", layer_norm_epsilon=1e-6,
                 patch_sizes=None, base_patch_size=None, block="pre_ln", position_crop=0.0,
                 stem="patch", **kwargs):
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
        self.patch_sizes, self.base_patch_size = _flexi_sizes(
            patch_sizes, base_patch_size, self.patch_size)
        self.block = block
        self.position_crop = float(position_crop)
        if self.position_crop and (pos_embedding != "learned" or self.position_crop < 1):
            raise ValueError("position_crop needs learned position embeddings and an upsampling "
                             f"factor >= 1, got {position_crop} with {pos_embedding!r}")
        self.crop_seed = keras.random.SeedGenerator() if self.position_crop else None
        self.active_patch_size = None     # (p_h, p_w) from set_patch_size(); None = patch_size

        if stem not in STEMS or (stem != "patch" and self.patch_sizes is not None):
            raise ValueError(f"stem must be one of {STEMS} (conv, cnn: not with patch_sizes), "
                             f"got {stem!r}")
        self.stem = stem
        policy = self.dtype_policy
        if stem in CONV_STEM_DOWNSAMPLING:
            if self.patch_size[0] != self.patch_size[1]:
                raise ValueError(f"a {stem} stem needs square patches, got {self.patch_size}")
            self.patch_embedding = ConvStem(
                self.patch_size[0], self.width, dtype=policy, name="patch_embedding",
                downsample=CONV_STEM_DOWNSAMPLING[stem])
        elif self.patch_sizes is None:
            self.patch_embedding = PatchEmbedding(self.patch_size, self.width,
                                                  implementation=patch_impl, dtype=policy,
                                                  name="patch_embedding")
        else:
            self.patch_embedding = FlexiPatchEmbedding(self.base_patch_size, self.width,
                                                       implementation=patch_impl, dtype=policy,
                                                       name="patch_embedding")
        if pos_embedding == "learned":
            self.position_embedding = LearnedPositionEmbedding(self.grid_size, dtype=policy,
                                                               name="position_embedding")
        else:
            self.position_embedding = SinCos2DPositionEmbedding(self.grid_size, dtype=policy,
                                                                name="position_embedding")
        build_trunk(self, attention_impl, block)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self.patch_embedding.build(input_shape)
        height = input_shape[1] or self.image_size[0]
        width = input_shape[2] or self.image_size[1]
        gh, gw = height // self.patch_size[0], width // self.patch_size[1]
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

    def set_patch_size(self, patch_size):
        """The patch size of later calls without ``patch_size`` (None: back to ``patch_size``).

        A compiled function (``model.fit`` / ``evaluate`` / ``predict``) that already traced
        this encoder keeps the size it was traced with: use ``set_model_patch_size`` on the
        outer model (it gives the model new compiled functions) or ``FlexiPatchSizeCallback``."""
        self.active_patch_size = (None if patch_size is None
                                  else self.current_patch_size(patch_size))

    def current_patch_size(self, patch_size=None):
        """The ``(p_h, p_w)`` a call with this ``patch_size`` argument uses (None: the size set
        by ``set_patch_size``, else ``patch_size``)."""
        if patch_size is None:
            patch_size = self.active_patch_size
        if patch_size is None:
            return self.patch_size
        if self.patch_sizes is None:
            if _pair(patch_size) != self.patch_size:
                raise ValueError(f"this ViTEncoder has the fixed patch size {self.patch_size}; "
                                 f"got patch_size={patch_size}. Give patch_sizes=(...) "
                                 "(FlexiViT) to run other patch sizes")
            return self.patch_size
        p = _square(patch_size)
        return (p, p)

    def call(self, images, training=None, return_tokens=False, patch_size=None, pre_head=False):
        ph, pw = self.current_patch_size(patch_size)
        if self.patch_sizes is None:
            x = self.patch_embedding(images)                               # [b, n, width]
        else:
            x = self.patch_embedding(images, patch_size=(ph, pw))          # [b, n, width]
        grid = (images.shape[1] // ph, images.shape[2] // pw)
        if training and self.position_crop and grid == self.grid_size:
            table = cropped_position_table(
                ops.convert_to_tensor(self.position_embedding.embeddings), self.position_crop,
                crop_box(self.crop_seed))
            x = x + ops.cast(ops.reshape(table, (1, grid[0] * grid[1], self.width)), x.dtype)
        else:
            x = self.position_embedding(x, grid_size=grid)
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
        # pre_head: the pooled features before the projection head (CLIP's linear-probe features)
        embedding = self.head(pooled) if self.head is not None and not pre_head else pooled
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
        if self.patch_sizes is not None:
            config.update(patch_sizes=list(self.patch_sizes),
                          base_patch_size=self.base_patch_size)
        if self.block != "pre_ln":
            config["block"] = self.block
        if self.position_crop:
            config["position_crop"] = self.position_crop
        if self.stem != "patch":
            config["stem"] = self.stem
        return config


def build_trunk(model, attention_impl, block):
    """The layers after the token embedding that ``ViTEncoder`` and ``TubeViTEncoder`` share,
    set on ``model`` from its own attributes (width, depth, heads, mlp_dim, dropout rates,
    attention options, pool, output_dim, head options): ``embedding_dropout``, the transformer
    ``encoder``, ``attention_impl``, the MAP head (``pool == "map"``) and the projection head
    (``output_dim``)."""
    policy = model.dtype_policy
    model.embedding_dropout = keras.layers.Dropout(model.dropout, dtype=policy,
                                                   name="embedding_dropout")
    model.encoder = TransformerEncoder(
        model.depth, model.heads, model.mlp_dim, dropout=model.dropout,
        attention_dropout=model.attention_dropout, drop_path=model.drop_path,
        qk_norm=model.qk_norm, use_qkv_bias=model.qkv_bias, fused_qkv=model.fused_qkv,
        attention_impl=attention_impl, layer_norm_epsilon=model.layer_norm_epsilon,
        remat=model.remat, block=block, dtype=policy, name="encoder")
    model.attention_impl = model.encoder.attention_impl
    model.map_head = (MAPHead(model.heads, model.mlp_dim, fused_qkv=model.fused_qkv,
                              use_qkv_bias=model.qkv_bias, attention_impl=attention_impl,
                              layer_norm_epsilon=model.layer_norm_epsilon, dtype=policy,
                              name="map_head")
                      if model.pool == "map" else None)
    model.head = (ProjectionHead(model.output_dim, hidden_dim=model.head_hidden_dim,
                                 use_bias=model.head_bias, dtype=policy, name="head")
                  if model.output_dim else None)


def _pair(patch_size):
    if isinstance(patch_size, (tuple, list)):
        return tuple(int(v) for v in patch_size)
    return (int(patch_size), int(patch_size))


def _square(patch_size):
    """An int patch side from an int or a square pair."""
    if isinstance(patch_size, (tuple, list)):
        if len(patch_size) != 2 or int(patch_size[0]) != int(patch_size[1]):
            raise ValueError(f"FlexiViT patch sizes are square ints, got {patch_size}")
        patch_size = patch_size[0]
    if not isinstance(patch_size, (int, np.integer)) or int(patch_size) < 1:
        raise ValueError(f"patch size must be a positive int, got {patch_size!r}")
    return int(patch_size)


def _flexi_sizes(patch_sizes, base_patch_size, patch_size):
    """Validated ``(patch_sizes tuple, base patch size)``, or ``(None, None)``."""
    if patch_sizes is None:
        if base_patch_size is not None:
            raise ValueError("base_patch_size needs patch_sizes (FlexiViT)")
        return None, None
    sizes = tuple(_square(p) for p in patch_sizes)
    if not sizes or len(set(sizes)) != len(sizes):
        raise ValueError(f"patch_sizes must be distinct ints, got {patch_sizes}")
    if patch_size[0] != patch_size[1] or patch_size[0] not in sizes:
        raise ValueError(f"patch_size {patch_size} must be one of patch_sizes {sizes}")
    base = max(sizes) if base_patch_size is None else _square(base_patch_size)
    return sizes, base


def flexible_encoders(model):
    """Every ``ViTEncoder`` with ``patch_sizes`` in ``model`` (itself included; found with
    Keras' ``Layer._flatten_layers``, which walks nested layers and models)."""
    return [layer for layer in model._flatten_layers(include_self=True, recursive=True)
            if isinstance(layer, ViTEncoder) and layer.patch_sizes is not None]


def set_model_patch_size(model, patch_size):
    """Sets ``patch_size`` (None = each encoder's default) on every FlexiViT encoder inside
    ``model`` and gives the model new compiled train / test / predict functions
    (``compiled_function``), which trace with that size on their first call. Use it (not
    ``ViTEncoder.set_patch_size`` alone) before ``fit`` / ``evaluate`` / ``predict`` /
    ``*_on_batch`` at another patch size. Returns the encoders."""
    encoders = flexible_encoders(model)
    if not encoders:
        raise ValueError(f"{model.name} holds no ViTEncoder with patch_sizes")
    for encoder in encoders:
        encoder.set_patch_size(patch_size)
    for kind in ("train", "test", "predict"):
        setattr(model, f"{kind}_function",
                compiled_function(model, kind, patch_size)
                if kind == "predict" or getattr(model, "compiled", False) else None)
    return encoders


def compiled_function(model, kind, tag):
    """A new ``model.{kind}_function`` (kind ``"train"``, ``"test"`` or ``"predict"``) built by
    ``model.make_{kind}_function(force=True)`` around a fresh closure of ``model.{kind}_step``.

    Why a fresh closure: ``jax.jit`` caches traces by function and argument shapes, and the
    bound methods ``model.train_step`` of one model compare equal, so a new ``jax.jit`` of
    ``model.train_step`` would silently reuse a trace made at another patch size (the patch
    size is a Python attribute, not an argument). Each closure is a new function, so it is
    traced anew on its first call. (On TensorFlow every ``make_*_function`` is a new
    ``tf.function`` with its own trace cache either way.) ``tag`` (the patch size) only names it.
    """
    name = f"{kind}_step"
    method = getattr(type(model), name)

    def step(*args, **kwargs):
        return method(model, *args, **kwargs)

    step.__name__ = f"{name}_patch_{tag}"
    object.__setattr__(model, name, step)       # shadows the method while Keras reads it
    try:
        getattr(model, f"make_{kind}_function")(force=True)
    finally:
        object.__delattr__(model, name)
    return getattr(model, f"{kind}_function")


class FlexiPatchSizeCallback(keras.callbacks.Callback):
    """FlexiViT training under ``model.fit``: one random patch size per train step.

    Before every train step (``on_train_batch_begin``) it draws a patch size uniformly from
    ``patch_sizes`` (default: the first flexible encoder's), sets it on every FlexiViT encoder
    of the model (``ViTEncoder.set_patch_size``), and installs the model's compiled train
    function for that size: the first time a size is drawn it builds a new one
    (``compiled_function``: a fresh ``tf.function`` on TensorFlow, a fresh ``jax.jit`` of a fresh
    closure on JAX), which traces the model with that static size on its first call; later draws
    reuse it, so a run compiles ``len(patch_sizes)`` train functions in all. Both backends'
    ``fit`` loops read ``model.train_function`` anew every step, after ``on_train_batch_begin``
    (Keras 3.15, checked in the tests).

    With ``steps_per_execution=k`` a size holds for ``k`` steps (one compiled call). Validation
    inside ``fit`` (``on_test_begin``) runs at ``eval_patch_size`` (default None: each encoder's
    ``patch_size``) with its own compiled test function, and training ends with
    ``set_model_patch_size(model, eval_patch_size)``. ``counts`` holds how often each size was
    drawn.

    Args:
        patch_sizes: the sizes to draw from; default the (first) encoder's ``patch_sizes``.
        seed: of the host-side NumPy generator that draws the sizes.
        eval_patch_size: the size set for validation and after training.
        encoders: the encoders to drive; default every ``ViTEncoder`` with ``patch_sizes``
            inside the model.
    """

    def __init__(self, patch_sizes=None, seed=None, eval_patch_size=None, encoders=None):
        super().__init__()
        self.patch_sizes = None if patch_sizes is None else tuple(_square(p) for p in patch_sizes)
        self.seed = seed
        self.eval_patch_size = eval_patch_size
        self.encoders = None if encoders is None else list(encoders)
        self.counts = {}
        self.last_patch_size = None
        self._functions = {}
        self._rng = np.random.default_rng(seed)

    def _resolve(self):
        encoders = self.encoders or flexible_encoders(self.model)
        if not encoders:
            raise ValueError("FlexiPatchSizeCallback: the model holds no ViTEncoder with "
                             "patch_sizes")
        return encoders, self.patch_sizes or encoders[0].patch_sizes

    def _install(self, kind, patch_size):
        for encoder in self._resolve()[0]:
            encoder.set_patch_size(patch_size)
        key = (kind, patch_size)
        if key not in self._functions:
            self._functions[key] = compiled_function(self.model, kind, patch_size)
        setattr(self.model, f"{kind}_function", self._functions[key])

    def on_train_begin(self, logs=None):
        self._functions = {}          # a new fit may follow a new compile: trace again
        self._resolve()

    def on_train_batch_begin(self, batch, logs=None):
        sizes = self._resolve()[1]
        p = int(sizes[int(self._rng.integers(len(sizes)))])
        self.counts[p] = self.counts.get(p, 0) + 1
        self.last_patch_size = p
        self._install("train", p)

    def on_test_begin(self, logs=None):
        self._install("test", self.eval_patch_size)

    def on_train_end(self, logs=None):
        self._functions = {}
        if self.encoders is None:
            set_model_patch_size(self.model, self.eval_patch_size)
        else:
            for encoder in self.encoders:
                encoder.set_patch_size(self.eval_patch_size)
            self.model.train_function = self.model.test_function = None
            self.model.predict_function = None
