import keras
import numpy as np
import pytest

from keras_mm.layers.attention import MultiHeadAttention, attention_mask
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)


def _x(*shape):
    return RNG.normal(size=shape).astype("float32")


def _randomise_biases(layer):
    for v in layer.weights:
        if "bias" in v.path or "beta" in v.path or "gamma" in v.path:
            v.assign(RNG.normal(size=v.shape).astype("float32"))


@pytest.mark.parametrize("impl", ["auto", "einsum", "dot_product"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm,qkv_bias", [(False, True), (True, False)])
def test_self_attention_matches_numpy(impl, fused, qk_norm, qkv_bias):
    x = _x(2, 5, 12)
    layer = MultiHeadAttention(3, fused_qkv=fused, qk_norm=qk_norm, use_qkv_bias=qkv_bias,
                               attention_impl=impl)
    layer(x)
    _randomise_biases(layer)
    if not qkv_bias:
        assert not any("query_bias" in v.path or "qkv_bias" in v.path for v in layer.weights)
    np.testing.assert_allclose(np.asarray(layer(x)), ref.mha(layer, x.astype(np.float64)),
                               atol=2e-5)


@pytest.mark.parametrize("impl", ["auto", "einsum", "dot_product"])
@pytest.mark.parametrize("fused", [True, False])
def test_cross_attention_and_masks_match_numpy(impl, fused):
    q, kv = _x(2, 3, 8), _x(2, 6, 10)
    layer = MultiHeadAttention(2, head_dim=5, output_dim=7, fused_qkv=fused, attention_impl=impl)
    keep = np.array([[1, 1, 1, 0, 0, 1], [1, 0, 1, 1, 1, 1]], bool)
    out = layer(q, kv, attention_mask=keep)
    assert out.shape == (2, 3, 7)
    _randomise_biases(layer)
    np.testing.assert_allclose(np.asarray(layer(q, kv, attention_mask=keep)),
                               ref.mha(layer, q.astype(np.float64), kv.astype(np.float64),
                                       mask=keep), atol=2e-5)
    x = _x(2, 6, 10)
    self_layer = MultiHeadAttention(2, attention_impl=impl, fused_qkv=fused)
    mask3 = RNG.random((2, 6, 6)) > 0.3
    mask3[:, :, 0] = True
    np.testing.assert_allclose(
        np.asarray(self_layer(x, attention_mask=mask3, use_causal_mask=True)),
        ref.mha(self_layer, x.astype(np.float64), mask=mask3[:, None], causal=True), atol=2e-5)


@pytest.mark.parametrize("impl", ["auto", "einsum", "dot_product"])
def test_causal_mask_blocks_the_future(impl):
    layer = MultiHeadAttention(2, attention_impl=impl)
    x = _x(1, 6, 8)
    y = np.asarray(layer(x, use_causal_mask=True))
    x2 = x.copy()
    x2[:, 4:] = _x(1, 2, 8) * 10
    y2 = np.asarray(layer(x2, use_causal_mask=True))
    np.testing.assert_allclose(y2[:, :4], y[:, :4], atol=1e-6)     # the past does not move
    assert np.abs(y2[:, 4:] - y[:, 4:]).max() > 1e-2               # the changed tokens do


@pytest.mark.parametrize("impl", ["auto", "einsum", "dot_product"])
def test_padding_mask_makes_outputs_independent_of_pad_content(impl):
    layer = MultiHeadAttention(2, attention_impl=impl)
    x = _x(2, 6, 8)
    keep = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    y = np.asarray(layer(x, attention_mask=keep))
    x2 = np.where(keep[:, :, None], x, _x(2, 6, 8) * 100)
    y2 = np.asarray(layer(x2, attention_mask=keep))
    np.testing.assert_allclose(y2[keep], y[keep], atol=1e-5)
    # A fully masked row stays finite (uniform attention) instead of NaN.
    assert np.isfinite(np.asarray(layer(x, attention_mask=np.zeros((2, 6), bool)))).all()


def test_attention_mask_helper_shapes():
    m = np.asarray(attention_mask(np.array([[1, 0, 1]]), causal=True, query_length=3,
                                  key_length=3))
    assert m.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(m[0, 0], [[1, 0, 0], [1, 0, 0], [1, 0, 1]])
    assert attention_mask(None) is None
    with pytest.raises(ValueError):
        attention_mask(np.ones((1, 1, 1, 1, 1)))


def test_mixed_precision_is_close_to_float32(mixed_bfloat16, monkeypatch):
    softmax_dtypes = []
    real_softmax = keras.ops.softmax

    def spy(x, *args, **kwargs):
        softmax_dtypes.append(keras.backend.standardize_dtype(x.dtype))
        return real_softmax(x, *args, **kwargs)

    monkeypatch.setattr(keras.ops, "softmax", spy)
    x = _x(2, 7, 16)
    layer = MultiHeadAttention(4, qk_norm=True, attention_impl="einsum")
    y = layer(x)
    assert softmax_dtypes and set(softmax_dtypes) == {"float32"}
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert layer.qkv_kernel.dtype == "float32"
    expected = ref.mha(layer, x.astype(np.float64))
    np.testing.assert_allclose(np.asarray(keras.ops.cast(y, "float32")), expected, atol=0.1)


def test_dropout_only_in_training():
    layer = MultiHeadAttention(2, dropout=0.5)
    x = _x(2, 4, 8)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(layer(x, training=False)))
    assert np.abs(np.asarray(layer(x, training=True)) - np.asarray(layer(x))).max() > 1e-4


def test_bad_arguments():
    with pytest.raises(ValueError, match="attention_impl"):
        MultiHeadAttention(2, attention_impl="flash")
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(5)(_x(1, 2, 8))


@pytest.mark.parametrize("kwargs", [dict(), dict(fused_qkv=False, qk_norm=True, use_qkv_bias=False,
                                                 attention_impl="dot_product")])
def test_round_trip_self(kwargs):
    layer = MultiHeadAttention(2, **kwargs)
    assert_serialization_round_trip(layer, _x(2, 4, 8), {"use_causal_mask": True})


def test_round_trip_cross_with_mask():
    layer = MultiHeadAttention(2, head_dim=3, output_dim=5)
    assert_serialization_round_trip(layer, (_x(2, 3, 8), _x(2, 4, 6)),
                                    {"attention_mask": np.array([[1, 1, 0, 1], [1, 0, 0, 0]],
                                                                bool)})


def test_auto_impl_resolves_by_backend_and_device():
    from keras_mm.layers import attention as att

    q = np.zeros((2, 5, 3, 4), "float32")
    assert att._use_dot_product("dot_product", q) and not att._use_dot_product("einsum", q)
    # no accelerator on the test machines: "auto" is the einsum form there
    assert not att._use_dot_product("auto", q)
    assert att._accelerated_jax("tensorflow") is False
    with pytest.raises(ValueError, match="attention_impl"):
        MultiHeadAttention(2, attention_impl="flash")


@pytest.mark.parametrize("n,s,masking", [
    (n, s, masking) for n, s in [(5, 5), (5, 7), (4, 7), (5, 6)]
    for masking in ("none", "padding", "causal", "causal_and_padding")
    if n == s or not masking.startswith("causal")])   # a causal mask is for self-attention
def test_even_padding_for_fused_attention_changes_nothing(n, s, masking):
    """cuDNN trains only on even token counts, so on a JAX GPU ``fused_attention`` pads odd
    ones (one dropped query, one masked zero key): the output equals the unpadded attention's
    and a NumPy softmax(q k^T * scale + mask) v, with or without padding / causal masks."""
    from keras_mm.layers.attention import fused_attention

    causal = masking.startswith("causal")
    q, k, v = _x(2, n, 3, 4), _x(2, s, 3, 4), _x(2, s, 3, 4)
    keep = np.ones((2, s), bool)
    if masking.endswith("padding"):
        keep[0, -2:] = False
        mask = attention_mask(keep, causal, n, s)
    else:
        mask = None                            # causal: is_causal, as MultiHeadAttention calls
    allowed = keep[:, None, None, :] & (np.tril(np.ones((n, s), bool)) if causal else True)
    logits = np.einsum("bqhd,bshd->bhqs", q, k) * 0.5 + np.where(allowed, 0.0, -1e9)
    expected = np.einsum("bhqs,bshd->bqhd", ref.softmax(logits), v)
    for pad in (True, False):
        out = fused_attention(q, k, v, mask, 0.5, is_causal=causal and mask is None,
                              pad_to_even=pad)
        assert tuple(out.shape) == (2, n, 3, 4)
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_fused_attention_hands_cudnn_full_shape_masks(monkeypatch):
    """cuDNN takes only a ``[b, ., q, kv]`` mask: on a JAX GPU (``pad_to_even``) a key-padding
    mask ``[b, 1, 1, s]`` reaches ``ops.dot_product_attention`` broadcast to ``[b, 1, n, s]``,
    also when no count is odd; elsewhere it passes as it is."""
    from keras_mm.layers import attention as att

    seen = []
    real = att.ops.dot_product_attention

    def spy(q, k, v, mask=None, **kwargs):
        seen.append(None if mask is None else tuple(mask.shape))
        return real(q, k, v, mask=mask, **kwargs)

    monkeypatch.setattr(att.ops, "dot_product_attention", spy)
    q, k, v = _x(2, 4, 3, 4), _x(2, 6, 3, 4), _x(2, 6, 3, 4)
    keep = np.ones((2, 6), bool)
    keep[0, -2:] = False
    mask = attention_mask(keep, False, 4, 6)
    assert tuple(mask.shape) == (2, 1, 1, 6)
    att.fused_attention(q, k, v, mask, 0.5, pad_to_even=True)
    att.fused_attention(q, k, v, mask, 0.5, pad_to_even=False)
    assert seen == [(2, 1, 4, 6), (2, 1, 1, 6)]
