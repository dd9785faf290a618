import keras
import numpy as np
import pytest

from keras_mm.losses import moe_auxiliary as aux
from keras_mm.moe.moe_mlp import MoeMlp
from tests.keras_mm.layers.gradients import outputs_and_gradients
from tests.keras_mm.moe import numpy_moe as ref
from tests.keras_mm.moe.loss_gradients import loss_and_gradients
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)


def _x(*shape):
    return RNG.normal(size=shape).astype("float32")


def _np(tree):
    return keras.tree.map_structure(keras.ops.convert_to_numpy, tree)


def _randomise_biases(layer):
    for v in layer.weights:
        if "bias" in v.path:
            v.assign(RNG.normal(size=v.shape).astype("float32") * 0.1)


@pytest.mark.parametrize("k, group_size", [(1, 8), (2, 6), (1, 7)])
def test_matches_numpy_when_nothing_is_dropped(k, group_size):
    x = _x(3, 5, 8)                        # 15 tokens: 2 or 3 groups, the last one padded
    layer = MoeMlp(4, 16, num_selected=k, group_size=group_size, capacity_factor=4.0 / k)
    layer(x)
    _randomise_biases(layer)
    y, routing = _np(layer(x, return_routing=True))
    expected, kept, gates = ref.moe_mlp(layer, x)
    assert kept.all() and routing["kept"].all()
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_allclose(routing["gates"], gates, atol=1e-6)
    np.testing.assert_array_equal(routing["expert_indices"], np.argsort(-gates, -1)[..., :k])
    np.testing.assert_array_equal(routing["expert_index"], gates.argmax(-1))
    assert routing["expert_index"].dtype == np.int32 and routing["kept"].shape == (3, 5)


def _forced_layer(bpr, capacity_factor=1.0, eval_capacity_factor=None):
    """Every token picks expert 0 with gate increasing in its first feature ``a``:
    logits = (a, 0, 0, 0). Groups of 8 tokens (one example each), C = ceil(f * 8 / 4)."""
    layer = MoeMlp(4, 8, group_size=8, capacity_factor=capacity_factor,
                   eval_capacity_factor=eval_capacity_factor, bpr=bpr)
    a = np.stack([RNG.permutation(np.linspace(0.5, 4.0, 8)) for _ in range(2)])  # [2, 8]
    x = RNG.normal(size=(2, 8, 4)).astype("float32")
    x[..., 0] = a
    layer(x)
    kernel = np.zeros((4, 4), "float32")
    kernel[0, 0] = 1.0
    layer.router.kernel.assign(kernel)
    _randomise_biases(layer)
    return layer, x, a


@pytest.mark.parametrize("bpr", [False, True])
def test_capacity_drops_the_last_tokens_or_with_bpr_the_least_confident(bpr):
    layer, x, a = _forced_layer(bpr)
    y, routing = _np(layer(x, return_routing=True))
    assert layer.capacity() == 2
    if bpr:   # the 2 largest gates (largest a) of each example
        expected_kept = a >= np.sort(a, -1)[:, -2:-1]
    else:     # the first 2 positions
        expected_kept = np.zeros((2, 8), bool)
        expected_kept[:, :2] = True
    np.testing.assert_array_equal(routing["kept"], expected_kept.astype("float32"))
    assert (routing["kept"] == 0).sum() == 2 * (8 - 2)
    np.testing.assert_array_equal(routing["expert_index"], 0)
    np.testing.assert_array_equal(y[~expected_kept], 0.0)            # dropped: MoE output 0
    expected, kept, _ = ref.moe_mlp(layer, x)
    np.testing.assert_array_equal(kept, expected_kept)
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_allclose(np.abs(y[expected_kept]).min(axis=-1) > 0, True)


def test_eval_capacity_factor():
    layer, x, _ = _forced_layer(True, capacity_factor=1.0, eval_capacity_factor=2.0)
    assert (layer.capacity(training=True), layer.capacity(training=False)) == (2, 4)
    _, train = _np(layer(x, training=True, return_routing=True))
    _, infer = _np(layer(x, training=False, return_routing=True))
    assert train["kept"].sum() == 2 * 2 and infer["kept"].sum() == 2 * 4


def test_token_mask_frees_capacity_and_zeroes_masked_tokens():
    layer, x, a = _forced_layer(False)
    mask = np.ones((2, 8), "float32")
    mask[:, :3] = 0.0                      # padding in front: the next 2 tokens get the slots
    y, routing = _np(layer(x, token_mask=mask, return_routing=True))
    expected_kept = np.zeros((2, 8), bool)
    expected_kept[:, 3:5] = True
    np.testing.assert_array_equal(routing["kept"], expected_kept.astype("float32"))
    np.testing.assert_array_equal(y[:, :3], 0.0)
    expected, _, _ = ref.moe_mlp(layer, x, valid=mask)
    np.testing.assert_allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_gradients_are_finite_and_nonzero(k):
    x = _x(2, 6, 8)
    layer = MoeMlp(4, 16, num_selected=k, group_size=6, capacity_factor=2.0)
    layer(x)
    y, grads = outputs_and_gradients(layer, x)
    names = ["x"] + [v.path.split("/")[-1] for v in layer.trainable_variables]
    assert set(names) == {"x", "kernel", "experts_kernel_in", "experts_bias_in",
                          "experts_kernel_out", "experts_bias_out"}
    for name, g in zip(names, grads):
        assert np.isfinite(g).all(), name
        assert np.abs(g).max() > 1e-6, f"zero gradient for {name}"


def test_aux_loss_gradient_reaches_the_router_only():
    x = _x(2, 6, 8)
    layer = MoeMlp(4, 16, group_size=6, capacity_factor=2.0)
    layer(x)

    def loss_fn(outputs):
        _, routing = outputs
        return aux.importance_loss(routing["gates"]) + aux.local_entropy_loss(routing["gates"])

    loss, grads = loss_and_gradients(layer, x, loss_fn)
    by_name = {v.path.split("/")[-1]: g for v, g in zip(layer.trainable_variables, grads)}
    assert np.isfinite(loss) and np.abs(by_name.pop("kernel")).max() > 1e-6
    for name, g in by_name.items():
        np.testing.assert_array_equal(g, 0.0, err_msg=name)


def test_noise_and_dropout_follow_training_and_seed():
    x = _x(2, 6, 8)
    layer = MoeMlp(4, 16, group_size=6, capacity_factor=2.0, noise_std=4.0, dropout=0.5)
    y_eval = _np(layer(x))
    np.testing.assert_array_equal(_np(layer(x, training=False)), y_eval)
    y1, r1 = _np(layer(x, training=True, return_routing=True))
    y2 = _np(layer(x, training=True))
    assert np.abs(y1 - y_eval).max() > 1e-3 and np.abs(y1 - y2).max() > 1e-3
    assert np.abs(r1["noisy_logits"] - r1["logits"]).max() > 1e-3
    seed = keras.ops.convert_to_tensor(np.array([7, 8]), dtype="uint32")
    a, b = (_np(layer(x, training=True, seed=seed)) for _ in range(2))
    np.testing.assert_array_equal(a, b)


def test_mixed_precision(mixed_bfloat16):
    x = _x(2, 6, 8)
    layer = MoeMlp(4, 16, group_size=6, capacity_factor=2.0)
    y, routing = layer(x, return_routing=True)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert layer.experts_kernel_in.dtype == "float32"
    for name in ("gates", "logits", "kept"):
        assert keras.backend.standardize_dtype(routing[name].dtype) == "float32"
    ref_y, _, _ = ref.moe_mlp(layer, x)
    np.testing.assert_allclose(np.asarray(keras.ops.cast(y, "float32")), ref_y, atol=0.1)


def test_expert_weights_are_batched_and_initialised_per_expert():
    layer = MoeMlp(8, 64, group_size=4)
    layer.build((None, None, 32))
    shapes = {v.path.split("/")[-1]: tuple(v.shape) for v in layer.weights}
    assert shapes == {"experts_kernel_in": (8, 32, 64), "experts_bias_in": (8, 64),
                      "experts_kernel_out": (8, 64, 32), "experts_bias_out": (8, 32),
                      "kernel": (32, 8)}
    kernel = np.asarray(layer.experts_kernel_in)
    limit = np.sqrt(6.0 / (32 + 64))       # glorot_uniform of one [32, 64] expert
    assert 0.9 * limit < np.abs(kernel).max() <= limit
    assert not np.allclose(kernel[0], kernel[1])


def test_dynamic_batch_under_tf_function():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("TensorFlow-only: an unknown batch size when traced")
    import tensorflow as tf

    x = _x(3, 5, 8)
    layer = MoeMlp(4, 16, group_size=4, capacity_factor=1.0)
    eager_y, eager_r = _np(layer(x, return_routing=True))
    fn = tf.function(lambda t: layer(t, return_routing=True),
                     input_signature=[tf.TensorSpec([None, None, 8], tf.float32)])
    y, routing = _np(fn(tf.constant(x)))
    np.testing.assert_allclose(y, eager_y, atol=1e-6)
    np.testing.assert_array_equal(routing["kept"], eager_r["kept"])
    assert 0 < eager_r["kept"].sum() < 15


@pytest.mark.parametrize("return_routing", [False, True])
def test_round_trip(return_routing):
    layer = MoeMlp(4, 16, num_selected=2, capacity_factor=1.5, eval_capacity_factor=3.0,
                   group_size=6, bpr=False, noise_std=1.0, activation="gelu", dropout=0.1,
                   router_kernel_initializer="zeros")
    assert_serialization_round_trip(layer, _x(2, 6, 8), {"return_routing": return_routing})
