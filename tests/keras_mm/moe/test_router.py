import keras
import numpy as np
import pytest

from keras_mm.moe.router import Router
from tests.keras_mm.layers.numpy_reference import softmax, w

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)


def _np(d):
    return {k: keras.ops.convert_to_numpy(v) for k, v in d.items()}


@pytest.mark.parametrize("k", [1, 3])
def test_logits_gates_and_top_k_match_numpy(k):
    x = RNG.normal(size=(2, 7, 6)).astype("float32")
    router = Router(5, num_selected=k)
    out = _np(router(x))
    logits = x.astype(np.float64) @ w(router.kernel)
    gates = softmax(logits)
    np.testing.assert_allclose(out["logits"], logits, atol=1e-5)
    np.testing.assert_allclose(out["gates"], gates, atol=1e-6)
    np.testing.assert_array_equal(out["noisy_logits"], out["logits"])
    np.testing.assert_array_equal(out["expert_index"], np.argsort(-gates, -1)[..., :k])
    np.testing.assert_allclose(out["expert_gate"], -np.sort(-gates, -1)[..., :k], atol=1e-6)
    assert out["expert_index"].dtype == np.int32
    assert [v.path.split("/")[-1] for v in router.weights] == ["kernel"]


def test_noise_only_in_training_with_v_moe_std():
    x = RNG.normal(size=(8, 256, 4)).astype("float32")
    router = Router(4, noise_std=1.0)
    clean = _np(router(x))
    np.testing.assert_array_equal(_np(router(x, training=False))["noisy_logits"], clean["logits"])
    noisy = _np(router(x, training=True))
    noise = noisy["noisy_logits"] - noisy["logits"]
    np.testing.assert_allclose(noisy["logits"], clean["logits"], atol=1e-6)
    assert abs(noise.std() - 1.0 / 4) < 0.01 and abs(noise.mean()) < 0.01   # sigma = 1 / E
    np.testing.assert_allclose(noisy["routing_gates"], softmax(noisy["noisy_logits"]), atol=1e-6)
    np.testing.assert_allclose(noisy["gates"], softmax(noisy["logits"]), atol=1e-6)
    # A given seed tensor makes the noise reproducible.
    seed = keras.ops.convert_to_tensor(np.array([3, 4]), dtype="uint32")
    a, b = (_np(router(x, training=True, seed=seed))["noisy_logits"] for _ in range(2))
    np.testing.assert_array_equal(a, b)


def test_float32_under_mixed_precision(mixed_bfloat16):
    x = RNG.normal(size=(2, 3, 8)).astype("float32")
    router = Router(4)
    out = router(keras.ops.cast(x, "bfloat16"))
    assert router.kernel.dtype == "float32"
    assert all(keras.backend.standardize_dtype(v.dtype) == "float32"
               for k, v in out.items() if k != "expert_index")
    np.testing.assert_allclose(np.asarray(out["gates"], np.float64).sum(-1), 1.0, atol=1e-6)


def test_config_round_trip():
    router = Router(6, num_selected=2, noise_std=0.5, kernel_initializer="zeros")
    revived = Router.from_config(router.get_config())
    assert revived.get_config() == router.get_config()
    assert revived.dtype_policy.name == "float32"
    with pytest.raises(ValueError):
        Router(2, num_selected=3)
