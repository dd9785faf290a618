"""A captioner's contrastive head on a caption of its own (``InputConfig.contrastive_caption``):
CoCa and MaMMUT caption ``text`` and contrast ``text_contrastive``, and identical captions in a
batch are left out of each other's softmax (``softmax_contrastive_loss(text_ids=...)``)."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_mm.losses import softmax_contrastive_loss
from keras_mm.models.captioners import build_captioner
from tests.keras_mm.losses.gradients import value_and_grads

pytestmark = pytest.mark.both_backends
V, L, B, D = 30, 8, 6, 16
IMAGE = dict(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)
DECODER = dict(width=32, heads=2, mlp_dim=64, depth=2)


def _unit(rng, n):
    x = rng.normal(size=(n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_loss(image, text, ids, scale):
    """CLIP's loss in NumPy with the columns of other rows' identical captions removed."""
    same = (ids[:, None, :] == ids[None, :, :]).all(-1) & ~np.eye(len(ids), dtype=bool)

    def ce(logits):
        logits = np.where(same, -np.inf, logits)
        top = logits.max(axis=1, keepdims=True)
        return np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0] - np.diag(logits)

    return (ce(scale * image @ text.T).sum() + ce(scale * text @ image.T).sum()) / (2 * len(ids))


def _ids(rng, duplicates):
    ids = rng.integers(3, V, size=(B, L)).astype("int32")
    for a, b in duplicates:
        ids[b] = ids[a]
    return ids


def test_identical_captions_leave_each_others_softmax():
    rng = np.random.default_rng(0)
    image, text = _unit(rng, B), _unit(rng, B)
    ids = _ids(rng, [(0, 3), (0, 5), (1, 4)])          # rows 0, 3, 5 and rows 1, 4 share captions
    log_scale = math.log(10.0)
    got = float(softmax_contrastive_loss(image, text, log_scale, text_ids=ids))
    np.testing.assert_allclose(got, _numpy_loss(image, text, ids, 10.0), rtol=1e-5, atol=1e-5)
    assert got < float(softmax_contrastive_loss(image, text, log_scale))    # fewer negatives
    # all captions distinct: CLIP's loss
    distinct = _ids(rng, [])
    assert len({row.tobytes() for row in distinct}) == B
    np.testing.assert_allclose(
        float(softmax_contrastive_loss(image, text, log_scale, text_ids=distinct)),
        float(softmax_contrastive_loss(image, text, log_scale)), rtol=1e-6, atol=1e-6)
    # replica shares (local rows against the gathered batch) add up to the loss
    shares = [float(softmax_contrastive_loss(
        image[rows], text[rows], log_scale, global_image_emb=image, global_text_emb=text,
        label_offset=rows.start, text_ids=ids[rows], global_text_ids=ids))
        for rows in (slice(0, 2), slice(2, 6))]
    np.testing.assert_allclose(sum(shares), got, rtol=1e-5, atol=1e-5)
    _, grads = value_and_grads(
        lambda x, y: softmax_contrastive_loss(x, y, log_scale, text_ids=ids), image, text)
    assert all(np.all(np.isfinite(g)) and np.abs(g).max() > 0 for g in grads)
    # every caption the same: each softmax keeps only its positive, nothing to learn
    same = np.repeat(ids[:1], B, axis=0)
    value, grads = value_and_grads(
        lambda x, y: softmax_contrastive_loss(x, y, log_scale, text_ids=same), image, text)
    np.testing.assert_allclose(value, 0.0, atol=1e-6)
    assert all(np.abs(g).max() < 1e-6 for g in grads)


def _model(kind):
    keras.utils.set_random_seed(5)
    extra = dict(unimodal_layers=1, num_caption_queries=3, pooler_heads=2) if kind == "coca" \
        else {}
    return build_captioner(kind, "tiny", vocab_size=V, max_len=L, image_overrides=IMAGE,
                           decoder_overrides=DECODER, **extra)


def _batch(rng):
    text = _ids(rng, [])
    text[:, 0], text[:, -1] = 1, 2
    other = _ids(rng, [(0, 2)])                          # examples 0 and 2: the same caption
    other[:, 0], other[:, -1] = 1, 2
    return {"image": rng.normal(size=(B, 16, 16, 3)).astype("float32"), "text": text,
            "text_contrastive": other}


@pytest.mark.parametrize("kind", ["coca", "mammut"])
@pytest.mark.jax_all_cases
def test_captioners_contrast_their_own_caption_and_caption_text(kind):
    model = _model(kind)
    batch = _batch(np.random.default_rng(2))
    out = model(batch)
    plain = model({"image": batch["image"], "text": batch["text"]})
    np.testing.assert_array_equal(ops.convert_to_numpy(out["text_ids"]),
                                  batch["text_contrastive"])
    np.testing.assert_allclose(ops.convert_to_numpy(out["text_emb"]),
                               ops.convert_to_numpy(model.embed_text(batch["text_contrastive"])),
                               atol=1e-5)
    # the captioning pass still reads "text"
    np.testing.assert_allclose(ops.convert_to_numpy(out["logits"]),
                               ops.convert_to_numpy(plain["logits"]), atol=1e-5)
    np.testing.assert_allclose(float(out["caption_loss"]), float(plain["caption_loss"]),
                               rtol=1e-6)
    # the loss: weights as before, the contrastive part with the duplicate left out
    contrastive = float(softmax_contrastive_loss(
        out["image_emb"], out["text_emb"], model.logits.log_scale,
        text_ids=batch["text_contrastive"]))
    expected = (model.caption_weight * float(out["caption_loss"])
                + model.contrastive_weight * contrastive)
    np.testing.assert_allclose(float(model.compute_loss(y_pred=out)), expected, rtol=1e-5)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(batch, epochs=2, batch_size=B, verbose=0)
    assert all(np.isfinite(v) for v in history.history["loss"])


def test_a_contrastive_caption_needs_the_softmax_loss():
    batch = _batch(np.random.default_rng(3))
    focal = build_captioner("mammut", "tiny", vocab_size=V, max_len=L, image_overrides=IMAGE,
                            decoder_overrides=DECODER, contrastive="focal")
    with pytest.raises(ValueError, match="softmax"):
        focal.compute_loss(y_pred=focal(batch))
