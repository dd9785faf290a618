"""keras_mm.export.video: the SavedModels of the video models embed, caption and continue clips
from JPEG frames exactly as the Keras models do, in a process that imports only tensorflow and
tensorflow_text.

Three tiny models (the video-text two-tower model with TubeViT, MaMMUT video, MV-GPT) are trained
briefly on six hand-made clips (a bright square moving in a different way in each, a caption and
a two-segment transcript each) so that their outputs differ from clip to clip, then exported.
One fresh interpreter loads the three exports and runs every signature on the clips' JPEG
frames. The references are the Keras models on the eval pipeline's own preprocessing
(``eval_video_ops``).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mm.export import video as export_lib
from keras_mm.export.captioner import decode_settings
from keras_mm.models import video as video_models
from keras_mm.pipelines import datasets
from keras_mm.pipelines.tokenizer import Tokenizer, train_sentencepiece

pytestmark = pytest.mark.slow        # trains and exports three models (~1 min)

T, S, MAX_LEN, CURRENT_LEN = 4, 16, 12, 10
TUBES = [[[2, 4, 4], [2, 4, 4], [0, 0, 0]], [[1, 4, 4], [2, 4, 4], [0, 0, 0]]]
VIDEO = dict(video_size=[T, S, S], tubes=TUBES, width=32, depth=1, heads=2, mlp_dim=64)
TEXT = dict(width=32, depth=1, heads=2, mlp_dim=64)
DECODER = dict(width=32, depth=2, heads=2, mlp_dim=64)
TRAIN_STEPS = 100
# (start x, start y, dx, dy) per clip, in pixels / frame, and what is said about it.
MOTIONS = [(1, 6, 3, 0), (12, 6, -3, 0), (6, 1, 0, 3), (6, 12, 0, -3), (1, 1, 3, 3),
           (12, 12, -3, -3)]
DIRECTIONS = ["right", "left", "down", "up", "down right", "up left"]
# Short texts that differ early: the tiny tokenizer has few merges and MAX_LEN cuts them.
CAPTIONS = [f"{d} square" for d in DIRECTIONS]
CURRENT = [f"clip {i}" for i in range(len(MOTIONS))]
FUTURE = [f"{d} next" for d in DIRECTIONS]


def _clip(x, y, dx, dy, frames=T):
    video = np.zeros((frames, S, S, 3), np.uint8)
    for t in range(frames):
        cx, cy = x + dx * t, y + dy * t
        video[t, max(cy, 0):cy + 4, max(cx, 0):cx + 4] = (255, 200, 50)
    return video


def _jpegs(video):
    return [tf.io.encode_jpeg(frame, quality=95).numpy() for frame in video]


CLIPS = [_jpegs(_clip(*m)) for m in MOTIONS]


def _config():
    return datasets.InputConfig(image_size=S, num_frames=T, eval_mode="resize", add_bos=True,
                                max_text_len=MAX_LEN, max_current_len=CURRENT_LEN,
                                video_augment="none")


def _pixels(config, clips):
    """JPEG frames -> float32 [N, T, S, S, 3] by the eval pipeline's own video ops."""
    ops = datasets.eval_video_ops(config)
    return tf.stack([ops({"video/frames": tf.constant(c)})["video"] for c in clips])


def _strings(tokenizer, tokens):
    return [s.decode("utf-8").strip() for s in tokenizer.detokenize(tokens).numpy().tolist()]


LOADER = r'''
import base64, json, sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  registers the SentencePiece ops

spec = json.load(open(sys.argv[1]))
clips = [[base64.b64decode(f) for f in clip] for clip in spec["clips"]]
frames = tf.constant(clips)                                    # [N, T]
longer = tf.constant([clip + clip[-1:] * 2 for clip in clips])  # [N, T + 2]


def strings(x):
    return [s.decode("utf-8") for s in x.numpy().tolist()]


def error(fn, **inputs):
    try:
        fn(**inputs)
        return ["no error", ""]
    except Exception as e:  # noqa: BLE001  recorded for the test to judge
        return [type(e).__name__, getattr(e, "message", str(e))]


results = {}
for kind, export_dir in spec["exports"].items():
    sigs = tf.saved_model.load(export_dir).signatures
    out = {"signatures": sorted(sigs)}
    bad = tf.constant([clips[0], clips[1][:-1] + [b"not a jpeg"]])
    if "embed_video" in sigs:
        out["embed_video"] = sigs["embed_video"](frames=frames)["embedding"].numpy().tolist()
        out["embed_text"] = sigs["embed_text"](
            text=tf.constant(spec["captions"]))["embedding"].numpy().tolist()
        out["embed_none"] = list(sigs["embed_video"](
            frames=tf.zeros([0, 3], tf.string))["embedding"].shape)
        out["errors"] = {"bad_frame": error(sigs["embed_video"], frames=bad),
                         "no_frame": error(sigs["embed_video"],
                                           frames=tf.zeros([2, 0], tf.string)),
                         "empty_text": error(sigs["embed_text"], text=tf.constant(["a", " "]))}
    if "caption_video" in sigs:
        out["caption_video"] = strings(sigs["caption_video"](frames=frames)["caption"])
        out["serving_default"] = strings(sigs["serving_default"](frames=frames)["caption"])
    if "next_utterance" in sigs:
        call = sigs["next_utterance"]
        out["next_utterance"] = strings(call(frames=frames, transcript=tf.constant(
            spec["current"]))["utterance"])
        out["errors"] = {"mismatch": error(call, frames=frames,
                                           transcript=tf.constant(spec["current"][:2]))}
    first = "embed_video" if "embed_video" in sigs else "next_utterance"
    if first == "embed_video":
        out["longer_clips"] = sigs["embed_video"](frames=longer)["embedding"].numpy().tolist()
    results[kind] = out
results["keras_mm_imported"] = any(m.split(".")[0] == "keras_mm" for m in sys.modules)
print(json.dumps(results))
'''


def _build(kind, tokenizer):
    common = dict(vocab_size=tokenizer.vocab_size, max_len=MAX_LEN, video_overrides=VIDEO)
    if kind == "video_two_tower":
        return video_models.build_video_two_tower("tiny", "softmax", text_overrides=TEXT,
                                                  **common)
    if kind == "video_mammut":
        return video_models.build_video_mammut("tiny", decoder_overrides=DECODER, **common)
    return video_models.build_mvgpt("tiny", max_current_len=CURRENT_LEN, encoder_depth=1,
                                    decoder_overrides=DECODER, **common)


def _batch(kind, tokenizer, config):
    pixels = _pixels(config, CLIPS)
    if kind == "mvgpt":
        return {"video": pixels,
                "current": tokenizer.tokenize(tf.constant(CURRENT), CURRENT_LEN, add_bos=False,
                                              add_eos=True),
                "future": tokenizer.tokenize(tf.constant(FUTURE), MAX_LEN, add_bos=True,
                                             add_eos=True)}
    return {"video": pixels, "text": tokenizer.tokenize(tf.constant(CAPTIONS), MAX_LEN,
                                                       add_bos=True, add_eos=True)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    sp_model = train_sentencepiece(CAPTIONS + CURRENT + FUTURE, vocab_size=400)
    root = tmp_path_factory.mktemp("video_exports")
    made = {}
    for seed, kind in enumerate(("video_two_tower", "video_mammut", "mvgpt")):
        keras.utils.set_random_seed(seed)
        tokenizer = Tokenizer(sp_model, max_len=MAX_LEN)
        config = _config()
        model = _build(kind, tokenizer)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=False)
        x = _batch(kind, tokenizer, config)
        model.fit(tf.data.Dataset.from_tensors(x).repeat(), steps_per_epoch=TRAIN_STEPS,
                  epochs=1, verbose=0)
        export_dir = str(root / kind / "1")
        assert export_lib.export_video(model, tokenizer, config, export_dir) == export_dir
        pixels = _pixels(config, CLIPS)
        reference = {}
        if kind != "mvgpt":
            reference["embed_video"] = np.asarray(model.embed_image(pixels))
            reference["embed_text"] = np.asarray(model.embed_text(x["text"]))
        decode = decode_settings(model) if kind != "video_two_tower" else None
        if kind == "video_mammut":
            reference["caption_video"] = _strings(tokenizer, model.generate(pixels, **decode))
        if kind == "mvgpt":
            reference["next_utterance"] = _strings(tokenizer, model.generate(
                pixels, x["current"], **decode))
        made[kind] = dict(model=model, export_dir=export_dir, reference=reference)
    spec = root / "spec.json"
    spec.write_text(json.dumps({
        "exports": {k: v["export_dir"] for k, v in made.items()},
        "clips": [[base64.b64encode(f).decode() for f in clip] for clip in CLIPS],
        "captions": CAPTIONS, "current": CURRENT}))
    proc = subprocess.run([sys.executable, "-c", LOADER, str(spec)], capture_output=True,
                          text=True, timeout=600, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return made, json.loads(proc.stdout.strip().splitlines()[-1])


def test_fresh_process_does_not_import_keras_mm(exports):
    assert exports[1]["keras_mm_imported"] is False


def test_signatures_per_model(exports):
    _, results = exports
    assert results["video_two_tower"]["signatures"] == ["embed_text", "embed_video",
                                                        "serving_default"]
    assert results["video_mammut"]["signatures"] == ["caption_video", "embed_text",
                                                     "embed_video", "serving_default"]
    assert results["mvgpt"]["signatures"] == ["next_utterance", "serving_default"]


@pytest.mark.parametrize("kind", ["video_two_tower", "video_mammut"])
def test_embeddings_equal_the_keras_model(exports, kind):
    made, results = exports
    ref, got = made[kind]["reference"], results[kind]
    np.testing.assert_allclose(got["embed_video"], ref["embed_video"], atol=2e-5)
    np.testing.assert_allclose(got["embed_text"], ref["embed_text"], atol=2e-5)
    # The embeddings differ from clip to clip (a constant export would pass the rest).
    video = np.asarray(got["embed_video"])
    assert np.ptp(video, axis=0).max() > 1e-2
    # Longer clips are sampled to num_frames uniformly, as the eval pipeline does.
    config = _config()
    longer = [clip + clip[-1:] * 2 for clip in CLIPS]
    expected = np.asarray(made[kind]["model"].embed_image(_pixels(config, longer)))
    np.testing.assert_allclose(got["longer_clips"], expected, atol=2e-5)
    assert got["embed_none"] == [0, video.shape[1]]


def test_captions_and_next_utterances_equal_the_keras_model(exports):
    made, results = exports
    captions = results["video_mammut"]["caption_video"]
    assert captions == made["video_mammut"]["reference"]["caption_video"]
    assert results["video_mammut"]["serving_default"] == captions
    assert len(set(captions)) > 1
    utterances = results["mvgpt"]["next_utterance"]
    assert utterances == made["mvgpt"]["reference"]["next_utterance"]
    assert len(set(utterances)) > 1


def test_bad_inputs_give_clear_errors(exports):
    _, results = exports
    errors = results["video_two_tower"]["errors"]
    assert errors["bad_frame"][0] == "InvalidArgumentError"
    assert "frames[1, 3] is empty or not a JPEG" in errors["bad_frame"][1]
    assert "no frame" in errors["no_frame"][1]
    assert "text[1] is empty" in errors["empty_text"][1]
    mismatch = results["mvgpt"]["errors"]["mismatch"]
    assert "one transcript per clip" in mismatch[1]


def test_rejects_image_models(tmp_path):
    from keras_mm.models.two_tower import build_two_tower

    tokenizer = Tokenizer(train_sentencepiece(CAPTIONS, vocab_size=300), max_len=MAX_LEN)
    model = build_two_tower("tiny", "softmax", vocab_size=tokenizer.vocab_size, max_len=MAX_LEN)
    with pytest.raises(ValueError, match="not a video model"):
        export_lib.export_video(model, tokenizer, _config(), str(tmp_path / "1"))
