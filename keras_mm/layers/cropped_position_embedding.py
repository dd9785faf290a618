"""Cropped positional embeddings (RO-ViT, Kim et al. 2023; used by MaMMUT, Kuo et al. 2023):
during pretraining the learned position-embedding grid is upsampled (from the pretraining image
size towards a detection image size, e.g. 224 -> 1024, x4.6), a random region is cropped from it
and resized back to the pretraining grid, so the model sees every image as a region of a larger,
unknown image.

    up = bilinear_resize(table [h, w, d], (h * upsample, w * upsample))
    box = random crop: area fraction ~ U(scale), aspect ratio ~ logU(ratio)
    out[i, j] = bilinear sample of up at the centre of cell (i, j) of the box grid   [h, w, d]

Static shapes throughout (the crop is a sampling grid, not a slice), so it compiles under XLA.
"""

from __future__ import annotations

import math

import keras
from keras import ops


def _bilinear_sample(table, ys, xs):
    """``table [H, W, d]`` at fractional pixel coords ``ys [h]``, ``xs [w]`` (pixel centres at
    integers) -> ``[h, w, d]``, edge-clamped."""
    height, width = table.shape[0], table.shape[1]
    ys = ops.clip(ys, 0.0, height - 1.0)
    xs = ops.clip(xs, 0.0, width - 1.0)
    y0 = ops.floor(ys)
    x0 = ops.floor(xs)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    y0 = ops.cast(y0, "int32")
    x0 = ops.cast(x0, "int32")
    y1 = ops.minimum(y0 + 1, height - 1)
    x1 = ops.minimum(x0 + 1, width - 1)

    def at(yi, xi):
        return ops.take(ops.take(table, yi, axis=0), xi, axis=1)          # [h, w, d]

    top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx
    return top * (1.0 - wy) + bottom * wy


def crop_box(seed, scale=(0.1, 1.0), ratio=(0.5, 2.0)):
    """A random box ``(y0, x0, height, width)`` in unit coordinates (float32 scalars): area
    fraction ~ U(scale), aspect ratio width / height ~ logU(ratio), clipped to the unit square."""
    draws = keras.random.uniform((4,), seed=seed)
    area = scale[0] + (scale[1] - scale[0]) * draws[0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * draws[1]
    aspect = ops.exp(log_ratio)
    height = ops.minimum(ops.sqrt(area / aspect), 1.0)
    width = ops.minimum(ops.sqrt(area * aspect), 1.0)
    return draws[2] * (1.0 - height), draws[3] * (1.0 - width), height, width


def cropped_position_table(table, upsample, box):
    """``table [h, w, d]`` -> ``[h, w, d]``: upsampled by ``upsample``, the unit-coordinate ``box``
    ``(y0, x0, height, width)`` cut out and resized back to ``h x w`` (bilinear)."""
    h, w = int(table.shape[0]), int(table.shape[1])
    big_h, big_w = max(h, round(h * upsample)), max(w, round(w * upsample))
    up = ops.image.resize(table[None], (big_h, big_w), interpolation="bilinear",
                          antialias=False, data_format="channels_last")[0]
    y0, x0, height, width = (ops.cast(v, "float32") for v in box)
    centres_y = (ops.arange(h, dtype="float32") + 0.5) / h                # [h] in (0, 1)
    centres_x = (ops.arange(w, dtype="float32") + 0.5) / w
    ys = (y0 + centres_y * height) * big_h - 0.5                          # pixel coordinates
    xs = (x0 + centres_x * width) * big_w - 0.5
    return _bilinear_sample(ops.cast(up, "float32"), ys, xs)
