"""ViT-22B's parallel block against the NumPy formula y = x + attn(N(x)) + mlp(N(x)) (one norm
N, RMSNorm without centring or bias, QK norm, no QKV bias); the encoder option block="parallel"."""

import keras
import numpy as np
import pytest

from keras_mm.layers.parallel_transformer_block import ParallelTransformerBlock
from keras_mm.layers.transformer_block import TransformerBlock
from keras_mm.layers.transformer_encoder import TransformerEncoder
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.layers.gradients import outputs_and_gradients
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)


def _x(*shape):
    return RNG.normal(size=shape).astype("float32")


def _randomise(layer):
    """Non-trivial norm scales and biases (the defaults are ones / ~zeros)."""
    for v in layer.weights:
        if any(k in v.path for k in ("bias", "beta", "scale", "gamma")):
            base = 1.0 if ("scale" in v.path or "gamma" in v.path) else 0.0
            v.assign(base + 0.2 * RNG.normal(size=v.shape).astype("float32"))


def _numpy_parallel(x, norm_scale, attention, mlp, eps=1e-6, mask=None, causal=False):
    """The ViT-22B formula written out: RMSNorm without centring -> both branches -> sum."""
    h = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * norm_scale
    return x + ref.mha(attention, h, mask=mask, causal=causal) + ref.mlp(mlp, h)


def test_parallel_block_matches_numpy():
    x = _x(2, 5, 8) + 0.5                   # a non-zero mean: centring would change the result
    layer = ParallelTransformerBlock(2, 16)
    layer(x)
    _randomise(layer)
    keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    x64 = x.astype(np.float64)
    expected = _numpy_parallel(x64, ref.w(layer.norm.scale), layer.attention, layer.mlp)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, atol=2e-5)
    np.testing.assert_allclose(np.asarray(layer(x, attention_mask=keep, use_causal_mask=True)),
                               _numpy_parallel(x64, ref.w(layer.norm.scale), layer.attention,
                                               layer.mlp, mask=keep, causal=True), atol=2e-5)
    np.testing.assert_allclose(np.asarray(layer(x)), ref.parallel_block(layer, x64), atol=2e-5)
    # RMS, not LayerNorm: centring + LN would give something else
    ln = ref.layer_norm(x64, ref.w(layer.norm.scale), 0.0)
    other = x64 + ref.mha(layer.attention, ln) + ref.mlp(layer.mlp, ln)
    assert np.abs(other - expected).max() > 1e-2


def test_qk_norms_are_rms_and_optional():
    x = _x(2, 4, 8)
    layer = ParallelTransformerBlock(2, 16)
    layer(x)
    _randomise(layer)
    attention = layer.attention
    wq = ref.w(attention.qkv_kernel)
    h = ref.rms_norm(x.astype(np.float64), ref.w(layer.norm.scale))
    q = np.einsum("bnd,dhk->bnhk", h, wq[:, 0])
    q_scale = ref.w(attention.query_norm.scale)
    np.testing.assert_allclose(q_scale.shape, (4,))
    expected_q = q / np.sqrt((q ** 2).mean(-1, keepdims=True) + 1e-6) * q_scale
    # the block's q after the norm, computed by the layer's own sublayers
    q_keras = np.asarray(attention.query_norm(keras.ops.convert_to_tensor(q.astype("float32"))))
    np.testing.assert_allclose(q_keras, expected_q, atol=1e-5)
    plain = ParallelTransformerBlock(2, 16, qk_norm=False)
    plain(x)
    assert not any("query_norm" in v.path for v in plain.weights)


def test_no_bias_in_qkv_and_norms_mlp_biases_kept():
    layer = ParallelTransformerBlock(3, 24)
    layer(_x(1, 3, 12))
    names = sorted(v.path.split("/", 1)[1] for v in layer.weights)
    assert names == sorted([
        "norm/scale",
        "attention/qkv_kernel", "attention/output_kernel", "attention/output_bias",
        "attention/query_norm/scale", "attention/key_norm/scale",
        "mlp/fc1/kernel", "mlp/fc1/bias", "mlp/fc2/kernel", "mlp/fc2/bias"])
    # one norm for both branches; the pre-LN block has two LayerNorms with gamma and beta
    pre_ln = TransformerBlock(3, 24)
    pre_ln(_x(1, 3, 12))
    assert sum("beta" in v.path for v in pre_ln.weights) == 2
    separate = ParallelTransformerBlock(3, 24, fused_qkv=False)
    separate(_x(1, 3, 12))
    assert not any("bias" in v.path for v in separate.weights if "attention/" in v.path
                   and "output" not in v.path)


def test_layer_norm_variant():
    x = _x(2, 4, 8) + 0.3
    layer = ParallelTransformerBlock(2, 16, norm="layer", qk_norm=True, use_qkv_bias=True)
    layer(x)
    _randomise(layer)
    assert hasattr(layer.norm, "beta") and hasattr(layer.attention.query_norm, "beta")
    x64 = x.astype(np.float64)
    h = ref.ln_of(layer.norm, x64)
    expected = x64 + ref.mha(layer.attention, h) + ref.mlp(layer.mlp, h)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, atol=2e-5)
    with pytest.raises(ValueError, match="norm"):
        ParallelTransformerBlock(2, 16, norm="batch")


@pytest.mark.parametrize("kwargs", [dict(), dict(dropout=0.2, attention_dropout=0.2,
                                                  drop_path=0.3, fused_qkv=False)])
def test_remat_gives_identical_outputs_and_gradients(kwargs):
    x = _x(3, 6, 12)
    plain = ParallelTransformerBlock(3, 24, **kwargs)
    remat = ParallelTransformerBlock(3, 24, remat=True, **kwargs)
    plain(x), remat(x)
    for target, source in zip(remat.variables, plain.variables):   # weights and seed states
        target.assign(source)
    training = bool(kwargs)
    y_plain, g_plain = outputs_and_gradients(plain, x, training=training)
    y_remat, g_remat = outputs_and_gradients(remat, x, training=training)
    np.testing.assert_allclose(y_remat, y_plain, atol=1e-6, rtol=1e-6)
    assert len(g_remat) == len(g_plain) == 1 + len(plain.trainable_variables)
    for a, b in zip(g_remat, g_plain):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    if training:
        y_eval, _ = outputs_and_gradients(plain, x, training=False)
        assert np.abs(y_eval - y_plain).max() > 1e-3


def test_drop_path_drops_the_whole_update():
    x = _x(64, 3, 8)
    layer = ParallelTransformerBlock(2, 8, drop_path=0.5)
    y = np.asarray(layer(x, training=True))
    unchanged = np.all(np.isclose(y, x, atol=1e-6), axis=(1, 2))
    assert 0 < unchanged.sum() < 64


def test_round_trip():
    layer = ParallelTransformerBlock(2, 16, dropout=0.1, drop_path=0.1, remat=True,
                                     attention_impl="dot_product", activation="gelu",
                                     layer_norm_epsilon=1e-5)
    assert layer.get_config()["norm"] == "rms"
    assert_serialization_round_trip(layer, _x(2, 4, 8), {"use_causal_mask": True})


def test_encoder_option():
    x = _x(2, 5, 8) + 0.2
    enc = TransformerEncoder(2, 2, 16, block="parallel", qk_norm=True, use_qkv_bias=False)
    enc(x)
    _randomise(enc)
    assert all(isinstance(b, ParallelTransformerBlock) for b in enc.blocks)
    assert [v.path.split("/")[-1] for v in enc.norm.weights] == ["scale"]   # final norm: RMS
    x64 = x.astype(np.float64)
    h = x64
    for block in enc.blocks:
        h = _numpy_parallel(h, ref.w(block.norm.scale), block.attention, block.mlp)
    expected = ref.rms_norm(h, ref.w(enc.norm.scale))
    np.testing.assert_allclose(np.asarray(enc(x)), expected, atol=5e-5)
    config = enc.get_config()
    assert config["block"] == "parallel"
    assert "block" not in TransformerEncoder(2, 2, 16).get_config()       # default unchanged
    keep = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    assert_serialization_round_trip(enc, x, {"attention_mask": keep})
    with pytest.raises(ValueError, match="block"):
        TransformerEncoder(2, 2, 16, block="sandwich")
