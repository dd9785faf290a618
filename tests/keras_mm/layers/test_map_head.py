import numpy as np
import pytest

from keras_mm.layers.map_head import MAPHead
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)


def test_matches_numpy_and_is_permutation_invariant():
    x = RNG.normal(size=(3, 7, 12)).astype("float32")
    head = MAPHead(3, 24)
    y = np.asarray(head(x))
    assert y.shape == (3, 12)
    np.testing.assert_allclose(y, ref.map_head(head, x.astype(np.float64)), atol=2e-5)
    perm = RNG.permutation(7)
    np.testing.assert_allclose(np.asarray(head(x[:, perm])), y, atol=1e-5)
    assert len(head.trainable_weights) == 1 + 6 + 2 + 4    # probe, q kv out (+biases), LN, MLP


def test_padding_mask_ignores_padded_tokens():
    x = RNG.normal(size=(2, 6, 8)).astype("float32")
    keep = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    head = MAPHead(2, 16)
    y = np.asarray(head(x, padding_mask=keep))
    noisy = np.where(keep[:, :, None], x, 50.0)
    np.testing.assert_allclose(np.asarray(head(noisy, padding_mask=keep)), y, atol=1e-5)
    np.testing.assert_allclose(y, ref.map_head(head, x.astype(np.float64), keep), atol=2e-5)


def test_round_trip():
    assert_serialization_round_trip(MAPHead(2, 16, fused_qkv=False, attention_impl="dot_product"),
                                    RNG.normal(size=(2, 5, 8)).astype("float32"))
