"""ContrastiveLogits: the papers' initial scalars, logits, float32 under mixed precision, serialization."""

import math

import keras
import numpy as np
import pytest

from keras_mm.layers.contrastive_logits import ContrastiveLogits
from keras_mm.losses import sigmoid_loss, softmax_contrastive_loss

pytestmark = pytest.mark.both_backends

RNG = np.random.default_rng(0)
IMAGE = RNG.normal(size=(5, 8)).astype(np.float32)
TEXT = RNG.normal(size=(6, 8)).astype(np.float32)
IMAGE /= np.linalg.norm(IMAGE, axis=1, keepdims=True)
TEXT /= np.linalg.norm(TEXT, axis=1, keepdims=True)


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def test_sigmoid_head_initialises_t_10_and_b_minus_10():
    head = ContrastiveLogits("sigmoid")
    assert float(numpy(head.log_scale)) == pytest.approx(math.log(10.0))
    assert float(numpy(head.scale)) == pytest.approx(10.0)
    assert float(numpy(head.bias)) == pytest.approx(-10.0)
    assert len(head.trainable_weights) == 2
    np.testing.assert_allclose(numpy(head(IMAGE, TEXT)), 10.0 * IMAGE @ TEXT.T - 10.0, rtol=1e-5, atol=1e-5)
    # The variables plug straight into the loss.
    assert float(sigmoid_loss(IMAGE[:5], TEXT[:5], head.log_scale, head.bias)) > 0


def test_softmax_head_initialises_temperature_0_07_and_clips_scale_at_100():
    head = ContrastiveLogits("softmax")
    assert head.bias is None and len(head.trainable_weights) == 1
    assert float(numpy(head.temperature)) == pytest.approx(0.07)
    np.testing.assert_allclose(numpy(head(IMAGE, TEXT)), IMAGE @ TEXT.T / 0.07, rtol=1e-5, atol=1e-4)
    head.log_scale.assign(math.log(500.0))
    assert float(numpy(head.scale)) == pytest.approx(100.0)
    assert float(softmax_contrastive_loss(IMAGE[:5], TEXT[:5], head.log_scale)) == pytest.approx(
        float(softmax_contrastive_loss(IMAGE[:5], TEXT[:5], math.log(100.0))), abs=1e-6)


def test_configurable_initial_values_and_probabilities():
    head = ContrastiveLogits("sigmoid", log_scale_init=0.0, bias_init=0.0, max_scale=5.0)
    assert float(numpy(head.scale)) == pytest.approx(1.0) and float(numpy(head.bias)) == 0.0
    logits = head(IMAGE, TEXT)
    np.testing.assert_allclose(numpy(head.probabilities(logits)), 1 / (1 + np.exp(-(IMAGE @ TEXT.T))),
                               rtol=1e-5)
    softmax = ContrastiveLogits("softmax")
    probabilities = numpy(softmax.probabilities(softmax(IMAGE, TEXT)))
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="loss_type"):
        ContrastiveLogits("hinge")
    with pytest.raises(ValueError, match="no bias"):
        ContrastiveLogits("softmax", bias_init=-10.0)


def test_logits_are_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        head = ContrastiveLogits("sigmoid")
        logits = head(keras.ops.cast(IMAGE, "bfloat16"), keras.ops.cast(TEXT, "bfloat16"))
        assert keras.backend.standardize_dtype(logits.dtype) == "float32"
        assert keras.backend.standardize_dtype(head.log_scale.dtype) == "float32"
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("loss_type", ["sigmoid", "softmax"])
def test_serialization_round_trip(loss_type, tmp_path):
    head = ContrastiveLogits(loss_type, log_scale_init=1.5, name="head")
    head.log_scale.assign(2.25)  # a trained value, not the init
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))
    assert restored.get_config() == head.get_config()
    assert ContrastiveLogits.from_config(head.get_config()).get_config() == head.get_config()

    image_in = keras.Input((8,))
    text_in = keras.Input((8,))
    model = keras.Model([image_in, text_in], head(image_in, text_in))
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    reloaded_head = reloaded.get_layer("head")
    assert isinstance(reloaded_head, ContrastiveLogits)
    assert float(numpy(reloaded_head.log_scale)) == 2.25
    np.testing.assert_allclose(numpy(reloaded([IMAGE, TEXT])), numpy(model([IMAGE, TEXT])), rtol=1e-6)
