"""The captioners (CoCa, CapPa, MaMMUT, PaLI-style): what each pass may see, losses, training,
generation equal to full re-decoding, caption scoring, serialization."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_mm.losses.captioning import captioning_loss
from keras_mm.models.captioners import build_captioner
from keras_mm.models.captioning import teacher_forcing
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
V, L, B = 30, 8, 4
IMAGE = dict(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)
DECODER = dict(width=32, heads=2, mlp_dim=64)
DEPTHS = {"coca": dict(depth=2), "cappa": dict(depth=2), "mammut": dict(depth=2),
          "pali": dict(depth=1)}
EXTRA = {"coca": dict(unimodal_layers=1, num_caption_queries=3, pooler_heads=2),
         "pali": dict(encoder_depth=1, max_prompt_len=5)}
KINDS = ("coca", "cappa", "mammut", "pali")


def _model(kind, **kwargs):
    keras.utils.set_random_seed(3)
    return build_captioner(kind, "tiny", vocab_size=V, max_len=L, image_overrides=IMAGE,
                           decoder_overrides={**DECODER, **DEPTHS[kind]},
                           **{**EXTRA.get(kind, {}), **kwargs})


def _batch(seed=0, n=B):
    rng = np.random.default_rng(seed)
    text = rng.integers(3, V, size=(n, L)).astype("int32")
    text[:, 0] = 1
    text[0, 5], text[0, 6:] = 2, 0                  # one short caption (EOS, then PAD)
    text[1:, -1] = 2
    batch = {"image": rng.normal(size=(n, 16, 16, 3)).astype("float32"), "text": text}
    return batch


def _inputs(kind, batch, seed=0):
    batch = dict(batch)
    if kind == "pali":
        rng = np.random.default_rng(seed + 100)
        prompt = rng.integers(3, V, size=(len(batch["text"]), 5)).astype("int32")
        prompt[:, -1] = 0
        batch["prompt"] = prompt
    return batch


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _context_kwargs(kind, batch):
    return {"prompt": batch["prompt"]} if kind == "pali" else {}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.jax_all_cases
def test_captioning_pass_is_causal_and_uses_the_image(kind):
    model = _model(kind)
    batch = _inputs(kind, _batch())
    kwargs = _context_kwargs(kind, batch)
    base = _np(model.caption_logits(batch["image"], batch["text"], **kwargs))
    assert base.shape == (B, L - 1, V)
    for t in range(2, L):
        changed = batch["text"].copy()
        changed[:, t:] = (changed[:, t:] + 1) % (V - 3) + 3
        out = _np(model.caption_logits(batch["image"], changed, **kwargs))
        # inputs are text[:, :-1]: input position t-1 first differs, so logits < t-1 are fixed
        np.testing.assert_allclose(out[:, :t - 1], base[:, :t - 1], atol=1e-5)
    other = _inputs(kind, _batch(seed=1))
    moved = _np(model.caption_logits(other["image"], batch["text"], **kwargs))
    assert np.abs(moved - base).max() > 1e-4


@pytest.mark.parametrize("kind", ["coca", "mammut"])
@pytest.mark.jax_all_cases
def test_contrastive_text_never_sees_the_image(kind):
    model = _model(kind)
    batch, other = _batch(), _batch(seed=1)
    out = model(batch)
    swapped = model({"image": other["image"], "text": batch["text"]})
    np.testing.assert_allclose(_np(swapped["text_emb"]), _np(out["text_emb"]), atol=1e-6)
    assert np.abs(_np(swapped["logits"]) - _np(out["logits"])).max() > 1e-4
    np.testing.assert_allclose(_np(model.embed_text(batch["text"])), _np(out["text_emb"]),
                               atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(_np(out["image_emb"]), axis=-1), 1.0, atol=1e-5)


def test_mammut_contrastive_pass_is_bidirectional_and_mean_pooled():
    model = _model("mammut")
    text = _batch()["text"]
    base = _np(model.embed_text(text))
    changed = text.copy()
    changed[1:, -2] = (changed[1:, -2] + 1) % (V - 3) + 3     # a late token of full rows
    out = _np(model.embed_text(changed))
    assert np.abs(out[1:] - base[1:]).max() > 1e-4
    np.testing.assert_allclose(out[0], base[0], atol=1e-6)
    # Pass 1 by hand: blocks without the causal mask or cross-attention, final norm, mean
    # over the non-pad inputs, projection, L2 norm.
    inputs, _ = teacher_forcing(text)
    d = model.decoder
    pad = _np(inputs) != 0
    x = d.embed(inputs)
    for block in d.blocks:
        x = block(x, None, attention_mask=pad, use_causal_mask=False, use_cross_attention=False)
    x = _np(d.final_norm(x))
    pooled = (x * pad[..., None]).sum(1) / pad.sum(1, keepdims=True)
    emb = _np(model.text_projection(pooled))
    np.testing.assert_allclose(base, emb / np.linalg.norm(emb, axis=-1, keepdims=True),
                               atol=1e-5)


def test_coca_cls_token_is_last_and_unimodal():
    model = _model("coca")
    assert model.decoder.cross_layers == (1,)
    assert model.cls_id == V and model.decoder.max_len == L       # L - 1 text inputs + cls
    assert model.max_caption_length == L - 1
    pooled = model.caption_pooler(model.image_tokens(_batch()["image"]))
    assert pooled.shape == (B, 3, 32)
    assert model.contrastive_pooler(model.image_tokens(_batch()["image"])).shape[1] == 1


def test_cappa_parallel_rows_see_only_mask_tokens():
    model = _model("cappa", parallel_fraction=1.0)
    batch = _batch()
    inputs, _ = teacher_forcing(batch["text"])
    ids, mask = model.parallel_inputs(inputs, np.array([True, False, True, False]))
    ids, mask = _np(ids), _np(mask)
    assert (ids[[0, 2]] == model.mask_id).all() and (ids[[1, 3]] == _np(inputs)[[1, 3]]).all()
    assert mask.shape == (B, 1, L - 1, L - 1)
    assert mask[[0, 2]].all()
    causal = np.tril(np.ones((L - 1, L - 1), bool))
    np.testing.assert_array_equal(mask[1, 0], causal & (_np(inputs)[1] != 0)[None, :])
    # In training with parallel_fraction 1 the prediction does not depend on the caption.
    changed = dict(batch, text=(batch["text"] * 0 + 5) * (batch["text"] != 0)
                   + (batch["text"] == 2) * 0)
    changed["text"][:, 0] = 1
    a = _np(model(batch, training=True)["logits"])
    b = _np(model(changed, training=True)["logits"])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_pali_prompt_padding_is_invisible_and_prompt_matters():
    model = _model("pali")
    batch = _inputs("pali", _batch())
    base = _np(model.caption_logits(batch["image"], batch["text"], prompt=batch["prompt"]))
    longer = np.concatenate([batch["prompt"][:, :4], np.zeros((B, 1), "int32")], axis=1)
    np.testing.assert_allclose(
        _np(model.caption_logits(batch["image"], batch["text"], prompt=longer)), base,
        atol=1e-5)
    other = batch["prompt"].copy()
    other[:, 0] = (other[:, 0] + 1) % (V - 3) + 3
    assert np.abs(_np(model.caption_logits(batch["image"], batch["text"], prompt=other))
                  - base).max() > 1e-4
    with pytest.raises(ValueError, match="prompt"):
        model.caption_context(batch["image"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.jax_all_cases
def test_loss_is_the_papers_weighted_sum(kind):
    model = _model(kind)
    batch = _inputs(kind, _batch())
    out = model(batch)
    _, labels = teacher_forcing(batch["text"])
    caption = float(_np(captioning_loss(out["logits"], labels)))
    np.testing.assert_allclose(float(_np(out["caption_loss"])), caption, rtol=1e-6)
    total = float(_np(model.compute_loss(batch, y_pred=out)))
    if kind in ("cappa", "pali"):
        np.testing.assert_allclose(total, caption, rtol=1e-5)
        return
    img, txt = _np(out["image_emb"]), _np(out["text_emb"])
    logits = float(_np(out["t"])) * img @ txt.T
    def ce(z):
        z = z - z.max(1, keepdims=True)
        return -(np.diag(z) - np.log(np.exp(z).sum(1))).mean()
    contrastive = (ce(logits) + ce(logits.T)) / 2
    weight = {"coca": 2.0, "mammut": 1.0}[kind]
    np.testing.assert_allclose(total, contrastive + weight * caption, rtol=1e-4)


@pytest.mark.parametrize("kind", ["coca", "mammut"])
def test_contrastive_weight_zero_is_captioning_only(kind):
    """The blind baselines of CoCa / MaMMUT train the decoder on captions alone: with
    contrastive_weight 0 the loss is the weighted caption loss and no gradient reaches the
    image encoder (TensorFlow then prunes its backward pass)."""
    model = _model(kind, contrastive_weight=0.0, blind=True)
    batch = _batch()
    out = model(batch)
    _, labels = teacher_forcing(batch["text"])
    caption = float(_np(captioning_loss(out["logits"], labels)))
    weight = {"coca": 2.0, "mammut": 1.0}[kind]
    np.testing.assert_allclose(float(_np(model.compute_loss(batch, y_pred=out))),
                               weight * caption, rtol=1e-5)
    image_weights = [w.path for w in model.image_encoder_model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    before = {w.path: _np(w).copy() for w in model.trainable_weights}
    model.fit(batch, epochs=1, batch_size=B, verbose=0)
    moved = {w.path for w in model.trainable_weights
             if np.abs(_np(w) - before[w.path]).max() > 0}
    assert moved and not moved & set(image_weights)


def test_mammut_focal_loss_is_ro_vits():
    model = _model("mammut", contrastive="focal", focal_gamma=2.0)
    batch = _batch()
    out = model(batch)
    img, txt = _np(out["image_emb"]).astype(np.float64), _np(out["text_emb"]).astype(np.float64)
    s = float(_np(out["t"])) * img @ txt.T
    p = 1 / (1 + np.exp(-s))
    p_t = np.where(np.eye(B, dtype=bool), p, 1 - p)
    focal = -((1 - p_t) ** 2 * np.log(p_t)).sum() / B
    _, labels = teacher_forcing(batch["text"])
    caption = float(_np(captioning_loss(out["logits"], labels)))
    np.testing.assert_allclose(float(_np(model.compute_loss(batch, y_pred=out))),
                               focal + caption, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.jax_all_cases
def test_greedy_generation_equals_full_redecoding(kind):
    model = _model(kind)
    batch = _inputs(kind, _batch())
    kwargs = _context_kwargs(kind, batch)
    tokens = _np(model.generate(batch["image"], **kwargs))
    length = model.max_caption_length
    assert tokens.shape == (B, length)
    # Full re-decoding: the whole prefix through the decoder again for every new token.
    context, context_mask = model.caption_context(batch["image"], **kwargs)
    prefix = np.ones((B, 1), "int32")
    for _ in range(length):
        logits = _np(model.decoder(prefix, context, context_mask=context_mask))[:, -1]
        logits[:, :2] = -np.inf                    # PAD and BOS are never generated
        prefix = np.concatenate([prefix, logits.argmax(-1)[:, None].astype("int32")], 1)
    expected = prefix[:, 1:]
    for row in expected:
        eos = np.flatnonzero(row == 2)
        if eos.size:
            row[eos[0] + 1:] = 0
    np.testing.assert_array_equal(tokens, expected)


@pytest.mark.parametrize("kind", ["cappa", "coca"])
def test_score_texts_is_the_caption_log_likelihood(kind):
    model = _model(kind)
    batch = _batch()
    scores = _np(model.score_texts(batch["image"][:2], batch["text"][:3]))
    assert scores.shape == (2, 3)
    for i in range(2):
        images = np.repeat(batch["image"][i:i + 1], 3, axis=0)
        logits = _np(model.caption_logits(images, batch["text"][:3])).astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                keepdims=True)) \
            - logits.max(-1, keepdims=True)
        labels = batch["text"][:3, 1:]
        picked = np.take_along_axis(logp, labels[..., None], -1)[..., 0] * (labels != 0)
        np.testing.assert_allclose(scores[i], picked.sum(-1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.jax_all_cases
def test_fit_learns_the_batch(kind):
    model = _model(kind)
    batch = _inputs(kind, _batch(n=8))
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    first = model.evaluate(batch, batch_size=8, verbose=0, return_dict=True)["caption_loss"]
    history = model.fit(batch, batch_size=8, epochs=60, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    last = model.evaluate(batch, batch_size=8, verbose=0, return_dict=True)["caption_loss"]
    assert last < 0.5 * first, (first, last)


def test_blind_model_ignores_the_image():
    model = _model("cappa", blind=True)
    batch, other = _batch(), _batch(seed=1)
    np.testing.assert_allclose(
        _np(model.caption_logits(batch["image"], batch["text"])),
        _np(model.caption_logits(other["image"], batch["text"])), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.jax_all_cases
def test_serialization_round_trip(kind):
    model = _model(kind)
    batch = _inputs(kind, _batch())
    model(batch)
    loaded = assert_serialization_round_trip(model, batch)
    assert type(loaded) is type(model) and loaded.family == kind
