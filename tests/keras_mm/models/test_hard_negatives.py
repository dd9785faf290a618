"""Hard negative captions (NegCLIP) in the softmax contrastive models: the two-tower model, CoCa
and MaMMUT embed ``text_negative`` with their text tower and add it to the image->text softmax."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_mm.losses import softmax_contrastive_loss
from keras_mm.models.captioners import build_captioner
from keras_mm.models.two_tower import build_two_tower

pytestmark = pytest.mark.both_backends
V, L, B = 30, 8, 4
IMAGE = dict(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)
DECODER = dict(width=32, heads=2, mlp_dim=64, depth=2)
KINDS = ("two_tower", "coca", "mammut")


def _model(kind, **kwargs):
    keras.utils.set_random_seed(3)
    if kind == "two_tower":
        return build_two_tower("tiny", kwargs.pop("loss", "softmax"), vocab_size=V, max_len=L,
                               image_overrides=dict(IMAGE, output_dim=32),
                               text_overrides=dict(DECODER, depth=1, output_dim=32))
    extra = dict(unimodal_layers=1, num_caption_queries=3, pooler_heads=2) if kind == "coca" \
        else {}
    return build_captioner(kind, "tiny", vocab_size=V, max_len=L, image_overrides=IMAGE,
                           decoder_overrides=DECODER, **extra, **kwargs)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    text = rng.integers(3, V, size=(B, L)).astype("int32")
    text[:, 0], text[:, -1] = 1, 2
    negative = text.copy()
    negative[:, 3] = (negative[:, 3] - 2) % (V - 3) + 3          # one token swapped
    return {"image": rng.normal(size=(B, 16, 16, 3)).astype("float32"), "text": text,
            "text_negative": negative, "negative_valid": np.array([True, True, False, True])}


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.jax_all_cases
def test_negatives_are_embedded_and_join_the_image_to_text_softmax(kind):
    model = _model(kind)
    batch = _batch()
    out = model(batch)
    np.testing.assert_allclose(_np(out["negative_text_emb"]),
                               _np(model.embed_text(batch["text_negative"])), atol=1e-5)
    plain = {k: v for k, v in out.items() if k not in ("negative_text_emb", "negative_valid")}
    weight = getattr(model, "contrastive_weight", 1.0)
    difference = float(model.compute_loss(y_pred=out)) - float(model.compute_loss(y_pred=plain))
    log_scale = model.logits.log_scale
    expected = weight * (
        float(softmax_contrastive_loss(out["image_emb"], out["text_emb"], log_scale,
                                       global_negative_emb=out["negative_text_emb"],
                                       global_negative_valid=batch["negative_valid"]))
        - float(softmax_contrastive_loss(out["image_emb"], out["text_emb"], log_scale)))
    assert difference > 0
    np.testing.assert_allclose(difference, expected, rtol=1e-4, atol=1e-6)
    # without the key the outputs are as before
    assert "negative_text_emb" not in model({"image": batch["image"], "text": batch["text"]})


def test_negatives_need_the_softmax_loss():
    batch = _batch()
    sigmoid = _model("two_tower", loss="sigmoid")
    with pytest.raises(ValueError, match="softmax"):
        sigmoid.compute_loss(y_pred=sigmoid(batch))
    focal = _model("mammut", contrastive="focal")
    with pytest.raises(ValueError, match="softmax"):
        focal.compute_loss(y_pred=focal(batch))


@pytest.mark.parametrize("kind", ["coca", "mammut"])
def test_fit_with_negatives_trains_the_text_tower_on_them(kind):
    model = _model(kind)
    batch = _batch()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = _np(model.embed_text(batch["text_negative"]))
    history = model.fit(batch, epochs=3, batch_size=B, verbose=0)
    assert all(np.isfinite(v) for v in history.history["loss"])
    assert np.abs(_np(model.embed_text(batch["text_negative"])) - before).max() > 1e-4
