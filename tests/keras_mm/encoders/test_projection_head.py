import numpy as np
import pytest

from keras_mm.encoders.projection_head import ProjectionHead
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
X = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")


def test_linear_and_mlp_heads():
    linear = ProjectionHead(4, use_bias=False)
    np.testing.assert_allclose(np.asarray(linear(X)), X @ ref.w(linear.projection.kernel),
                               atol=1e-5)
    assert len(linear.weights) == 1
    mlp = ProjectionHead(4, hidden_dim=8, activation="relu")
    mlp(X)
    hidden = np.maximum(ref.dense(mlp.hidden, X.astype(np.float64)), 0)
    np.testing.assert_allclose(np.asarray(mlp(X)), ref.dense(mlp.projection, hidden), atol=1e-5)


def test_round_trip():
    assert_serialization_round_trip(ProjectionHead(4, hidden_dim=8, kernel_initializer="zeros"), X)
