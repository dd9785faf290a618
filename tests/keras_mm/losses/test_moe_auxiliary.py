"""The MoE auxiliary losses against NumPy written from the formulas (V-MoE App. A.2, LIMoE
Sec. 3.1), over all tokens and over one modality's tokens (mask)."""

import math

import keras
import numpy as np
import pytest

from keras_mm.losses import moe_auxiliary as aux

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _gates(batch=3, tokens=7, experts=5, scale=2.0):
    return _softmax(RNG.normal(size=(batch, tokens, experts)) * scale)


def _mask(batch=3, tokens=7):
    mask = (RNG.random((batch, tokens)) > 0.4).astype("float32")
    mask[0, 0] = 1.0
    return mask


def _selected(gates, mask):
    """The [n, E] rows of the tokens the mask selects (all with mask None)."""
    flat = gates.reshape(-1, gates.shape[-1])
    return flat if mask is None else flat[np.asarray(mask).reshape(-1) > 0]


def _np_entropy(p):
    return -sum(q * math.log(q) for q in p if q > 0)


def _np_cv2(values):
    values = np.asarray(values, np.float64)
    return values.var() / values.mean() ** 2          # population variance / mean^2


def _f(t):
    return float(keras.ops.convert_to_numpy(t))


@pytest.mark.parametrize("masked", [False, True])
def test_importance_loss(masked):
    gates, mask = _gates(), (_mask() if masked else None)
    importance = _selected(gates, mask).sum(0)               # imp_e = sum_x g(x)_e
    np.testing.assert_allclose(_f(aux.importance_loss(gates.astype("float32"), mask)),
                               _np_cv2(importance), rtol=1e-5)


@pytest.mark.parametrize("k, masked", [(1, False), (1, True), (2, True)])
def test_load_loss(k, masked):
    sigma = 0.3
    logits = RNG.normal(size=(3, 7, 5))
    noisy = logits + RNG.normal(size=logits.shape) * sigma
    mask = _mask() if masked else None
    clean_rows, noisy_rows = _selected(logits, mask), _selected(noisy, mask)
    load = np.zeros(5)
    for clean, noised in zip(clean_rows, noisy_rows):
        threshold = sorted(noised, reverse=True)[k - 1]      # k-th largest noisy logit
        for e in range(5):                                   # P(e still in the top k) = 1 - Phi
            z = (threshold - clean[e]) / sigma
            load[e] += 1.0 - 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
    got = aux.load_loss(logits.astype("float32"), noisy.astype("float32"), sigma, k, mask)
    np.testing.assert_allclose(_f(got), _np_cv2(load), rtol=1e-4)


def test_load_loss_without_noise_is_zero():
    logits = RNG.normal(size=(2, 4, 3)).astype("float32")
    assert _f(aux.load_loss(logits, logits, 0.0)) == 0.0


@pytest.mark.parametrize("masked", [False, True])
def test_local_entropy_loss(masked):
    gates, mask = _gates(), (_mask() if masked else None)
    rows = _selected(gates, mask)
    expected = np.mean([_np_entropy(p) for p in rows])
    np.testing.assert_allclose(_f(aux.local_entropy_loss(gates.astype("float32"), mask)),
                               expected, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_global_entropy_loss_without_threshold(masked):
    gates, mask = _gates(), (_mask() if masked else None)
    mean_gates = _selected(gates, mask).mean(0)              # p_m
    np.testing.assert_allclose(_f(aux.global_entropy_loss(gates.astype("float32"), mask)),
                               -_np_entropy(mean_gates), rtol=1e-5)


def test_global_entropy_threshold_above_and_below():
    # A modality spread over ~2 of 8 experts: its marginal entropy is about log 2.
    logits = np.full((4, 6, 8), -8.0)
    logits[..., 0] = RNG.normal(size=(4, 6))
    logits[..., 1] = RNG.normal(size=(4, 6))
    gates = _softmax(logits)
    mask = _mask(4, 6)
    entropy = _np_entropy(_selected(gates, mask).mean(0))
    assert math.log(1.5) < entropy < math.log(4.0)
    g32 = gates.astype("float32")
    # tau = 4 experts: entropy below log 4 -> the loss is log 4 - H > 0.
    np.testing.assert_allclose(_f(aux.global_entropy_loss(g32, mask, threshold=4.0)),
                               math.log(4.0) - entropy, rtol=1e-5)
    # tau = 1.5 experts: entropy already above log 1.5 -> 0.
    assert _f(aux.global_entropy_loss(g32, mask, threshold=1.5)) == 0.0
    with pytest.raises(ValueError):
        aux.global_entropy_loss(g32, mask, threshold=0.5)


def test_mask_selects_a_modality():
    # Image tokens route to expert 0, text tokens spread: each loss sees only its modality.
    image = np.zeros((2, 4, 3))
    image[..., 0] = 5.0
    text = RNG.normal(size=(2, 4, 3))
    gates = _softmax(np.concatenate([image, text], axis=1)).astype("float32")   # [2, 8, 3]
    is_image = np.concatenate([np.ones((2, 4)), np.zeros((2, 4))], axis=1).astype("float32")
    only_image = gates[:, :4]
    for fn in (aux.importance_loss, aux.local_entropy_loss, aux.global_entropy_loss):
        np.testing.assert_allclose(_f(fn(gates, is_image)), _f(fn(only_image)), rtol=1e-5)
        assert abs(_f(fn(gates, is_image)) - _f(fn(gates, 1.0 - is_image))) > 1e-3


def test_empty_modality_gives_zero_not_nan():
    gates = _gates().astype("float32")
    none = np.zeros((3, 7), "float32")
    for value in (aux.importance_loss(gates, none), aux.local_entropy_loss(gates, none),
                  aux.global_entropy_loss(gates, none),
                  aux.global_entropy_loss(gates, none, threshold=2.0),
                  aux.load_loss(gates, gates, 0.1, 1, none)):
        assert _f(value) == 0.0


def test_gradients_are_finite_with_an_empty_modality_and_zero_gates():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("TensorFlow GradientTape")
    import tensorflow as tf

    gates = np.zeros((2, 3, 4), "float32")
    gates[..., 0] = 1.0                                      # exact zeros in the gates
    gates = tf.Variable(gates)
    for mask in (np.ones((2, 3), "float32"), np.zeros((2, 3), "float32")):
        with tf.GradientTape() as tape:
            loss = (aux.importance_loss(gates, mask) + aux.local_entropy_loss(gates, mask)
                    + aux.global_entropy_loss(gates, mask, threshold=2.0))
        assert np.isfinite(tape.gradient(loss, gates).numpy()).all()
