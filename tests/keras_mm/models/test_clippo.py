"""CLIPPOModel: one ViT for images and rendered text; serialization, training, weight sharing."""

import keras
import numpy as np
import pytest

from keras_mm.encoders.vit import ViTEncoder
from keras_mm.models.clippo import CLIPPOModel, build_clippo
from tests.keras_mm.serialization import assert_serialization_round_trip

VIT = dict(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64, pool="map",
           output_dim=16)


def _small(loss="softmax", **kw):
    keras.utils.set_random_seed(1)
    return CLIPPOModel(ViTEncoder(**VIT), loss=loss, **kw)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, 16, 16, 3)).astype("float32"),
            "text_images": rng.normal(size=(n, 16, 16, 3)).astype("float32")}


@pytest.mark.both_backends
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_serialization_round_trip(loss):
    loaded = assert_serialization_round_trip(_small(loss), _batch())
    assert isinstance(loaded, CLIPPOModel)
    assert loaded.image_encoder is loaded.text_encoder is loaded.encoder


@pytest.mark.both_backends
@pytest.mark.parametrize("loss,scalars", [("softmax", 1), ("sigmoid", 2)])
def test_one_vit_embeds_images_and_text(loss, scalars):
    model = _small(loss)
    x = _batch()
    out = model(x)
    # Weights: exactly one ViT of this config (counted on an independent instance) + t (+ b).
    reference = ViTEncoder(**VIT)
    reference(x["image"])
    assert len(model.trainable_weights) == len(reference.trainable_weights) + scalars
    assert model.count_params() == reference.count_params() + scalars
    assert len({id(w) for w in model.trainable_weights}) == len(model.trainable_weights)
    # The same function embeds both: an image fed as "text" gets the image's embedding.
    swapped = model({"image": x["text_images"], "text_images": x["image"]})
    np.testing.assert_allclose(keras.ops.convert_to_numpy(swapped["text_emb"]),
                               keras.ops.convert_to_numpy(out["image_emb"]), atol=1e-5)
    for key in ("image_emb", "text_emb"):
        assert out[key].shape == (8, 16)
        np.testing.assert_allclose(np.linalg.norm(keras.ops.convert_to_numpy(out[key]), axis=-1),
                                   1.0, atol=1e-5)
    with pytest.raises(KeyError, match="text_images"):
        model({"image": x["image"], "text": x["image"]})


@pytest.mark.both_backends
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_fit_reduces_the_loss_and_learns_the_pairs(loss):
    import tensorflow as tf

    model = _small(loss)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.encoder.trainable_weights]
    ds = tf.data.Dataset.from_tensors(_batch()).repeat(60)
    history = model.fit(ds, epochs=1, verbose=0).history
    assert set(history) >= {"loss", "pair_accuracy", "t"}
    assert ("b" in history) == (loss == "sigmoid")
    after = [keras.ops.convert_to_numpy(w) for w in model.encoder.trainable_weights]
    assert all(np.isfinite(a).all() for a in after)
    assert sum(not np.array_equal(a, b) for a, b in zip(after, before)) == len(before)
    first = _small(loss)
    first.compile(optimizer=keras.optimizers.Adam(3e-3))
    initial = first.evaluate(tf.data.Dataset.from_tensors(_batch()), verbose=0, return_dict=True)
    final = model.evaluate(tf.data.Dataset.from_tensors(_batch()), verbose=0, return_dict=True)
    assert np.isfinite(final["loss"]) and final["loss"] < 0.5 * initial["loss"]
    assert final["pair_accuracy"] == 1.0


@pytest.mark.both_backends
def test_build_clippo_presets_and_init():
    model = build_clippo("tiny", "softmax")
    out = model({"image": np.zeros((2, 64, 64, 3), "float32"),
                 "text_images": np.ones((2, 64, 64, 3), "float32")})
    assert out["image_emb"].shape == (2, 192) and out["text_emb"].shape == (2, 192)
    assert model.encoder.pool == "map" and model.encoder.output_dim == 192
    assert float(out["t"]) == pytest.approx(10.0, rel=1e-5)            # CLIPPO: t = 10
    sig = build_clippo("tiny", "sigmoid", image_size=32)
    out = sig({"image": np.zeros((1, 32, 32, 3), "float32"),
               "text_images": np.zeros((1, 32, 32, 3), "float32")})
    assert float(out["t"]) == pytest.approx(10.0) and float(out["b"]) == pytest.approx(-10.0)
    with pytest.raises(ValueError, match="valid names"):
        build_clippo("huge")
