import keras
import numpy as np
import pytest

from keras_mm.layers.transformer_block import TransformerBlock
from keras_mm.losses import moe_auxiliary as aux
from keras_mm.moe.moe_block import MoeTransformerBlock, moe_layer_indices
from tests.keras_mm.layers import numpy_reference as nref
from tests.keras_mm.moe import numpy_moe as ref
from tests.keras_mm.moe.loss_gradients import loss_and_gradients
from tests.keras_mm.serialization import assert_serialization_round_trip

RNG = np.random.default_rng(0)


def _x(*shape):
    return RNG.normal(size=shape).astype("float32")


def _np(tree):
    return keras.tree.map_structure(keras.ops.convert_to_numpy, tree)


def test_moe_layer_indices():
    assert moe_layer_indices(12, every=2) == [1, 3, 5, 7, 9, 11]
    assert moe_layer_indices(6, every=3) == [2, 5]
    assert moe_layer_indices(4, every=1) == [0, 1, 2, 3]
    assert moe_layer_indices(12, last=4) == [8, 9, 10, 11]
    assert moe_layer_indices(3, last=0) == []
    for kwargs in ({}, {"every": 2, "last": 2}, {"every": 0}, {"last": 5}):
        with pytest.raises(ValueError):
            moe_layer_indices(4, **kwargs)


@pytest.mark.both_backends
@pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1")
def test_one_expert_block_equals_the_dense_block():
    """E = 1, capacity for every token: the gate is exactly 1, so the block is TransformerBlock."""
    x = _x(2, 5, 8)
    keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    dense = TransformerBlock(2, 16)
    moe = MoeTransformerBlock(2, 16, num_experts=1, group_size=5, capacity_factor=1.0)
    dense(x), moe(x)
    for v in dense.weights:
        v.assign(RNG.normal(size=v.shape).astype("float32") * 0.3)
    for name in ("norm1", "attention", "norm2"):
        for target, source in zip(getattr(moe, name).weights, getattr(dense, name).weights):
            target.assign(source)
    moe.moe.experts_kernel_in.assign(dense.mlp.fc1.kernel[None])
    moe.moe.experts_bias_in.assign(dense.mlp.fc1.bias[None])
    moe.moe.experts_kernel_out.assign(dense.mlp.fc2.kernel[None])
    moe.moe.experts_bias_out.assign(dense.mlp.fc2.bias[None])
    for kwargs in ({}, {"attention_mask": keep, "use_causal_mask": True}):
        np.testing.assert_allclose(_np(moe(x, **kwargs)), _np(dense(x, **kwargs)), atol=1e-5)


@pytest.mark.both_backends
@pytest.mark.parametrize("bpr", [False, True])
def test_block_matches_numpy_and_dropped_tokens_pass_through(bpr):
    x = _x(2, 8, 8)
    block = MoeTransformerBlock(2, 16, num_experts=4, group_size=8, capacity_factor=0.5, bpr=bpr)
    block(x)
    for v in block.weights:
        if "bias" in v.path or "beta" in v.path:
            v.assign(RNG.normal(size=v.shape).astype("float32") * 0.1)
    y, routing = _np(block(x, return_routing=True))
    x64 = x.astype(np.float64)
    h = x64 + nref.mha(block.attention, nref.ln_of(block.norm1, x64))
    moe_y, kept, gates = ref.moe_mlp(block.moe, nref.ln_of(block.norm2, h))
    np.testing.assert_allclose(y, h + moe_y, atol=2e-5)
    np.testing.assert_array_equal(routing["kept"], kept.astype("float32"))
    assert (~kept).sum() >= 2 * (8 - 4)                   # C = 1 per expert: >= 4 dropped a group
    np.testing.assert_allclose(y[~kept], h[~kept], atol=2e-5)   # residual only
    np.testing.assert_allclose(routing["gates"], gates, atol=1e-5)
    np.testing.assert_allclose(_np(block(x)), y, atol=1e-6)     # return_routing=False: y alone


def _twins(**kwargs):
    x = _x(2, 6, 8)
    plain = MoeTransformerBlock(2, 16, **kwargs)
    remat = MoeTransformerBlock(2, 16, remat=True, **kwargs)
    plain(x), remat(x)
    for target, source in zip(remat.variables, plain.variables):   # weights and seed states
        target.assign(source)
    return x, plain, remat


@pytest.mark.both_backends
def test_remat_gives_identical_outputs_and_gradients():
    # Training mode with every random op on: the recomputation must reuse the same noise and
    # dropout masks (seeds drawn outside the rematerialised function).
    training = True
    x, plain, remat = _twins(num_experts=4, num_selected=2, group_size=6, capacity_factor=1.0,
                             dropout=0.2, attention_dropout=0.2, drop_path=0.3, noise_std=2.0)

    def loss_fn(outputs):
        y, routing = outputs
        weights = keras.ops.cos(keras.ops.arange(y.shape[-1], dtype="float32"))
        return (keras.ops.sum(keras.ops.square(y) * weights)
                + aux.importance_loss(routing["gates"])
                + aux.load_loss(routing["logits"], routing["noisy_logits"], 0.5, 2))

    loss_plain, g_plain = loss_and_gradients(plain, x, loss_fn, training=training)
    loss_remat, g_remat = loss_and_gradients(remat, x, loss_fn, training=training)
    np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-5)
    assert len(g_plain) == len(g_remat) == len(plain.trainable_variables)
    for v, a, b in zip(plain.trainable_variables, g_remat, g_plain):
        assert np.isfinite(a).all(), v.path
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=v.path)
    router = [g for v, g in zip(plain.trainable_variables, g_plain) if "router" in v.path][0]
    assert np.abs(router).max() > 1e-6


@pytest.mark.both_backends
def test_token_mask_reaches_the_moe():
    x = _x(2, 8, 8)
    mask = np.ones((2, 8), "float32")
    mask[1, 5:] = 0.0
    block = MoeTransformerBlock(2, 16, num_experts=4, group_size=8, capacity_factor=4.0)
    _, routing = _np(block(x, token_mask=mask, attention_mask=mask > 0, return_routing=True))
    np.testing.assert_array_equal(routing["kept"], mask)


def test_mixed_precision(mixed_bfloat16):
    x = _x(2, 6, 8)
    block = MoeTransformerBlock(2, 16, num_experts=4, group_size=6)
    y, routing = block(x, return_routing=True)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(routing["gates"].dtype) == "float32"


@pytest.mark.both_backends
@pytest.mark.parametrize("return_routing", [False, True])
def test_round_trip(return_routing):
    block = MoeTransformerBlock(2, 16, num_experts=4, num_selected=2, capacity_factor=1.5,
                                eval_capacity_factor=2.0, group_size=4, bpr=False,
                                noise_std=1.0, dropout=0.1, drop_path=0.1, qk_norm=True,
                                remat=True, use_qkv_bias=False, attention_impl="dot_product",
                                activation="gelu", layer_norm_epsilon=1e-5)
    assert_serialization_round_trip(block, _x(2, 4, 8),
                                    {"use_causal_mask": True, "return_routing": return_routing})
