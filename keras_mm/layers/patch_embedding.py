"""Patch embedding (ViT, Dosovitskiy et al. 2021): non-overlapping ``patch x patch`` patches,
each linearly projected, i.e. a convolution with kernel = stride = patch size."""

from __future__ import annotations

import keras
from keras import ops

PATCH_IMPLS = ("conv", "matmul")


@keras.saving.register_keras_serializable(package="keras_mm")
class PatchEmbedding(keras.layers.Layer):
    """``[batch, H, W, C]`` -> ``[batch, (H // p) * (W // p), width]``, patches in row-major order.

    The kernel has the convolution layout ``[p, p, C, width]`` (as in big_vision / timm
    checkpoints) whatever the implementation; pixels beyond a multiple of ``p`` are dropped.

    Args:
        patch_size: ``p``, an int or ``(p_h, p_w)``.
        width: embedding width.
        implementation: ``"conv"`` (``keras.ops.conv`` with stride ``p``) or ``"matmul"``
            (reshape into patches, one matmul); same numbers, the faster one is the default.
        kernel_initializer, bias_initializer.
    """

    def __init__(self, patch_size, width, implementation="conv",
                 kernel_initializer="lecun_normal", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        if implementation not in PATCH_IMPLS:
            raise ValueError(f"implementation must be one of {PATCH_IMPLS}, got {implementation!r}")
        self.patch_size = _pair(patch_size)
        self.width = int(width)
        self.implementation = implementation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        ph, pw = self.patch_size
        self.kernel = self.add_weight(name="kernel", shape=(ph, pw, channels, self.width),
                                      initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(self.width,),
                                    initializer=self.bias_initializer)

    def grid_size(self, image_shape):
        """``(H // p_h, W // p_w)`` for an image shape ``[batch, H, W, C]`` (static ints)."""
        return image_shape[1] // self.patch_size[0], image_shape[2] // self.patch_size[1]

    def call(self, images):
        return self._embed(images, self.kernel, self.patch_size)

    def _embed(self, images, kernel, patch_size):
        """Patches of ``patch_size`` projected with ``kernel [p_h, p_w, C, width]`` (+ bias);
        shared with ``FlexiPatchEmbedding``, which passes a resized kernel."""
        ph, pw = patch_size
        gh, gw = images.shape[1] // ph, images.shape[2] // pw
        if self.implementation == "conv":
            x = ops.conv(images, kernel, strides=(ph, pw), padding="valid",
                         data_format="channels_last")                       # [b, gh, gw, d]
        else:
            c = images.shape[-1]
            x = images[:, : gh * ph, : gw * pw]
            x = ops.reshape(x, (-1, gh, ph, gw, pw, c))
            x = ops.transpose(x, (0, 1, 3, 2, 4, 5))                        # [b, gh, gw, ph, pw, c]
            x = ops.reshape(x, (-1, gh * gw, ph * pw * c))
            return ops.matmul(x, ops.reshape(kernel, (ph * pw * c, self.width))) + self.bias
        return ops.reshape(x, (-1, gh * gw, self.width)) + self.bias

    def compute_output_shape(self, input_shape):
        gh, gw = self.grid_size(tuple(input_shape))
        return (input_shape[0], gh * gw, self.width)

    def get_config(self):
        config = super().get_config()
        config.update(
            patch_size=list(self.patch_size), width=self.width, implementation=self.implementation,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer))
        return config


def _pair(value):
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair, got {value}")
    return value
