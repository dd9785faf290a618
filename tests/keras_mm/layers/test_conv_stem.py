import keras
import numpy as np
import pytest

from keras_mm.encoders.vit import ViTEncoder
from keras_mm.layers.conv_stem import ConvStem
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)


def _conv3x3_s2_same(x, kernel, bias):
    """NumPy stride-2 3x3 convolution with "same" padding of an even side: output side =
    side / 2, padding 0 before and 1 after (TensorFlow's and XLA's SAME)."""
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    out = np.zeros((b, h // 2, w // 2, kernel.shape[-1]))
    for i in range(h // 2):
        for j in range(w // 2):
            patch = xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]               # [b, 3, 3, c]
            out[:, i, j] = np.einsum("bhwc,hwcd->bd", patch, kernel)
    return out + bias


def _conv3x3_s1_same(x, kernel, bias):
    """NumPy stride-1 3x3 convolution with "same" padding (1 on every side)."""
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for i in range(h):
        for j in range(w):
            out[:, i, j] = np.einsum("bhwc,hwcd->bd", xp[:, i:i + 3, j:j + 3, :], kernel)
    return out + bias


def _max_pool2x2(x):
    b, h, w, c = x.shape
    out = np.full((b, h // 2, w // 2, c), -np.inf)
    for di in range(2):
        for dj in range(2):
            out = np.maximum(out, x[:, di::2, dj::2, :][:, :h // 2, :w // 2])
    return out


def _layer_norm(x, gamma, beta, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _randomise(layer):
    for v in layer.weights:
        v.assign(RNG.normal(size=v.shape).astype("float32") * 0.5)


@pytest.mark.parametrize("downsample", ["stride", "max_pool"])
@pytest.mark.parametrize("patch,width,size", [(4, 16, (16, 16)), (8, 24, (16, 24)),
                                              (4, 12, (18, 13))])       # last: cropped
def test_equals_numpy_reference(patch, width, size, downsample):
    images = RNG.normal(size=(2, *size, 3)).astype("float32")
    layer = ConvStem(patch, width, downsample=downsample)
    layer.build(images.shape)
    _randomise(layer)
    out = np.asarray(layer(images))
    gh, gw = size[0] // patch, size[1] // patch
    assert out.shape == (2, gh * gw, width)

    x = images[:, :gh * patch, :gw * patch].astype(np.float64)
    for kernel, bias, norm in zip(layer.kernels, layer.biases, layer.norms):
        if downsample == "stride":
            x = _conv3x3_s2_same(x, ref.w(kernel), ref.w(bias))
            x = np.maximum(_layer_norm(x, ref.w(norm.gamma), ref.w(norm.beta)), 0.0)
        else:
            x = _conv3x3_s1_same(x, ref.w(kernel), ref.w(bias))
            x = _max_pool2x2(np.maximum(_layer_norm(x, ref.w(norm.gamma), ref.w(norm.beta)),
                                        0.0))
    x = x @ ref.w(layer.out_kernel) + ref.w(layer.out_bias)
    np.testing.assert_allclose(out, x.reshape(2, gh * gw, width), rtol=1e-4, atol=1e-4)


def test_channels_receptive_field_and_token_order():
    layer = ConvStem(8, 64)
    assert layer.channels == [8, 16, 32] and layer.stages == 3
    images = np.zeros((1, 32, 32, 3), "float32")
    base = np.asarray(layer(images))
    poked = images.copy()
    poked[0, 20, 5, :] = 1.0               # pixel (20, 5): patch (2, 0) of the 4x4 grid
    changed = np.abs(np.asarray(layer(poked)) - base).max(-1)[0].reshape(4, 4) > 1e-6
    assert changed[2, 0]
    # receptive field 15 px reaching back (pixels 2i*8 - 7 .. 8i + 7 for padding after only)
    assert not changed[0].any() and not changed[:, 2:].any()


def test_max_pool_stem_channels_and_receptive_field():
    layer = ConvStem(8, 192, downsample="max_pool")
    assert layer.channels == [32, 64, 128] and layer.stages == 3
    layer = ConvStem(4, 24, downsample="max_pool")          # 2 stages: 8, 16 channels
    assert layer.channels == [8, 16]
    images = np.zeros((1, 16, 16, 3), "float32")
    base = np.asarray(layer(images))
    poked = images.copy()
    poked[0, 9, 2, :] = 1.0                # pixel (9, 2): patch (2, 0) of the 4x4 grid
    changed = np.abs(np.asarray(layer(poked)) - base).max(-1)[0].reshape(4, 4) > 1e-6
    # receptive field: stage 1 (conv, pool) sees input rows 2q - 1 .. 2q + 2, stage 2 then
    # rows 2r - 3 .. 2r + 4, and its pool, token i, rows 4i - 3 .. 4i + 6 (10 px): row 9 is
    # seen by token rows 1, 2 and 3, column 2 by token columns 0 and 1 only
    assert changed[1:, :2].all()
    assert not changed[0].any() and not changed[:, 2:].any()


def test_bad_patch_sizes_and_round_trip():
    for p in (1, 6, 12):
        with pytest.raises(ValueError, match="power-of-two"):
            ConvStem(p, 8)
    with pytest.raises(ValueError, match="downsample"):
        ConvStem(4, 8, downsample="avg_pool")
    images = RNG.normal(size=(1, 8, 8, 3)).astype("float32")
    assert_serialization_round_trip(ConvStem(4, 12), images)
    assert "downsample" not in ConvStem(4, 12).get_config()
    layer = ConvStem(4, 12, downsample="max_pool")
    assert layer.get_config()["downsample"] == "max_pool"
    assert_serialization_round_trip(layer, images)


@pytest.mark.parametrize("stem,downsample", [("conv", "stride"), ("cnn", "max_pool")])
def test_vit_with_conv_stem_trains_and_round_trips(stem, downsample):
    enc = ViTEncoder(image_size=16, patch_size=4, width=12, depth=1, heads=2, mlp_dim=16,
                     pool="gap", stem=stem)
    images = RNG.normal(size=(2, 16, 16, 3)).astype("float32")
    assert enc(images).shape == (2, 12)
    assert enc.get_config()["stem"] == stem
    assert enc.patch_embedding.downsample == downsample
    assert "stem" not in ViTEncoder(image_size=16, patch_size=4, width=12, depth=1, heads=2,
                                    mlp_dim=16).get_config()
    assert_serialization_round_trip(enc, images)
    with pytest.raises(ValueError, match="stem"):
        ViTEncoder(image_size=16, patch_size=4, width=12, depth=1, heads=2, mlp_dim=16,
                   stem="convnext")
    # every stem weight gets a gradient through the encoder
    model = keras.Sequential([keras.Input((16, 16, 3)), enc, keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    before = [np.asarray(w).copy() for w in enc.patch_embedding.weights]
    model.fit(images, np.ones((2, 1), "float32"), epochs=1, verbose=0)
    after = [np.asarray(w) for w in enc.patch_embedding.weights]
    assert all(np.abs(a - b).max() > 0 for a, b in zip(after, before))


@pytest.mark.parametrize("downsample", ["stride", "max_pool"])
def test_empty_batch(downsample):
    layer = ConvStem(4, 12, downsample=downsample)
    assert tuple(layer(np.zeros((0, 16, 16, 3), "float32")).shape) == (0, 16, 12)
