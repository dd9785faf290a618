import keras
import numpy as np
import pytest

from keras_mm.layers.transformer_block import TransformerBlock
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.layers.gradients import outputs_and_gradients
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)


def _x(*shape):
    return RNG.normal(size=shape).astype("float32")


def test_pre_ln_block_matches_numpy():
    x = _x(2, 5, 8)
    layer = TransformerBlock(2, 16)
    layer(x)
    for v in layer.weights:
        if "bias" in v.path or "beta" in v.path:
            v.assign(RNG.normal(size=v.shape).astype("float32") * 0.1)
    keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_allclose(np.asarray(layer(x)), ref.block(layer, x.astype(np.float64)),
                               atol=2e-5)
    np.testing.assert_allclose(np.asarray(layer(x, attention_mask=keep, use_causal_mask=True)),
                               ref.block(layer, x.astype(np.float64), keep, causal=True),
                               atol=2e-5)


def _twins(**kwargs):
    """A block with remat and one without, with identical weights and seed states."""
    x = _x(3, 6, 12)
    plain, remat = TransformerBlock(3, 24, **kwargs), TransformerBlock(3, 24, remat=True, **kwargs)
    plain(x), remat(x)
    assert len(remat.variables) == len(plain.variables)
    for target, source in zip(remat.variables, plain.variables):   # weights and seed states
        target.assign(source)
    return x, plain, remat


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(dropout=0.2, attention_dropout=0.2, drop_path=0.3, qk_norm=True, fused_qkv=False),
])
def test_remat_gives_identical_outputs_and_gradients(kwargs, monkeypatch):
    calls = []
    real_remat = keras.remat

    def spy(f):
        calls.append(f)
        return real_remat(f)

    monkeypatch.setattr(keras, "remat", spy)
    x, plain, remat = _twins(**kwargs)
    training = bool(kwargs)        # with dropout: training mode, same seeds in both blocks
    calls.clear()
    y_plain, g_plain = outputs_and_gradients(plain, x, training=training)
    assert not calls
    y_remat, g_remat = outputs_and_gradients(remat, x, training=training)
    assert calls, "the remat block did not call keras.remat"
    np.testing.assert_allclose(y_remat, y_plain, atol=1e-6, rtol=1e-6)
    assert len(g_remat) == len(g_plain) == 1 + len(plain.trainable_variables)
    for a, b in zip(g_remat, g_plain):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    if training:   # dropout really acted, and the seeds advance between calls
        y_eval, _ = outputs_and_gradients(plain, x, training=False)
        assert np.abs(y_eval - y_plain).max() > 1e-3
        first, second = (np.asarray(plain(x, training=True)) for _ in range(2))
        assert np.abs(first - second).max() > 1e-3


def test_drop_path_drops_whole_examples():
    x = _x(64, 3, 8)
    layer = TransformerBlock(2, 8, drop_path=0.5)
    y_eval = np.asarray(layer(x))
    y = np.asarray(layer(x, training=True))
    # Each example keeps or drops each branch as a whole: some examples equal the input.
    unchanged = np.all(np.isclose(y, x, atol=1e-6), axis=(1, 2))
    assert 0 < unchanged.sum() < 64
    assert not np.allclose(y_eval, x)


def test_round_trip():
    layer = TransformerBlock(2, 16, dropout=0.1, drop_path=0.1, qk_norm=True, remat=True,
                             use_qkv_bias=False, attention_impl="dot_product",
                             activation="gelu", layer_norm_epsilon=1e-5)
    assert_serialization_round_trip(layer, _x(2, 4, 8), {"use_causal_mask": True})
