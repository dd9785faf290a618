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


# -- FlexiViT (Beyer et al. 2023) -----------------------------------------------------------------
FLEXI = dict(image_size=24, patch_size=6, patch_sizes=(4, 6, 8), width=16, depth=1, heads=2,
             mlp_dim=32)


def _numpy_flexi_vit(model, images, p):
    """FlexiViT forward at patch size p: the kernel PI-resized (tf.image.resize's operator +
    NumPy pinv), the learned position table resized with tf.image.resize (bilinear)."""
    kernel = ref.pi_resize_kernel_tf(ref.w(model.patch_embedding.kernel), p)
    x = (ref.patchify(images.astype(np.float64), p) @ kernel.reshape(-1, model.width)
         + ref.w(model.patch_embedding.bias))
    g = images.shape[1] // p
    table = ref.w(model.position_embedding.embeddings)
    if table.shape[:2] != (g, g):
        table = ref.bilinear_resize_tf(table[None], (g, g))[0]
    x = x + table.reshape(g * g, -1)
    tokens = ref.encoder(model.encoder, x)
    return tokens.mean(1), tokens


@pytest.mark.parametrize("p", [4, 6, 8, 12])
def test_flexi_forward_matches_numpy(p):
    model = ViTEncoder(pool="gap", **FLEXI)
    images = _images(size=24)
    model(images)
    assert model.patch_embedding.kernel.shape == (8, 8, 3, 16)          # base = max(sizes)
    assert model.position_embedding.embeddings.shape == (4, 4, 16)      # 24 // 6
    for v in model.weights:
        if "bias" in v.path:
            v.assign(RNG.normal(size=v.shape).astype("float32") * 0.1)
    emb, tokens = model(images, patch_size=p, return_tokens=True)
    assert tokens.shape == (2, (24 // p) ** 2, 16)
    expected_emb, expected_tokens = _numpy_flexi_vit(model, images, p)
    np.testing.assert_allclose(np.asarray(tokens), expected_tokens, atol=1e-4)
    np.testing.assert_allclose(np.asarray(emb), expected_emb, atol=1e-4)
    model.set_patch_size(p)                                  # the attribute form
    np.testing.assert_allclose(np.asarray(model(images)), expected_emb, atol=1e-4)
    model.set_patch_size(None)
    assert model.current_patch_size() == (6, 6)


def test_flexi_config_round_trip_and_fixed_config_unchanged():
    model = ViTEncoder(pool="cls", base_patch_size=5, **FLEXI)
    config = model.get_config()
    assert config["patch_sizes"] == [4, 6, 8] and config["base_patch_size"] == 5
    assert_serialization_round_trip(model, _images(size=24), {"patch_size": 8})
    fixed = ViTEncoder(**SMALL).get_config()
    assert not {"patch_sizes", "base_patch_size", "block"} & set(fixed)


def test_flexi_bad_options():
    with pytest.raises(ValueError, match="must be one of patch_sizes"):
        ViTEncoder(**dict(FLEXI, patch_size=5))
    with pytest.raises(ValueError, match="distinct"):
        ViTEncoder(**dict(FLEXI, patch_sizes=(4, 4, 6)))
    with pytest.raises(ValueError, match="needs patch_sizes"):
        ViTEncoder(base_patch_size=8, **SMALL)
    fixed = ViTEncoder(**SMALL)
    fixed(_images())
    assert fixed(_images(), patch_size=4).shape == (2, 16)        # its own size is fine
    with pytest.raises(ValueError, match="fixed patch size"):
        fixed(_images(), patch_size=8)
    with pytest.raises(ValueError, match="fixed patch size"):
        fixed.set_patch_size(2)


def _flexi_classifier():
    encoder = ViTEncoder(pool="gap", **FLEXI)
    model = keras.Sequential([keras.Input((24, 24, 3)), encoder, keras.layers.Dense(3)])
    # lr 0: the weights stay put, so every step's loss is the loss at the size it ran with
    model.compile(optimizer=keras.optimizers.SGD(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, encoder


def test_fit_callback_runs_each_step_at_the_drawn_patch_size():
    """model.fit with FlexiPatchSizeCallback: the loss of every step (one batch per epoch) is the
    loss computed eagerly at the size drawn for that step; one train function per size; the
    validation runs at the default size. On JAX this fails if a compiled step reuses another
    size's trace (jax.jit caches traces by function and argument shapes)."""
    from keras_mm.encoders.vit import FlexiPatchSizeCallback

    model, encoder = _flexi_classifier()
    images, labels = _images(8, 24), RNG.integers(0, 3, 8).astype("int32")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def eager_loss(p):
        logits = model.layers[1](encoder(images, patch_size=p))
        return float(loss_fn(labels, logits))

    losses = {p: eager_loss(p) for p in (4, 6, 8)}
    assert min(abs(losses[a] - losses[b]) for a, b in ((4, 6), (4, 8), (6, 8))) > 1e-4

    drawn = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            drawn.append(encoder.current_patch_size()[0])

    flexi = FlexiPatchSizeCallback(patch_sizes=(4, 8), seed=3)     # two sizes: fewer compiles
    history = model.fit(images, labels, batch_size=8, epochs=6, shuffle=False, verbose=0,
                        callbacks=[flexi, Record()], validation_data=(images, labels))
    assert len(drawn) == 6 and set(drawn) == {4, 8}
    assert flexi.counts == {p: drawn.count(p) for p in (4, 8)}
    np.testing.assert_allclose(history.history["loss"], [losses[p] for p in drawn], atol=1e-5)
    np.testing.assert_allclose(history.history["val_loss"], [losses[6]] * 6, atol=1e-5)
    assert encoder.active_patch_size is None                     # reset after training
    assert model.train_function is not None


def test_set_model_patch_size_for_evaluate_and_predict():
    from keras_mm.encoders.vit import set_model_patch_size

    model, encoder = _flexi_classifier()
    images, labels = _images(8, 24), RNG.integers(0, 3, 8).astype("int32")
    expected = {p: np.asarray(model.layers[1](encoder(images, patch_size=p))) for p in (4, 8)}
    model.predict(images, verbose=0)                              # traced at the default size
    for p in (4, 8, 4):
        set_model_patch_size(model, p)
        np.testing.assert_allclose(model.predict(images, verbose=0), expected[p], atol=1e-5)
        loss = model.evaluate(images, labels, verbose=0)
        logits = keras.ops.convert_to_tensor(expected[p])
        np.testing.assert_allclose(
            loss, float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
                labels, logits)), atol=1e-5)
    plain = keras.Sequential([keras.Input((16, 16, 3)), ViTEncoder(**SMALL)])
    with pytest.raises(ValueError, match="no ViTEncoder with patch_sizes"):
        set_model_patch_size(plain, 4)


# -- ViT-22B blocks (Dehghani et al. 2023) ---------------------------------------------------------
def test_vit22b_style_matches_numpy_and_round_trips():
    from keras_mm.encoders import presets

    config = presets.vit22b_style(dict(SMALL, pool="gap"))
    assert config == dict(SMALL, pool="gap", block="parallel", qk_norm=True, qkv_bias=False)
    assert presets.vit22b_style(presets.vit_config("b16")) == presets.vit_config(
        "b16", block="parallel", qk_norm=True, qkv_bias=False)
    model = ViTEncoder(**config)
    images = _images()
    model(images)
    for v in model.weights:
        if "bias" in v.path or "scale" in v.path:
            v.assign(RNG.normal(size=v.shape).astype("float32") * 0.1 + ("scale" in v.path))
    assert not any("qkv_bias" in v.path or "beta" in v.path or "gamma" in v.path
                   for v in model.weights)
    expected_emb, expected_tokens = _numpy_vit(model, images)
    emb, tokens = model(images, return_tokens=True)
    np.testing.assert_allclose(np.asarray(tokens), expected_tokens, atol=1e-4)
    np.testing.assert_allclose(np.asarray(emb), expected_emb, atol=1e-4)
    assert model.get_config()["block"] == "parallel"
    assert_serialization_round_trip(ViTEncoder(**dict(config, remat=True, pool="map")), images)
