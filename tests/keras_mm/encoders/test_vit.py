import keras
import numpy as np
import pytest

from keras_mm.encoders.vit import ViTEncoder
from keras_mm.layers.sincos_position_embedding import SinCos2DPositionEmbedding
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.layers.gradients import outputs_and_gradients
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)
SMALL = dict(image_size=16, patch_size=4, width=16, depth=2, heads=2, mlp_dim=32)


def _images(n=2, size=16):
    return RNG.normal(size=(n, size, size, 3)).astype("float32")


def _numpy_vit(model, images):
    """The whole ViT forward pass from the formulas (float64)."""
    p = model.patch_size[0]
    kernel = ref.w(model.patch_embedding.kernel).reshape(-1, model.width)
    x = ref.patchify(images.astype(np.float64), p) @ kernel + ref.w(model.patch_embedding.bias)
    gh, gw = images.shape[1] // p, images.shape[2] // p
    if model.pos_embedding == "learned":
        x = x + ref.w(model.position_embedding.embeddings).reshape(gh * gw, -1)
    else:
        x = x + ref.sincos2d(gh, gw, model.width)
    if model.pool == "cls":
        cls = np.broadcast_to(ref.w(model.cls_token), (x.shape[0], 1, model.width))
        x = np.concatenate([cls, x], axis=1)
    tokens = ref.encoder(model.encoder, x)
    if model.pool == "cls":
        pooled = tokens[:, 0]
    elif model.pool == "gap":
        pooled = tokens.mean(1)
    else:
        pooled = ref.map_head(model.map_head, tokens)
    if model.head is not None:
        pooled = ref.dense(model.head.projection, pooled)
    return pooled, tokens


@pytest.mark.parametrize("pool,pos,head", [("cls", "learned", 8), ("gap", "sincos2d", None),
                                           ("map", "learned", None)])
def test_forward_matches_numpy(pool, pos, head):
    model = ViTEncoder(pool=pool, pos_embedding=pos, output_dim=head, **SMALL)
    images = _images()
    emb, tokens = model(images, return_tokens=True)
    n_tokens = 16 + (pool == "cls")
    assert emb.shape == (2, head or 16) and tokens.shape == (2, n_tokens, 16)
    assert keras.backend.standardize_dtype(emb.dtype) == "float32"
    for v in model.weights:                      # non-trivial cls token / biases
        if "cls_token" in v.path or "bias" in v.path:
            v.assign(RNG.normal(size=v.shape).astype("float32") * 0.1)
    expected_emb, expected_tokens = _numpy_vit(model, images)
    emb, tokens = model(images, return_tokens=True)
    np.testing.assert_allclose(np.asarray(tokens), expected_tokens, atol=1e-4)
    np.testing.assert_allclose(np.asarray(emb), expected_emb, atol=1e-4)


@pytest.mark.parametrize("pool,pos", [("cls", "learned"), ("gap", "sincos2d"), ("map", "learned")])
def test_round_trip(pool, pos):
    model = ViTEncoder(pool=pool, pos_embedding=pos, output_dim=8, head_hidden_dim=12,
                       qk_norm=True, dropout=0.1, drop_path=0.1, remat=True, **SMALL)
    assert_serialization_round_trip(model, _images())


def test_other_image_sizes():
    learned = ViTEncoder(**SMALL)
    learned(_images())
    assert learned(_images(size=24)).shape == (2, 16)          # table resized 4x4 -> 6x6
    sincos = ViTEncoder(pos_embedding="sincos2d", **SMALL)
    _, tokens = sincos(_images(size=8), return_tokens=True)
    assert tokens.shape == (2, 1 + 4, 16)
    assert not any("position" in v.path for v in sincos.weights)
    assert isinstance(sincos.position_embedding, SinCos2DPositionEmbedding)


def test_remat_identical_outputs_and_gradients():
    plain = ViTEncoder(pool="map", **SMALL)
    remat = ViTEncoder(pool="map", remat=True, **SMALL)
    images = _images()
    plain(images), remat(images)
    remat.set_weights(plain.get_weights())
    y_plain, g_plain = outputs_and_gradients(plain, images, training=True)
    y_remat, g_remat = outputs_and_gradients(remat, images, training=True)
    np.testing.assert_allclose(y_remat, y_plain, atol=1e-6, rtol=1e-6)
    assert len(g_plain) == len(g_remat) == 1 + len(plain.trainable_variables)
    for a, b in zip(g_remat, g_plain):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_mixed_precision(mixed_bfloat16):
    model = ViTEncoder(pool="map", output_dim=8, **SMALL)
    emb, tokens = model(_images(), return_tokens=True)
    assert keras.backend.standardize_dtype(emb.dtype) == "float32"
    assert keras.backend.standardize_dtype(tokens.dtype) == "bfloat16"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert np.isfinite(np.asarray(emb)).all()


def test_bad_options():
    with pytest.raises(ValueError, match="pool"):
        ViTEncoder(pool="max", **SMALL)
    with pytest.raises(ValueError, match="pos_embedding"):
        ViTEncoder(pos_embedding="rope", **SMALL)
