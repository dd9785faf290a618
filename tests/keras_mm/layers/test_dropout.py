import keras
import numpy as np
import pytest

from keras_mm.layers.dropout import FixedSeed, drop_path, dropout

pytestmark = pytest.mark.both_backends


def test_seed_tensor_makes_masks_reproducible():
    gen = keras.random.SeedGenerator(7)
    seed = gen.next()
    x = np.ones((4, 16), "float32")
    a, b = np.asarray(dropout(x, 0.5, seed)), np.asarray(dropout(x, 0.5, FixedSeed(seed)))
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) <= {0.0, 2.0} and 0 < (a == 0).sum() < a.size
    assert not np.array_equal(a, np.asarray(dropout(x, 0.5, gen.next())))
    np.testing.assert_array_equal(np.asarray(dropout(x, 0.0, seed)), x)


def test_drop_path_is_per_example():
    x = np.ones((256, 3, 5), "float32")
    y = np.asarray(drop_path(x, 0.25, keras.random.SeedGenerator(3).next()))
    per_example = y.reshape(256, -1)
    assert np.all(per_example == per_example[:, :1])              # whole examples
    kept = per_example[:, 0] > 0
    np.testing.assert_allclose(per_example[kept, 0], 1 / 0.75, rtol=1e-6)
    assert 0.6 < kept.mean() < 0.9
