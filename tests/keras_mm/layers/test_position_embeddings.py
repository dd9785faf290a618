import keras
import numpy as np
import pytest

from keras_mm.layers.learned_position_embedding import LearnedPositionEmbedding
from keras_mm.layers.sincos_position_embedding import SinCos2DPositionEmbedding, sincos2d
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends


def test_sincos2d_matches_the_big_vision_formula():
    np.testing.assert_allclose(sincos2d(3, 5, 16), ref.sincos2d(3, 5, 16), atol=1e-6)
    layer = SinCos2DPositionEmbedding((3, 5))
    x = np.zeros((2, 15, 16), "float32")
    np.testing.assert_allclose(np.asarray(layer(x))[1], ref.sincos2d(3, 5, 16), atol=1e-6)
    assert not layer.weights                                   # fixed, nothing trainable
    # Another grid is computed exactly; a crop of a larger grid equals the smaller grid.
    np.testing.assert_allclose(np.asarray(layer(np.zeros((1, 8, 16), "float32"),
                                                grid_size=(2, 4)))[0],
                               ref.sincos2d(2, 4, 16), atol=1e-6)
    big = sincos2d(4, 6, 16).reshape(4, 6, 16)
    np.testing.assert_allclose(big[:3, :5].reshape(15, 16), sincos2d(3, 5, 16), atol=1e-6)
    with pytest.raises(ValueError, match="width % 4"):
        sincos2d(2, 2, 6)


def test_learned_1d_crops_to_the_sequence():
    layer = LearnedPositionEmbedding(8)
    x = np.zeros((2, 8, 4), "float32")
    layer(x)
    table = ref.w(layer.embeddings)
    np.testing.assert_allclose(np.asarray(layer(np.ones((2, 5, 4), "float32")))[0],
                               1 + table[:5], atol=1e-6)
    with pytest.raises(ValueError, match="only 8"):
        layer(np.zeros((1, 9, 4), "float32"))


def test_learned_2d_resize_and_crop():
    layer = LearnedPositionEmbedding((4, 6))
    x = np.zeros((1, 24, 8), "float32")
    np.testing.assert_allclose(np.asarray(layer(x))[0], ref.w(layer.embeddings).reshape(24, 8),
                               atol=1e-6)
    assert len(layer.trainable_weights) == 1
    # Bilinear resize of a table linear in the row index stays linear (and keeps constants).
    rows = np.arange(4, dtype="float32")[:, None, None] * np.ones((4, 6, 8), "float32")
    layer.embeddings.assign(rows)
    out = np.asarray(layer(np.zeros((1, 8 * 6, 8), "float32"), grid_size=(8, 6)))[0]
    out = out.reshape(8, 6, 8)
    assert np.allclose(out, out[:, :1, :1])                    # constant along columns
    assert np.all(np.diff(out[:, 0, 0]) >= -1e-6)              # monotone along rows
    crop = LearnedPositionEmbedding((4, 6), resize_mode="crop")
    crop(x)
    out = np.asarray(crop(np.zeros((1, 6, 8), "float32"), grid_size=(2, 3)))[0]
    np.testing.assert_allclose(out, ref.w(crop.embeddings)[:2, :3].reshape(6, 8), atol=1e-6)


def test_round_trips():
    assert_serialization_round_trip(LearnedPositionEmbedding(6), np.ones((2, 6, 4), "float32"))
    assert_serialization_round_trip(
        LearnedPositionEmbedding((2, 3), resize_mode="crop",
                                 initializer=keras.initializers.RandomNormal(stddev=0.5)),
        np.ones((2, 6, 4), "float32"))
    assert_serialization_round_trip(SinCos2DPositionEmbedding((2, 3), temperature=100.0),
                                    np.ones((2, 6, 8), "float32"))
