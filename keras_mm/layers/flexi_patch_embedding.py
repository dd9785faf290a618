"""Flexible patch embedding (FlexiViT, Beyer et al. 2023): one underlying kernel at a base patch
size, PI-resized (``keras_mm.layers.pi_resize``) to the patch size asked for at call time."""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.layers.patch_embedding import PatchEmbedding, _pair
from keras_mm.layers.pi_resize import pi_resize_kernel


@keras.saving.register_keras_serializable(package="keras_mm")
class FlexiPatchEmbedding(PatchEmbedding):
    """``[batch, H, W, C]`` -> ``[batch, (H // p) * (W // p), width]`` for any patch size ``p``.

    The weights are one kernel ``[P, P, C, width]`` at the base patch size ``P`` and one bias;
    ``call(images, patch_size=p)`` projects ``p x p`` patches with ``pi_resize_kernel(kernel, p)``
    (the kernel itself when ``p == P``), so that a ``P x P`` patch and the same patch resized
    bilinearly to ``p x p`` give the same token (exactly when ``p >= P``, in the least-squares
    sense when ``p < P``). FlexiViT keeps a 32 x 32 underlying kernel for patch sizes 8..48.
    The bias is shared by all patch sizes. Gradients of every patch size reach the one kernel.

    Args:
        base_patch_size: ``P`` (int or pair), the shape of the stored kernel.
        width, implementation, kernel_initializer, bias_initializer: as ``PatchEmbedding``.

    Call args:
        images: ``[batch, H, W, C]``.
        patch_size: int or pair, static; None = the base patch size.
    """

    def __init__(self, base_patch_size, width, **kwargs):
        super().__init__(base_patch_size, width, **kwargs)

    @property
    def base_patch_size(self):
        return self.patch_size

    def grid_size(self, image_shape, patch_size=None):
        """``(H // p_h, W // p_w)`` for ``[batch, H, W, C]`` and a patch size (None = base)."""
        ph, pw = self.patch_size if patch_size is None else _pair(patch_size)
        return image_shape[1] // ph, image_shape[2] // pw

    def resized_kernel(self, patch_size=None):
        """The kernel for a patch size, ``[p_h, p_w, C, width]`` (resized in float32, returned
        in the compute dtype)."""
        new = self.patch_size if patch_size is None else _pair(patch_size)
        if new == self.patch_size:
            return self.kernel
        return ops.cast(pi_resize_kernel(self.kernel, new), self.compute_dtype)

    def call(self, images, patch_size=None):
        new = self.patch_size if patch_size is None else _pair(patch_size)
        return self._embed(images, self.resized_kernel(new), new)

    def compute_output_spec(self, images, patch_size=None):
        gh, gw = self.grid_size(tuple(images.shape), patch_size)
        return keras.KerasTensor((images.shape[0], gh * gw, self.width),
                                 dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config["base_patch_size"] = config.pop("patch_size")
        return config
