import numpy as np
import pytest

from keras_mm.layers.mlp import Mlp
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends


def test_matches_numpy_dense_gelu_dense():
    x = np.random.default_rng(0).normal(size=(2, 3, 6)).astype("float32")
    layer = Mlp(16)
    assert layer(x).shape == (2, 3, 6)
    np.testing.assert_allclose(np.asarray(layer(x)), ref.mlp(layer, x.astype(np.float64)),
                               atol=1e-5)
    assert Mlp(16, output_dim=4)(x).shape == (2, 3, 4)


def test_dropout_in_training_only():
    x = np.ones((4, 8, 6), "float32")
    layer = Mlp(64, dropout=0.5)
    np.testing.assert_allclose(np.asarray(layer(x, training=False)), np.asarray(layer(x)))
    assert np.abs(np.asarray(layer(x, training=True)) - np.asarray(layer(x))).max() > 1e-4


def test_round_trip():
    assert_serialization_round_trip(Mlp(8, output_dim=5, activation="gelu", dropout=0.1),
                                    np.ones((2, 3, 4), "float32"))
