"""RO-ViT focal contrastive loss against a NumPy computation of the paper's equation (sigmoid written out,
p_t, (1 - p_t)^gamma log p_t summed over pairs / B), gamma = 0 against plain sigmoid cross-entropy, finite
differences for the gradients, extreme logits, per-replica shares."""

import keras
import numpy as np
import pytest

from keras_mm.losses import focal_contrastive_loss
from tests.keras_mm.losses.gradients import value_and_grads

pytestmark = pytest.mark.both_backends

B, D = 6, 8


def _embeddings(seed=0, batch=B, dim=D, paired=0.5):
    """Unit rows; text_i leans towards image_i by ``paired`` so there are easy and hard pairs."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((batch, dim))
    text = paired * image + rng.standard_normal((batch, dim))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return image.astype(np.float32), text.astype(np.float32)


def np_focal_loss(image, text, tau, gamma, alpha=None):
    """-(1/B) sum_i sum_j alpha_t (1 - p_t)^gamma log p_t, straight from the RO-ViT equation (float64)."""
    image, text = np.asarray(image, np.float64), np.asarray(text, np.float64)
    p = 1.0 / (1.0 + np.exp(-(image @ text.T) / tau))  # [B, B]
    positive = np.eye(len(image), dtype=bool)
    p_t = np.where(positive, p, 1.0 - p)
    weight = np.ones_like(p) if alpha is None else np.where(positive, alpha, 1.0 - alpha)
    return -np.sum(weight * (1.0 - p_t) ** gamma * np.log(p_t)) / len(image)


def np_sigmoid_bce(image, text, tau):
    """Binary cross-entropy of every pair with diagonal labels, summed / B (log-sigmoid via logaddexp)."""
    logits = np.asarray(image, np.float64) @ np.asarray(text, np.float64).T / tau
    labels = np.eye(len(image))
    bce = labels * np.logaddexp(0.0, -logits) + (1.0 - labels) * np.logaddexp(0.0, logits)
    return bce.sum() / len(image)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 0.5])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_matches_numpy_equation(gamma, tau):
    image, text = _embeddings()
    value = focal_contrastive_loss(image, text, tau, gamma=gamma)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    np.testing.assert_allclose(np.asarray(value), np_focal_loss(image, text, tau, gamma), rtol=2e-5)


@pytest.mark.parametrize("alpha", [0.25, 0.9])
def test_alpha_weighting(alpha):
    image, text = _embeddings(seed=1)
    value = focal_contrastive_loss(image, text, 0.2, gamma=2.0, alpha=alpha)
    np.testing.assert_allclose(np.asarray(value), np_focal_loss(image, text, 0.2, 2.0, alpha), rtol=2e-5)


def test_default_gamma_is_two():
    image, text = _embeddings(seed=2)
    np.testing.assert_allclose(np.asarray(focal_contrastive_loss(image, text, 0.1)),
                               np_focal_loss(image, text, 0.1, 2.0), rtol=2e-5)


def test_gamma_zero_is_sigmoid_cross_entropy_summed_over_batch():
    image, text = _embeddings(seed=3)
    np.testing.assert_allclose(np.asarray(focal_contrastive_loss(image, text, 0.05, gamma=0.0)),
                               np_sigmoid_bce(image, text, 0.05), rtol=2e-5)


def test_focusing_down_weights_easy_pairs():
    """gamma > 0 shrinks the loss (every (1 - p_t)^gamma < 1), the more so the larger gamma."""
    image, text = _embeddings(seed=4, paired=3.0)
    values = [float(focal_contrastive_loss(image, text, 0.1, gamma=g)) for g in (0.0, 1.0, 2.0)]
    assert values[0] > values[1] > values[2] > 0.0


def test_gradients_match_finite_differences():
    """d/d image, d/d text and d/d tau (a learned temperature) against central differences of the NumPy
    equation in float64."""
    image, text = _embeddings(seed=5)
    tau, gamma = 0.3, 2.0
    value, (g_image, g_text, g_tau) = value_and_grads(
        lambda x, y, t: focal_contrastive_loss(x, y, t, gamma=gamma), image, text, tau)
    np.testing.assert_allclose(value, np_focal_loss(image, text, tau, gamma), rtol=2e-5)

    def numeric(f, x, h=1e-6):
        x = np.asarray(x, np.float64)
        grad = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            step = np.zeros_like(x)
            step[idx] = h
            grad[idx] = (f(x + step) - f(x - step)) / (2 * h)
        return grad

    np.testing.assert_allclose(g_image, numeric(lambda x: np_focal_loss(x, text, tau, gamma), image),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(g_text, numeric(lambda y: np_focal_loss(image, y, tau, gamma), text),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(g_tau, numeric(lambda t: np_focal_loss(image, text, t, gamma), np.array(tau)),
                               rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_extreme_logits_are_finite(gamma):
    """tau = 1e-3 puts logits near +-1000, where a naive sigmoid gives p = 0 or 1 and log(0)."""
    image = np.eye(B, D, dtype=np.float32)  # orthogonal unit rows: off-diagonal logits are 0, p = 1/2
    text = image.copy()
    text[0] = -image[0]  # a maximally wrong positive pair: logit -1000, log p_t ~ -1000
    value, grads = value_and_grads(lambda x, y: focal_contrastive_loss(x, y, 1e-3, gamma=gamma), image, text)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
    # The wrong positive: (1 - p_t)^gamma = 1, -log p_t = 1000 (to 1e-400); the other positives ~ 0; each of
    # the B^2 - B negatives at p = 1/2: (1/2)^gamma * log 2.
    expected = (1000.0 + (B * B - B) * 0.5 ** gamma * np.log(2.0)) / B
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    _, grads = value_and_grads(lambda x, y: focal_contrastive_loss(x, y, 1e-3, gamma=gamma), image, image)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_low_precision_embeddings_give_float32():
    image, text = _embeddings(seed=7)
    for dtype in ("float16", "bfloat16"):
        x, y = keras.ops.cast(image, dtype), keras.ops.cast(text, dtype)
        value = focal_contrastive_loss(x, y, 0.1)
        assert keras.backend.standardize_dtype(value.dtype) == "float32"
        x32 = keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))
        y32 = keras.ops.convert_to_numpy(keras.ops.cast(y, "float32"))
        np.testing.assert_allclose(np.asarray(value), np_focal_loss(x32, y32, 0.1, 2.0), rtol=2e-5)


def test_replica_shares_sum_to_the_global_batch_loss():
    """Two replicas of 3 images each against the 6 gathered texts, with label offsets 0 and 3."""
    image, text = _embeddings(seed=8)
    shares = [focal_contrastive_loss(image[:3], text, 0.1, label_offset=0),
              focal_contrastive_loss(image[3:], text, 0.1, label_offset=3, global_batch_size=B)]
    np.testing.assert_allclose(float(shares[0]) + float(shares[1]), np_focal_loss(image, text, 0.1, 2.0),
                               rtol=2e-5)
