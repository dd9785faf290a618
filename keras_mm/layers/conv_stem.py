"""Convolutional stem for ViTs (Xiao et al. 2021, "Early Convolutions Help Transformers See
Better"): the patchify layer (one ``p x p`` convolution of stride ``p``) replaced by a stack of
3x3 stride-2 convolutions, each followed by a LayerNorm over channels and a ReLU, then a 1x1
convolution to the transformer width::

    x -> [conv3x3 /2 -> LN -> ReLU] x log2(p) -> conv1x1 -> [batch, (H/p) * (W/p), width]

Channels double at every stage and end at ``width / 2`` before the 1x1 convolution (for
``width`` 192 and ``p`` 8: 24, 48, 96 -> 192; Xiao et al. use BatchNorm, we use LayerNorm so the
stem has no batch statistics, same under tf.distribute and at inference). The tokens keep the
patch grid's row-major order, so position embeddings and everything after the stem are those of
the patchify ViT. Each token's receptive field grows to ``2p - 1`` pixels (15 px at p = 8):
neighbouring tokens overlap, so an object smaller than a patch that straddles a patch border is
still seen whole by one token. On small objects (the 12-16 px digits of digit-scenes at patch 8)
this is what the tiny captioners need; it costs about 1/10 of a tiny ViT's forward FLOPs.
"""

from __future__ import annotations

import math

import keras
from keras import ops

DOWNSAMPLING = ("stride", "max_pool")


def _max_pool2x2(x):
    """2x2 max-pooling of stride 2 of ``x [b, h, w, c]`` (h, w even) -> ``[b, h/2, w/2, c]``."""
    # elementwise maxima of the four strided slices, not ops.max over a reshape: Keras refuses
    # a reduction over an empty batch (exports are called with zero images)
    return ops.maximum(ops.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]),
                       ops.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2]))


def _conv3x3(x, kernel, bias, stride):
    """3x3 convolution with "same" padding of ``x [b, h, w, c]`` -> ``[b, h/s, w/s, c_out]``.
    Stride 1 pads 1 on every side; stride 2 (h, w even) pads 0 before and 1 after (TensorFlow's
    and XLA's SAME on an even side).

    Written as nine strided slices and one matmul rather than ``ops.conv``: TensorFlow's CPU
    convolution returns its input unchanged for an empty batch, which broke exported models
    called with zero images."""
    h, w = x.shape[1], x.shape[2]
    before = 1 if stride == 1 else 0
    xp = ops.pad(x, ((0, 0), (before, 1), (before, 1), (0, 0)))
    taps = [xp[:, di:di + h:stride, dj:dj + w:stride, :] for di in range(3) for dj in range(3)]
    cols = ops.concatenate(taps, axis=-1)                              # [b, h/s, w/s, 9 c]
    flat = ops.reshape(ops.cast(kernel, x.dtype), (-1, kernel.shape[-1]))  # (di, dj, c) order
    return ops.matmul(cols, flat) + ops.cast(bias, x.dtype)


@keras.saving.register_keras_serializable(package="keras_mm")
class ConvStem(keras.layers.Layer):
    """``[batch, H, W, C]`` -> ``[batch, (H // p) * (W // p), width]``.

    Args:
        patch_size: ``p``, a power of two >= 2 (the total stride).
        width: output width (the transformer's).
        kernel_initializer: of the convolutions (He normal for the ReLU stages).
        downsample: ``"stride"`` (Xiao et al.: 3x3 convolutions of stride 2; channels double at
            every stage and end at ``width / 2``) or ``"max_pool"`` (a small VGG-style CNN, the
            ViT paper's hybrid input (Dosovitskiy et al. 2021, Sec. 3.1): each stage a 3x3
            convolution of stride 1 at the stage's full resolution, LayerNorm, ReLU and 2x2
            max-pooling; channels double at every stage and end at ``2 width / 3``: 32, 64, 128
            for width 192 and p = 8). Max-pooling makes each token's feature tolerant to where
            in its window a small object lies. Trained directly to classify the digit of
            one-digit digit scenes, a tiny ViT with it reads unseen digits far sooner than
            with the strided stem (0.91 against 0.79 after 450 steps); under CoCa's losses it
            did not help (README).
    """

    def __init__(self, patch_size, width, kernel_initializer="he_normal", downsample="stride",
                 **kwargs):
        super().__init__(**kwargs)
        p = int(patch_size)
        if p < 2 or p & (p - 1):
            raise ValueError(f"a conv stem needs a power-of-two patch size >= 2, got {patch_size}")
        if downsample not in DOWNSAMPLING:
            raise ValueError(f"downsample must be one of {DOWNSAMPLING}, got {downsample!r}")
        self.patch_size = p
        self.width = int(width)
        self.downsample = downsample
        self.stages = int(math.log2(p))
        last = self.width // 2 if downsample == "stride" else 2 * self.width // 3
        self.channels = [max(8, last // 2 ** (self.stages - 1 - i)) for i in range(self.stages)]
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.norms = [keras.layers.LayerNormalization(epsilon=1e-6, dtype=self.dtype_policy,
                                                      name=f"norm_{i}")
                      for i in range(self.stages)]

    def build(self, input_shape):
        cin = int(input_shape[-1])
        self.kernels, self.biases = [], []
        for i, cout in enumerate(self.channels):
            self.kernels.append(self.add_weight(name=f"conv_{i}_kernel", shape=(3, 3, cin, cout),
                                                initializer=self.kernel_initializer))
            self.biases.append(self.add_weight(name=f"conv_{i}_bias", shape=(cout,),
                                               initializer="zeros"))
            self.norms[i].build((None, None, None, cout))
            cin = cout
        self.out_kernel = self.add_weight(name="out_kernel", shape=(cin, self.width),
                                          initializer="lecun_normal")
        self.out_bias = self.add_weight(name="out_bias", shape=(self.width,), initializer="zeros")

    def grid_size(self, image_shape):
        return image_shape[1] // self.patch_size, image_shape[2] // self.patch_size

    def call(self, images):
        p = self.patch_size
        gh, gw = images.shape[1] // p, images.shape[2] // p
        x = images[:, :gh * p, :gw * p, :]
        for kernel, bias, norm in zip(self.kernels, self.biases, self.norms):
            if self.downsample == "stride":
                x = ops.relu(norm(_conv3x3(x, kernel, bias, stride=2)))
            else:
                x = _max_pool2x2(ops.relu(norm(_conv3x3(x, kernel, bias, stride=1))))
        x = ops.matmul(x, ops.cast(self.out_kernel, x.dtype)) + ops.cast(self.out_bias, x.dtype)
        return ops.reshape(x, (-1, gh * gw, self.width))

    def compute_output_shape(self, input_shape):
        gh, gw = self.grid_size(input_shape)
        return (input_shape[0], gh * gw, self.width)

    def get_config(self):
        config = super().get_config()
        config.update(patch_size=self.patch_size, width=self.width,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer))
        if self.downsample != "stride":      # configs of strided stems stay as they were
            config["downsample"] = self.downsample
        return config
