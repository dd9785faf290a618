"""FlexiPatchEmbedding: tokens at any patch size from one underlying kernel (PI-resize). The
references are NumPy patchify + a kernel PI-resized with tf.image.resize's operator and NumPy's
pinv (tests/keras_mm/layers/numpy_reference.py)."""

import keras
import numpy as np
import pytest

from keras_mm.layers.flexi_patch_embedding import FlexiPatchEmbedding
from keras_mm.layers.patch_embedding import PatchEmbedding
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.layers.gradients import outputs_and_gradients
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)


def _images(n=2, size=24, channels=3):
    return RNG.normal(size=(n, size, size, channels)).astype("float32")


def _layer(base=8, width=10, **kwargs):
    layer = FlexiPatchEmbedding(base, width, **kwargs)
    layer.build((None, None, None, 3))
    layer.bias.assign(RNG.normal(size=(width,)).astype("float32"))
    return layer


def _upsample_each_patch(images, p, factor):
    """Every ``p x p`` patch resized bilinearly (tf.image.resize) to ``factor * p``, reassembled:
    the image whose ``factor * p`` patches are exactly the resized patches."""
    b, h, w, c = images.shape
    q = p * factor
    out = np.zeros((b, h * factor, w * factor, c))
    for i in range(h // p):
        for j in range(w // p):
            patch = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p]
            out[:, i * q:(i + 1) * q, j * q:(j + 1) * q] = ref.bilinear_resize_tf(patch, (q, q))
    return out.astype("float32")


@pytest.mark.parametrize("impl", ["conv", "matmul"])
def test_resized_to_16_gives_the_same_tokens_on_upsampled_patches(impl):
    """A base-8 embedding run at patch 16 on the input upsampled by 2 (each patch bilinearly)
    gives the tokens of patch 8 on the original, to 1e-4; a bilinearly resized kernel does not.
    (Bilinearly resizing the *whole* image instead also mixes pixels of neighbouring patches at
    the patch borders, so it is only approximately the same.)"""
    layer = _layer(implementation=impl)
    images = _images(size=24)
    tokens_8 = np.asarray(layer(images))                               # [2, 9, 10]
    big = _upsample_each_patch(images, 8, 2)                            # [2, 48, 48, 3]
    tokens_16 = np.asarray(layer(big, patch_size=16))
    assert tokens_16.shape == tokens_8.shape == (2, 9, 10)
    np.testing.assert_allclose(tokens_16, tokens_8, atol=1e-4)

    kernel = ref.w(layer.kernel)
    plain = ref.bilinear_resize_tf(kernel.reshape(8, 8, 30).transpose(2, 0, 1)[..., None],
                                   (16, 16))[..., 0].transpose(1, 2, 0).reshape(16, 16, 3, 10)
    naive = ref.patchify(big.astype(np.float64), 16) @ plain.reshape(-1, 10) + ref.w(layer.bias)
    assert np.abs(naive - tokens_8).max() > 1.0


@pytest.mark.parametrize("patch", [4, 6, 8, 12, 16])
def test_equals_numpy_patchify_with_pi_resized_kernel(patch):
    layer = _layer()
    images = _images(size=48)
    out = np.asarray(layer(images, patch_size=patch))
    assert out.shape == (2, (48 // patch) ** 2, 10)
    assert layer.grid_size(images.shape, patch) == (48 // patch, 48 // patch)
    kernel = ref.pi_resize_kernel_tf(ref.w(layer.kernel), patch)
    expected = (ref.patchify(images.astype(np.float64), patch) @ kernel.reshape(-1, 10)
                + ref.w(layer.bias))
    np.testing.assert_allclose(out, expected, atol=2e-4)


def test_base_size_is_a_plain_patch_embedding():
    flexi = _layer(base=4)
    plain = PatchEmbedding(4, 10)
    images = _images(size=16)
    plain(images)
    plain.set_weights(flexi.get_weights())
    np.testing.assert_allclose(np.asarray(flexi(images)), np.asarray(plain(images)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(flexi(images, patch_size=4)),
                               np.asarray(plain(images)), atol=1e-6)


def test_gradients_reach_the_underlying_kernel():
    layer = _layer(base=8)

    class AtPatch12(keras.layers.Layer):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def call(self, x):
            return self.inner(x, patch_size=12)

    wrapper, images = AtPatch12(layer), _images(size=24)
    wrapper(images)
    _, grads = outputs_and_gradients(wrapper, images)
    kernel_grad = grads[1 + [v.path for v in layer.trainable_variables].index(layer.kernel.path)]
    assert kernel_grad.shape == (8, 8, 3, 10) and np.abs(kernel_grad).min() > 0


def test_mixed_precision(mixed_bfloat16):
    layer = FlexiPatchEmbedding(8, 6)
    images = _images(size=24)
    for p in (8, 12, 6):
        out = layer(images, patch_size=p)
        assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
        assert np.isfinite(np.asarray(keras.ops.cast(out, "float32"))).all()
    assert layer.kernel.dtype == "float32"


def test_round_trip():
    layer = FlexiPatchEmbedding(8, 6, implementation="matmul")
    config = layer.get_config()
    assert config["base_patch_size"] == [8, 8] and "patch_size" not in config
    assert_serialization_round_trip(layer, _images(1, 24), {"patch_size": 12})
