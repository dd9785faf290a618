"""Fixed 2-D sine-cosine position embeddings (MoCo v3, Chen et al. 2021; big_vision
``posemb_sincos_2d``, used by SigLIP-style and "simple ViT" image towers)::

    omega_i = 1 / temperature ** (i / (width / 4 - 1)),   i = 0 .. width/4 - 1
    pe[(y, x)] = [sin(x * omega), cos(x * omega), sin(y * omega), cos(y * omega)]

(big_vision's normalisation of the frequency index by ``width/4 - 1``; MoCo v3 divides by
``width/4``.) Nothing is trained; any grid is computed exactly, so "resizing" to a new grid is
recomputing it, and cropping a larger grid gives the same numbers as the smaller grid.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


def sincos2d(height, width_tokens, width, temperature=10_000.0):
    """The table ``[height * width_tokens, width]`` (float32 NumPy, row-major grid)."""
    if width % 4:
        raise ValueError(f"2-D sin-cos position embeddings need width % 4 == 0, got {width}")
    quarter = width // 4
    omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / max(quarter - 1, 1))
    ys, xs = np.meshgrid(np.arange(height), np.arange(width_tokens), indexing="ij")
    y = ys.reshape(-1, 1) * omega[None]
    x = xs.reshape(-1, 1) * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


@keras.saving.register_keras_serializable(package="keras_mm")
class SinCos2DPositionEmbedding(keras.layers.Layer):
    """Adds the fixed sin-cos table to ``x [batch, h * w, width]`` (row-major patch grid).

    Args:
        grid_size: ``(h, w)`` of the default grid; ``call(x, grid_size=(h', w'))`` for another.
        temperature: the frequency base (10 000).
    """

    def __init__(self, grid_size, temperature=10_000.0, **kwargs):
        super().__init__(**kwargs)
        grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        self.grid_size = tuple(int(g) for g in grid_size)
        self.temperature = float(temperature)

    def table(self, grid_size=None, width=None):
        h, w = self.grid_size if grid_size is None else tuple(grid_size)
        return sincos2d(h, w, width, self.temperature)

    def call(self, x, grid_size=None):
        table = self.table(grid_size, x.shape[-1])
        return x + ops.cast(table, x.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(grid_size=list(self.grid_size), temperature=self.temperature)
        return config
