"""Captioning loss and token accuracy against a NumPy computation written from the definitions (log-softmax
spelled out, per-token mean over counted tokens, label smoothing as (1 - eps) one_hot + eps / V); the
gradient against its closed form (softmax - target) * m / sum(m); low-precision logits; all-masked batches."""

import keras
import numpy as np
import pytest

from keras_mm.losses import captioning_loss, token_accuracy

pytestmark = pytest.mark.both_backends

BATCH, TOKENS, VOCAB = 3, 7, 11


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _np_targets(labels, eps, vocab):
    one_hot = np.eye(vocab)[labels]  # [batch, tokens, vocab]
    return (1.0 - eps) * one_hot + eps / vocab


def _np_weights(labels, mask):
    return (labels != 0).astype(np.float64) if mask is None else np.asarray(mask, np.float64)


def np_captioning_loss(logits, labels, mask=None, eps=0.0):
    ce = -(_np_targets(labels, eps, logits.shape[-1]) * _np_log_softmax(logits)).sum(-1)  # [batch, tokens]
    w = _np_weights(labels, mask)
    return (ce * w).sum() / w.sum() if w.sum() > 0 else 0.0


def np_captioning_grad(logits, labels, mask=None, eps=0.0):
    """d loss / d logits = (softmax - target) * m_bt / sum(m)."""
    w = _np_weights(labels, mask)
    probs = np.exp(_np_log_softmax(logits))
    return (probs - _np_targets(labels, eps, logits.shape[-1])) * w[..., None] / max(w.sum(), 1.0)


def np_token_accuracy(logits, labels, mask=None):
    w = _np_weights(labels, mask)
    hits = (np.asarray(logits, np.float64).argmax(-1) == labels).astype(np.float64)
    return (hits * w).sum() / w.sum() if w.sum() > 0 else 0.0


def _data(seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((BATCH, TOKENS, VOCAB))).astype(np.float32)
    labels = rng.integers(1, VOCAB, size=(BATCH, TOKENS)).astype(np.int32)
    labels[0, 5:] = 0  # padding at the end of two captions
    labels[2, 3:] = 0
    return logits, labels


def loss_and_grad(logits, labels, mask=None, label_smoothing=0.0):
    """(loss, d loss / d logits) on the active backend, compiled (tf.function / jax.jit)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def run(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = captioning_loss(x, labels, mask, label_smoothing)
            return value, tape.gradient(value, x)

        value, grad = run(tf.constant(logits))
    elif backend == "jax":
        import jax

        value, grad = jax.jit(jax.value_and_grad(
            lambda x: captioning_loss(x, labels, mask, label_smoothing)))(logits)
    else:
        pytest.skip(f"no gradient helper for backend {backend}")
    return np.asarray(value), np.asarray(grad)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_matches_numpy_with_default_pad_mask(label_smoothing):
    logits, labels = _data()
    value = captioning_loss(logits, labels, label_smoothing=label_smoothing)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    np.testing.assert_allclose(
        np.asarray(value), np_captioning_loss(logits, labels, eps=label_smoothing), rtol=1e-5, atol=1e-6)


def test_padding_does_not_count():
    """Changing the logits at PAD positions changes nothing; dropping them by hand gives the same mean."""
    logits, labels = _data()
    changed = logits.copy()
    changed[labels == 0] = 100.0 * np.random.default_rng(5).standard_normal(changed[labels == 0].shape)
    np.testing.assert_allclose(
        np.asarray(captioning_loss(changed, labels)), np.asarray(captioning_loss(logits, labels)), rtol=1e-6)
    counted = labels != 0
    log_p = _np_log_softmax(logits)[counted]  # [n_counted, vocab]
    expected = -np.mean(log_p[np.arange(counted.sum()), labels[counted]])
    np.testing.assert_allclose(np.asarray(captioning_loss(logits, labels)), expected, rtol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_explicit_mask_overrides_pad_rule(label_smoothing):
    logits, labels = _data(seed=1)
    rng = np.random.default_rng(2)
    mask = (rng.random((BATCH, TOKENS)) < 0.6).astype(np.float32)
    mask[1, 0] = 1.0
    labels[1, 0] = 0  # a counted token with id 0: the explicit mask decides, not the PAD rule
    for m in (mask, mask.astype(bool), mask.astype(np.int32)):
        np.testing.assert_allclose(
            np.asarray(captioning_loss(logits, labels, m, label_smoothing)),
            np_captioning_loss(logits, labels, mask, label_smoothing), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_gradient_matches_closed_form(label_smoothing):
    logits, labels = _data(seed=3)
    value, grad = loss_and_grad(logits, labels, label_smoothing=label_smoothing)
    np.testing.assert_allclose(value, np_captioning_loss(logits, labels, eps=label_smoothing), rtol=1e-5)
    np.testing.assert_allclose(grad, np_captioning_grad(logits, labels, eps=label_smoothing), atol=1e-6)
    assert np.all(grad[labels == 0] == 0.0)


def test_all_masked_batch_is_zero_not_nan():
    logits, _ = _data()
    labels = np.zeros((BATCH, TOKENS), np.int32)
    value, grad = loss_and_grad(logits, labels)
    assert value == 0.0 and np.all(np.isfinite(grad)) and np.all(grad == 0.0)
    value, grad = loss_and_grad(logits, labels + 1, mask=np.zeros((BATCH, TOKENS), np.float32),
                                label_smoothing=0.1)
    assert value == 0.0 and np.all(grad == 0.0)
    assert float(token_accuracy(logits, labels)) == 0.0


def test_large_logits_stay_finite():
    logits, labels = _data(scale=1e4)
    value, grad = loss_and_grad(logits, labels, label_smoothing=0.1)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, np_captioning_loss(logits, labels, eps=0.1), rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_logits_are_computed_in_float32(dtype):
    logits, labels = _data(seed=4, scale=8.0)
    low = keras.ops.cast(logits, dtype)
    as_float32 = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(low, "float32")))
    value = captioning_loss(low, labels, label_smoothing=0.1)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    # Exact to float32 round-off for the rounded logits: no float16 / bfloat16 arithmetic inside.
    np.testing.assert_allclose(np.asarray(value), np_captioning_loss(as_float32, labels, eps=0.1), rtol=1e-6)
    acc = token_accuracy(low, labels)
    np.testing.assert_allclose(np.asarray(acc), np_token_accuracy(as_float32, labels), rtol=1e-6)


def test_token_accuracy_matches_numpy():
    logits, labels = _data(seed=6)
    # Make some predictions right: put a large logit on the label at a few counted positions.
    for b, t in [(0, 0), (0, 3), (1, 2), (1, 6), (2, 1)]:
        logits[b, t, labels[b, t]] = 50.0
    expected = np_token_accuracy(logits, labels)
    assert 0.0 < expected < 1.0
    np.testing.assert_allclose(np.asarray(token_accuracy(logits, labels)), expected, rtol=1e-6)
    mask = np.zeros((BATCH, TOKENS), np.float32)
    mask[0, 0] = mask[1, 2] = mask[1, 3] = 1.0
    np.testing.assert_allclose(np.asarray(token_accuracy(logits, labels, mask)),
                               np_token_accuracy(logits, labels, mask), rtol=1e-6)
