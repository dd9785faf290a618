"""The video models of issue 7: the video-text two-tower model and MaMMUT video (batch key
"video", training, serialization) and MV-GPT (forward / backward generation losses against an
independent computation, the BOS-B token, the ablations, generation, training, serialization)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_mm.encoders.frame_average import FrameAverageEncoder
from keras_mm.encoders.tubevit import TubeViTEncoder
from keras_mm.encoders.vit import ViTEncoder
from keras_mm.models.mvgpt import MVGPTModel
from keras_mm.models.video import (build_mvgpt, build_video_mammut, build_video_two_tower,
                                   frame_vit_config)
from tests.keras_mm.serialization import assert_serialization_round_trip

# Model-level tests run on both backends (tests/keras_mm/test_jax_backend.py); the three that
# fit for many steps run on TensorFlow only, to bound the JAX rerun (their forward passes, losses
# and generation are checked on both by the others).
V, L, P, B = 30, 8, 6, 4
# 4 x 16 x 16 clips: a 2 x 8 x 8 tube (8 tokens) and 8 x 8 image patches on every other frame
# (8 tokens).
TUBES = [[[2, 8, 8], [2, 8, 8], [0, 0, 0]], [[1, 8, 8], [2, 8, 8], [0, 0, 0]]]
VIDEO = dict(video_size=[4, 16, 16], tubes=TUBES, width=32, depth=1, heads=2, mlp_dim=64)
TEXT = dict(width=32, depth=1, heads=2, mlp_dim=64, output_dim=32)
DECODER = dict(width=32, heads=2, mlp_dim=64)


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _video(seed=0, n=B):
    return np.random.default_rng(seed).normal(size=(n, 4, 16, 16, 3)).astype("float32")


def _text(seed=0, n=B, length=L):
    """``[n, length]`` ids ``BOS t .. EOS PAD ..`` (row 0 short)."""
    text = np.random.default_rng(seed + 50).integers(3, V, size=(n, length)).astype("int32")
    text[:, 0] = 1
    text[0, length - 3], text[0, length - 2:] = 2, 0
    text[1:, -1] = 2
    return text


def _current(seed=0, n=B):
    """``[n, P]`` ids ``t .. EOS PAD ..`` (no BOS)."""
    current = np.random.default_rng(seed + 100).integers(3, V, size=(n, P)).astype("int32")
    current[:, -2], current[:, -1] = 2, 0
    current[1, 2], current[1, 3:] = 2, 0
    return current


def _ce(logits, labels):
    """Masked mean token cross-entropy (float64), PAD (0) labels ignored."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    mask = labels != 0
    return (nll * mask).sum() / mask.sum()


# ------------------------------------------------------------------ two-tower and MaMMUT video
def _two_tower(encoder, loss="softmax"):
    keras.utils.set_random_seed(1)
    return build_video_two_tower("tiny", loss, encoder=encoder, vocab_size=V, max_len=L,
                                 video_overrides=dict(VIDEO, output_dim=32),
                                 text_overrides=TEXT)


def _mammut(encoder, **kwargs):
    keras.utils.set_random_seed(2)
    return build_video_mammut("tiny", encoder=encoder, vocab_size=V, max_len=L,
                              video_overrides=VIDEO,
                              decoder_overrides=dict(DECODER, depth=2), **kwargs)


@pytest.mark.both_backends
def test_builders_pick_the_video_towers():
    tube = _two_tower("tubevit")
    assert isinstance(tube.image_encoder, TubeViTEncoder) and tube.visual_key == "video"
    assert tube.get_config()["visual_key"] == "video"
    frames = _two_tower("frame_average")
    assert isinstance(frames.image_encoder, FrameAverageEncoder)
    vit = frames.image_encoder.image_encoder
    assert isinstance(vit, ViTEncoder)
    assert vit.image_size == (16, 16) and vit.patch_size == (8, 8)   # the image tube's patch
    assert (vit.width, vit.depth, vit.heads) == (32, 1, 2)
    mammut = _mammut("tubevit")
    assert mammut.image_encoder_model.image_position_embedding
    assert mammut.visual_key == "video" and mammut.get_config()["visual_key"] == "video"
    assert isinstance(_mammut("frame_average").image_encoder_model, FrameAverageEncoder)
    # The default key is unchanged for image models.
    from keras_mm.models.two_tower import build_two_tower
    assert build_two_tower("tiny", vocab_size=V, max_len=L).visual_key == "image"
    cfg = frame_vit_config(dict(VIDEO, patch_size=4))
    assert cfg["patch_size"] == 4 and "tubes" not in cfg and cfg["image_size"] == [16, 16]
    with pytest.raises(ValueError, match="frame-average"):
        build_video_two_tower("tiny", encoder="tubevit", video_overrides={"patch_size": 4})
    with pytest.raises(ValueError, match="encoder"):
        build_video_two_tower("tiny", encoder="3d_cnn")


@pytest.mark.parametrize("encoder", ["tubevit", "frame_average"])
@pytest.mark.jax_all_cases
def test_video_two_tower_reads_the_video_key_trains_and_serializes(encoder):
    model = _two_tower(encoder)
    batch = {"video": _video(n=8), "text": _text(n=8)}
    out = model(batch)
    assert _np(out["image_emb"]).shape == (8, 32)
    np.testing.assert_allclose(_np(out["image_emb"]), _np(model.embed_image(batch["video"])),
                               atol=1e-5)
    moved = model({"video": _video(seed=3, n=8), "text": batch["text"]})
    assert np.abs(_np(moved["image_emb"]) - _np(out["image_emb"])).max() > 1e-4
    with pytest.raises(KeyError):
        model({"image": batch["video"], "text": batch["text"]})
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    # One full batch an epoch: epoch k's logged loss is that of the weights after k steps.
    losses = model.fit(batch, batch_size=8, epochs=15, verbose=0).history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses
    loaded = assert_serialization_round_trip(model, batch, atol=1e-5)
    assert loaded.visual_key == "video"


def test_video_mammut_trains_and_serializes():
    model = _mammut("tubevit")
    batch = {"video": _video(n=8), "text": _text(n=8)}
    out = model(batch)
    assert _np(out["logits"]).shape == (8, L - 1, V)
    other = model({"video": _video(seed=3, n=8), "text": batch["text"]})
    assert np.abs(_np(other["logits"]) - _np(out["logits"])).max() > 1e-4
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(batch, batch_size=8, epochs=20, verbose=0).history
    for key in ("caption_loss", "loss"):
        assert history[key][-1] < 0.9 * history[key][0], history[key]
    tokens = _np(model.generate(batch["video"]))
    assert tokens.shape == (8, L - 1)
    loaded = assert_serialization_round_trip(model, batch, atol=1e-5)
    assert loaded.visual_key == "video" and loaded.family == "mammut"


@pytest.mark.both_backends
def test_video_mammut_frame_average_runs():
    model = _mammut("frame_average", contrastive="focal")
    out = model({"video": _video(), "text": _text()})
    assert _np(out["logits"]).shape == (B, L - 1, V)
    assert np.isfinite(float(_np(model.compute_loss({"video": _video(), "text": _text()},
                                                    y_pred=out))))


# ------------------------------------------------------------------ MV-GPT
def _mvgpt(encoder="tubevit", **kwargs):
    keras.utils.set_random_seed(4)
    return build_mvgpt("tiny", encoder=encoder, vocab_size=V, max_len=L, max_current_len=P,
                       video_overrides=VIDEO, decoder_overrides=dict(DECODER, depth=1),
                       encoder_depth=1, **kwargs)


def _batch(seed=0, n=B):
    return {"video": _video(seed, n), "current": _current(seed, n), "future": _text(seed, n)}


def _memory_by_hand(model, video, utterance):
    """The multimodal encoder's input assembled from the parts: projected video tokens, then
    token + position embeddings of the utterance; mask: every frame token, utterance != PAD."""
    d = model.decoder
    parts, masks = [], []
    if model.use_frames:
        _, tokens = model.video_encoder(video, return_tokens=True)
        visual = _np(model.visual_projection(tokens))
        parts.append(visual)
        masks.append(np.ones(visual.shape[:2], bool))
    table = _np(model.text_position.embeddings)[:utterance.shape[1]]
    parts.append(_np(d.token_embedding(utterance)) + table[None])
    masks.append(utterance != 0)
    x, mask = np.concatenate(parts, 1), np.concatenate(masks, 1)
    return model.encoder(x, attention_mask=mask), mask


@pytest.mark.both_backends
def test_mvgpt_forward_loss_is_the_future_given_frames_and_present():
    model = _mvgpt()
    batch = _batch()
    out = model(batch)
    memory, mask = _memory_by_hand(model, batch["video"], batch["current"])
    logits = _np(model.decoder(batch["future"][:, :-1], memory, context_mask=mask))
    np.testing.assert_allclose(_np(out["logits"]), logits, atol=1e-4)
    forward = _ce(logits, batch["future"][:, 1:])
    np.testing.assert_allclose(float(_np(out["caption_loss"])), forward, rtol=1e-4)
    accuracy = ((logits.argmax(-1) == batch["future"][:, 1:])
                * (batch["future"][:, 1:] != 0)).sum() / (batch["future"][:, 1:] != 0).sum()
    np.testing.assert_allclose(float(_np(out["token_accuracy"])), accuracy, rtol=1e-5)
    # The present utterance's padding is invisible; its content matters.
    padded = dict(batch, current=np.concatenate([batch["current"], np.zeros((B, 1), "int32")],
                                                 1))
    np.testing.assert_allclose(_np(model(padded)["logits"]), _np(out["logits"]), atol=1e-4)
    changed = dict(batch, current=batch["current"].copy())
    changed["current"][:, 0] = (changed["current"][:, 0] + 1) % (V - 3) + 3
    assert np.abs(_np(model(changed)["logits"]) - _np(out["logits"])).max() > 1e-4


@pytest.mark.both_backends
def test_mvgpt_backward_pass_decodes_the_present_from_bos_b_given_the_future():
    model = _mvgpt()
    assert model.bos_b_id == V and model.decoder.extra_tokens == 1
    assert model.bos_f_id == model.decoder.bos_id == 1
    batch = _batch()
    out = model(batch)
    # Encoder text: the future without its BOS; decoder: BOS-B, then the present.
    memory, mask = _memory_by_hand(model, batch["video"], batch["future"][:, 1:])
    inputs = np.concatenate([np.full((B, 1), V, "int32"), batch["current"][:, :-1]], 1)
    logits = _np(model.decoder(inputs, memory, context_mask=mask))
    assert _np(out["backward_logits"]).shape == (B, P, V)
    np.testing.assert_allclose(_np(out["backward_logits"]), logits, atol=1e-4)
    backward = _ce(logits, batch["current"])
    np.testing.assert_allclose(float(_np(out["backward_caption_loss"])), backward, rtol=1e-4)
    forward = float(_np(out["caption_loss"]))
    np.testing.assert_allclose(float(_np(model.compute_loss(batch, y_pred=out))),
                               forward + backward, rtol=1e-4)
    # BOS-B is not BOS-F: starting the present from the tokenizer's BOS gives other logits.
    inputs_f = inputs.copy()
    inputs_f[:, 0] = 1
    assert np.abs(_np(model.decoder(inputs_f, memory, context_mask=mask))
                  - logits).max() > 1e-4


@pytest.mark.both_backends
def test_mvgpt_loss_weights_and_forward_only_ablation():
    batch = _batch()
    full = _mvgpt()
    out = full(batch)
    forward, backward = float(_np(out["caption_loss"])), float(_np(out["backward_caption_loss"]))
    weighted = _mvgpt(forward_weight=0.5, backward_weight=2.0)
    weighted(batch)
    weighted.set_weights(full.get_weights())
    np.testing.assert_allclose(float(_np(weighted.compute_loss(batch))),
                               0.5 * forward + 2.0 * backward, rtol=1e-4)
    only = _mvgpt(backward=False)
    only(batch)
    only.set_weights(full.get_weights())
    out_only = only(batch)
    assert "backward_caption_loss" not in out_only
    np.testing.assert_allclose(float(_np(only.compute_loss(batch, y_pred=out_only))), forward,
                               rtol=1e-6)
    np.testing.assert_allclose(_np(out_only["logits"]), _np(out["logits"]), atol=1e-6)


@pytest.mark.both_backends
@pytest.mark.parametrize("encoder", ["tubevit", "frame_average"])
@pytest.mark.jax_all_cases
def test_mvgpt_sees_the_frames_unless_use_frames_is_false(encoder):
    batch = _batch()
    other = dict(batch, video=_video(seed=7))
    with_frames = _mvgpt(encoder)
    a, b = with_frames(batch), with_frames(other)
    for key in ("logits", "backward_logits"):
        assert np.abs(_np(a[key]) - _np(b[key])).max() > 1e-4
    blind = _mvgpt(encoder, use_frames=False)
    assert blind.video_encoder is None and blind.get_config()["video_encoder"] is None
    a, b = blind(batch), blind(other)
    for key in ("logits", "backward_logits"):
        np.testing.assert_allclose(_np(a[key]), _np(b[key]), atol=1e-6)
    memory, mask = _memory_by_hand(blind, None, batch["current"])
    np.testing.assert_allclose(
        _np(a["logits"]),
        _np(blind.decoder(batch["future"][:, :-1], memory, context_mask=mask)), atol=1e-4)
    np.testing.assert_array_equal(_np(blind.generate(batch["video"], batch["current"])),
                                  _np(blind.generate(other["video"], batch["current"])))


def _full_redecode(model, context, context_mask, start, length):
    prefix = np.full((B, 1), start, "int32")
    for _ in range(length):
        logits = _np(model.decoder(prefix, context, context_mask=context_mask))[:, -1]
        logits[:, :2] = -np.inf                    # PAD and BOS are never generated
        prefix = np.concatenate([prefix, logits.argmax(-1)[:, None].astype("int32")], 1)
    expected = prefix[:, 1:]
    for row in expected:
        eos = np.flatnonzero(row == 2)
        if eos.size:
            row[eos[0] + 1:] = 0
    return expected


@pytest.mark.both_backends
def test_mvgpt_generation_equals_full_redecoding_and_never_emits_bos_b():
    model = _mvgpt()
    batch = _batch()
    length = model.max_caption_length
    assert length == max(L - 1, P)
    tokens = _np(model.generate(batch["video"], batch["current"]))
    assert tokens.shape == (B, length)
    context, mask = model.caption_context(batch["video"], utterance=batch["current"])
    np.testing.assert_array_equal(tokens, _full_redecode(model, context, mask, 1, length))
    present = _np(model.generate_present(batch["video"], batch["future"]))
    context, mask = model.caption_context(batch["video"], utterance=batch["future"][:, 1:])
    np.testing.assert_array_equal(present, _full_redecode(model, context, mask, V, length))
    # The logits have no BOS-B column, so no search can pick it (hot sampling, beams).
    assert _np(model(batch)["logits"]).shape[-1] == V
    for generated in (model.generate(batch["video"], batch["current"], method="sample",
                                     temperature=5.0, seed=1),
                      model.generate_present(batch["video"], batch["future"], method="sample",
                                             temperature=5.0, seed=2),
                      model.generate(batch["video"], batch["current"], method="beam",
                                     beam_size=3, max_length=4)):
        generated = _np(generated)
        assert generated.max() < V and not (generated == 1).any()
    with pytest.raises(ValueError, match="utterance"):
        model.caption_context(batch["video"])


def test_mvgpt_fit_reduces_both_losses():
    model = _mvgpt()
    batch = _batch(n=8)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(batch, batch_size=8, epochs=25, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    assert {"caption_loss", "backward_caption_loss", "backward_token_accuracy"} <= set(history)
    for key in ("caption_loss", "backward_caption_loss", "loss"):
        assert history[key][-1] < 0.7 * history[key][0], (key, history[key])


@pytest.mark.both_backends
@pytest.mark.parametrize("kwargs", [{}, {"use_frames": False, "backward": False},
                                    {"encoder": "frame_average"}])
def test_mvgpt_serialization_round_trip(kwargs):
    model = _mvgpt(**kwargs)
    batch = _batch()
    model(batch)
    loaded = assert_serialization_round_trip(model, batch, atol=1e-5)
    assert isinstance(loaded, MVGPTModel) and loaded.family == "mvgpt"
    assert loaded.bos_b_id == V and loaded.backward == model.backward
    np.testing.assert_array_equal(_np(loaded.generate(batch["video"], batch["current"])),
                                  _np(model.generate(batch["video"], batch["current"])))
