import numpy as np
import pytest

from keras_mm.layers.patch_embedding import PatchEmbedding
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends


@pytest.mark.parametrize("impl", ["conv", "matmul"])
@pytest.mark.parametrize("size", [(16, 24), (18, 21)])      # the second one is cropped
def test_equals_numpy_patchify_and_matmul(impl, size):
    images = np.random.default_rng(0).normal(size=(2, *size, 3)).astype("float32")
    layer = PatchEmbedding(4, 10, implementation=impl)
    out = np.asarray(layer(images))
    assert out.shape == (2, (size[0] // 4) * (size[1] // 4), 10)
    layer.bias.assign(np.arange(10, dtype="float32"))
    kernel = ref.w(layer.kernel).reshape(4 * 4 * 3, 10)       # [p, p, c, d] -> [p*p*c, d]
    expected = ref.patchify(images.astype(np.float64), 4) @ kernel + np.arange(10)
    np.testing.assert_allclose(np.asarray(layer(images)), expected, atol=1e-4)


def test_rectangular_patches_and_round_trip():
    layer = PatchEmbedding((2, 4), 6)
    images = np.random.default_rng(1).normal(size=(1, 8, 8, 3)).astype("float32")
    assert layer(images).shape == (1, 4 * 2, 6)
    assert layer.grid_size((None, 8, 8, 3)) == (4, 2)
    assert_serialization_round_trip(layer, images)


def test_bad_implementation():
    with pytest.raises(ValueError, match="implementation"):
        PatchEmbedding(4, 8, implementation="fft")
