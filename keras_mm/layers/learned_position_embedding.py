"""Learned, additive position embeddings for a token sequence (``grid_size=L``) or an image patch
grid (``grid_size=(h, w)``), which can be cropped or resized to another length / grid later
(FlexiViT resizes them bilinearly; MaMMUT crops them)."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

RESIZE_MODES = ("bilinear", "crop")


@keras.saving.register_keras_serializable(package="keras_mm")
class LearnedPositionEmbedding(keras.layers.Layer):
    """Adds ``embeddings [*grid_size, width]`` to ``x [batch, tokens, width]``.

    1-D (``grid_size=L``): inputs with ``tokens <= L`` get the first ``tokens`` embeddings.
    2-D (``grid_size=(h, w)``): inputs hold a row-major ``h' x w'`` patch grid; for another grid
    (``call(x, grid_size=(h', w'))``) the table is resized bilinearly (``resize_mode="bilinear"``)
    or its top-left ``h' x w'`` corner is used (``"crop"``).

    Args:
        grid_size: int (sequence length) or ``(h, w)``.
        resize_mode: ``"bilinear"`` or ``"crop"`` (2-D grids of another size).
        initializer: default normal with stddev ``1 / sqrt(width)`` (big_vision).
    """

    def __init__(self, grid_size, resize_mode="bilinear", initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = ((int(grid_size),) if isinstance(grid_size, int)
                          else tuple(int(g) for g in grid_size))
        if len(self.grid_size) not in (1, 2):
            raise ValueError(f"grid_size must be an int or (h, w), got {grid_size}")
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.resize_mode = resize_mode
        self.initializer = None if initializer is None else keras.initializers.get(initializer)

    def build(self, input_shape):
        width = int(input_shape[-1])
        init = self.initializer or keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(width))
        self.embeddings = self.add_weight(name="embeddings", shape=self.grid_size + (width,),
                                          initializer=init)

    def table(self, grid_size=None):
        """The embeddings for a length / grid as ``[tokens, width]``."""
        width = self.embeddings.shape[-1]
        emb = ops.convert_to_tensor(self.embeddings)
        if len(self.grid_size) == 1:
            length = self.grid_size[0] if grid_size is None else _one(grid_size)
            if not isinstance(length, int):         # unknown until run time (a tf.function)
                return ops.slice(emb, (0, 0), (length, width))
            if length > self.grid_size[0]:
                raise ValueError(f"{length} tokens, but position embeddings for only "
                                 f"{self.grid_size[0]}")
            return emb[:length] if length != self.grid_size[0] else emb
        h, w = self.grid_size if grid_size is None else tuple(grid_size)
        if (h, w) != self.grid_size:
            if self.resize_mode == "crop":
                if h > self.grid_size[0] or w > self.grid_size[1]:
                    raise ValueError(f"cannot crop a {self.grid_size} grid to {(h, w)}")
                emb = emb[:h, :w]
            else:
                emb = ops.image.resize(emb[None], (h, w), interpolation="bilinear",
                                       antialias=False, data_format="channels_last")[0]
        return ops.reshape(emb, (h * w, width))

    def call(self, x, grid_size=None):
        if len(self.grid_size) == 1 and grid_size is None:
            grid_size = ops.shape(x)[1]
        return x + ops.cast(self.table(grid_size), x.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            grid_size=list(self.grid_size), resize_mode=self.resize_mode,
            initializer=(None if self.initializer is None
                         else keras.initializers.serialize(self.initializer)))
        return config


def _one(grid_size):
    if isinstance(grid_size, (tuple, list)):
        (grid_size,) = grid_size
    return int(grid_size) if isinstance(grid_size, (int, np.integer)) else grid_size
