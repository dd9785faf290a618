"""moving-digits: frames, motion, captions, transcripts and labels checked independently.

Expected values come from the test's own computations: each source digit's split from
label-as-text's digits source, frames re-rendered here with PIL from the sklearn digits, motion
read from the pixels (centroid of the ink per frame), captions and transcripts parsed with
regular expressions written from the grammar in the module docstring.
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from keras_mm.beam_jobs import job_flags, moving_digits, video_tubes

SPLITS = ("train", "validation", "test")
DIRECTIONS = ("left", "right", "up", "down")
UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PHRASE = {"to the left": "left", "to the right": "right", "up": "up", "down": "down"}
ADVERB = {"slowly": "slow", "quickly": "fast"}
PX = {"slow": 1, "fast": 2}
D = r"(an?) (\d)"
MOTION = r"(to the left|to the right|up|down)"
SPEED = r"(slowly|quickly)"


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


@pytest.fixture(scope="module")
def label_as_text_split():
    from keras_mm.beam_jobs import label_as_text

    fn = label_as_text._DigitsCandidates((0.8, 0.1, 0.1), ["a {}"], ["the {}"])
    fn.setup()
    return {int(c.id.split("-")[1]): c.split for c in fn.process((0, 1797))}


def _clips(split="train", n=100, seed=0, **kw):
    return [moving_digits.generate_clip(split, i, seed=seed, **kw) for i in range(n)]


def _render(layout, images, s, t):
    """The clip re-rendered here: PIL bilinear digits, pasted with max at each frame's corner."""
    frames = np.zeros((t, s, s), np.uint8)
    for item in layout:
        grey = np.round(images[item["source"]] * 255 / 16).astype(np.uint8)
        side = item["side"]
        sprite = np.asarray(Image.fromarray(grey).resize((side, side), Image.BILINEAR))
        ux, uy = UNIT[item["direction"]]
        for f in range(t):
            x = item["x0"] + f * PX[item["speed"]] * ux
            y = item["y0"] + f * PX[item["speed"]] * uy
            assert 0 <= x <= s - side and 0 <= y <= s - side, (item, f)   # path inside
            frames[f, y:y + side, x:x + side] = np.maximum(frames[f, y:y + side, x:x + side],
                                                           sprite)
    return frames


def _centroids(frames):
    """``[T, 2]`` (x, y) ink centroid of each grey frame."""
    ys, xs = np.mgrid[:frames.shape[1], :frames.shape[2]]
    mass = frames.reshape(len(frames), -1).astype(np.float64).sum(1)
    return np.stack([(frames * xs).reshape(len(frames), -1).sum(1) / mass,
                     (frames * ys).reshape(len(frames), -1).sum(1) / mass], axis=1)


def _article_ok(article, digit):
    return article == ("an" if digit == "8" else "a")


# --------------------------------------------------------------------------- frames and motion


@pytest.mark.parametrize("split", SPLITS)
def test_clips_use_only_their_splits_digits(split, label_as_text_split, sklearn_digits):
    _, labels = sklearn_digits
    counts = {1: 0, 2: 0}
    for clip in _clips(split, n=150):
        sources = [item["source"] for item in clip.layout]
        counts[len(sources)] += 1
        assert len(set(sources)) == len(sources)
        assert all(label_as_text_split[i] == split for i in sources), (clip.id, sources)
        assert all(item["digit"] == labels[item["source"]] for item in clip.layout)
    assert min(counts.values()) > 40, counts


@pytest.mark.parametrize("canvas_size, num_frames", [(32, 8), (48, 12)])
def test_frames_are_the_layout(canvas_size, num_frames, sklearn_digits):
    images, _ = sklearn_digits
    s = canvas_size
    small, large = (s // 4, round(5 * s / 16)), (round(3 * s / 8), round(7 * s / 16))
    if s == 32:
        assert (small, large) == ((8, 10), (12, 14))
    seen = set()
    for clip in _clips("validation", n=80, canvas_size=s, num_frames=num_frames):
        frames = clip.frames
        assert frames.shape == (num_frames, s, s, 3) and frames.dtype == np.uint8
        assert (frames[..., 0] == frames[..., 1]).all() and (frames[..., 0] == frames[..., 2]).all()
        sizes = [item["size"] for item in clip.layout]
        assert sizes in (["large", "small"], ["small"], ["large"]), sizes
        for item in clip.layout:
            lo, hi = small if item["size"] == "small" else large
            assert lo <= item["side"] <= hi
            seen.add((item["direction"], item["speed"]))
        np.testing.assert_array_equal(frames[..., 0], _render(clip.layout, images, s, num_frames))
    assert len(seen) == 8   # every direction at every speed


def test_single_digit_ink_moves_in_the_labelled_direction():
    """Read from the pixels alone: the ink centroid moves by the speed, in the label's way."""
    checked = 0
    for clip in _clips("test", n=120):
        if len(clip.layout) != 1:
            continue
        c = _centroids(clip.frames[..., 0])
        step = np.diff(c, axis=0)                        # [T-1, 2]
        (dx, dy), = [step.mean(0)]
        word = (("right" if dx > 0 else "left") if abs(dx) > abs(dy)
                else ("down" if dy > 0 else "up"))
        assert word == clip.label_name == DIRECTIONS[clip.label], (clip.id, dx, dy)
        assert np.allclose(np.abs(step).sum(1), PX[clip.layout[0]["speed"]], atol=1e-6)
        checked += 1
    assert checked > 40


def test_primary_digit_moves_in_the_labelled_direction(sklearn_digits):
    """Two-digit clips: the large digit rendered alone moves the label's way."""
    images, _ = sklearn_digits
    checked = 0
    for clip in _clips("train", n=80):
        if len(clip.layout) != 2:
            continue
        primary = clip.layout[0]
        assert primary["size"] == "large" and clip.layout[1]["size"] == "small"
        alone = _render([primary], images, 32, 8)
        dx, dy = np.diff(_centroids(alone), axis=0).mean(0)
        assert (np.sign(dx), np.sign(dy)) == UNIT[clip.label_name], clip.id
        assert clip.label == DIRECTIONS.index(clip.label_name)
        checked += 1
    assert checked > 20


def test_clips_are_deterministic_per_seed_and_index():
    a, b, other = _clips(n=20), _clips(n=20), _clips(n=20, seed=1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.frames, y.frames)
        assert (x.layout, x.captions, x.transcript_current, x.transcript_future, x.label) == (
            y.layout, y.captions, y.transcript_current, y.transcript_future, y.label)
    assert sum(x.layout != z.layout for x, z in zip(a, other)) >= 18
    assert len({x.frames.tobytes() for x in a}) == 20


def test_geometry_that_does_not_fit_is_rejected():
    with pytest.raises(ValueError, match="canvas"):
        moving_digits.check_geometry(32, 12)      # 14 + 2 * 11 > 32
    with pytest.raises(ValueError):
        moving_digits.check_geometry(16, 4)
    moving_digits.check_geometry(32, 10)          # 14 + 18 = 32 fits


# --------------------------------------------------------------------------- text


def _motion_of(item):
    return item["direction"], item["speed"]


def test_captions_and_transcripts_are_true():
    kinds = set()
    for clip in _clips("train", n=200):
        caps, layout = clip.captions, clip.layout
        assert all(c == c.lower() and "  " not in c for c in caps)
        assert len(set(caps)) == len(caps)
        if len(layout) == 1:
            (a,) = layout
            assert len(caps) == 3
            m = re.fullmatch(rf"a (small|large) (\d) moves {MOTION} {SPEED}", caps[0])
            assert m and (m[1], int(m[2])) == (a["size"], a["digit"]), caps[0]
            assert (PHRASE[m[3]], ADVERB[m[4]]) == _motion_of(a)
            m = re.fullmatch(rf"{D} moves {MOTION}", caps[1])
            assert m and _article_ok(m[1], m[2]) and int(m[2]) == a["digit"]
            assert PHRASE[m[3]] == a["direction"]
            m = re.fullmatch(rf"{D} moves {SPEED}", caps[2])
            assert m and int(m[2]) == a["digit"] and ADVERB[m[3]] == a["speed"]
            m = re.fullmatch(r"here is a (small|large) (\d)", clip.transcript_current)
            assert m and (m[1], int(m[2])) == (a["size"], a["digit"])
            m = re.fullmatch(rf"it moves {MOTION} {SPEED}", clip.transcript_future)
            assert m and (PHRASE[m[1]], ADVERB[m[2]]) == _motion_of(a)
            kinds.add(1)
        else:
            p, q = layout
            assert len(caps) == 4
            m = re.fullmatch(rf"a large (\d) moves {MOTION} {SPEED} while a small (\d) moves "
                             rf"{MOTION} {SPEED}", caps[0])
            assert m, caps[0]
            assert (int(m[1]), PHRASE[m[2]], ADVERB[m[3]]) == (p["digit"], *_motion_of(p))
            assert (int(m[4]), PHRASE[m[5]], ADVERB[m[6]]) == (q["digit"], *_motion_of(q))
            m = re.fullmatch(rf"a large (\d) moves {MOTION} while a small (\d) moves {MOTION}",
                             caps[1])
            assert m and (int(m[1]), PHRASE[m[2]], int(m[3]), PHRASE[m[4]]) == (
                p["digit"], p["direction"], q["digit"], q["direction"])
            m = re.fullmatch(rf"a small (\d) moves {MOTION} while a large (\d) moves {MOTION}",
                             caps[2])
            assert m and (int(m[1]), PHRASE[m[2]], int(m[3]), PHRASE[m[4]]) == (
                q["digit"], q["direction"], p["digit"], p["direction"])
            m = re.fullmatch(rf"{D} and {D} are moving", caps[3])
            assert m and _article_ok(m[1], m[2]) and _article_ok(m[3], m[4])
            assert (int(m[2]), int(m[4])) == (p["digit"], q["digit"])
            m = re.fullmatch(rf"the large (\d) moves {MOTION} {SPEED}", clip.transcript_current)
            assert m and (int(m[1]), PHRASE[m[2]], ADVERB[m[3]]) == (p["digit"], *_motion_of(p))
            m = re.fullmatch(rf"the small (\d) moves {MOTION} {SPEED}", clip.transcript_future)
            assert m and (int(m[1]), PHRASE[m[2]], ADVERB[m[3]]) == (q["digit"], *_motion_of(q))
            kinds.add(2)
        assert clip.label == DIRECTIONS.index(layout[0]["direction"])
        assert clip.label_name == layout[0]["direction"]
    assert kinds == {1, 2}


def test_future_utterance_is_not_implied_by_the_current_one():
    """Across clips with the same current utterance, the future one still varies."""
    futures = {}
    for clip in _clips("train", n=3000):
        futures.setdefault(clip.transcript_current, set()).add(clip.transcript_future)
    repeated = {c: f for c, f in futures.items() if c.startswith("here is")}
    assert repeated and all(len(f) >= 4 for c, f in repeated.items()), repeated
    shared = [f for c, f in futures.items() if c.startswith("the large") and len(f) > 1]
    assert len(shared) > 20


def test_default_tokenizer_makes_every_word_one_piece():
    import sentencepiece as spm

    from keras_mm.pipelines.tokenizer import train_sentencepiece

    texts = [t for c in _clips("train", n=1000)
             for t in c.captions + [c.transcript_current, c.transcript_future]]
    model = spm.SentencePieceProcessor(model_proto=train_sentencepiece(
        texts, moving_digits.DEFAULT_VOCAB_SIZE, model_type=moving_digits.TOKENIZER_MODEL_TYPE))
    words = {w for t in texts for w in re.findall(r"[a-z0-9]+", t)}
    assert len(words) == 30
    assert [w for w in words if len(model.encode(w)) != 1] == []


# --------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def digits_job(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("moving_digits"))
    summary = video_tubes.run(["--source", "moving-digits", "--out", out, "--num_train", "30",
                               "--num_validation", "6", "--num_test", "10",
                               "--records_per_shard", "16", "--seed", "5"])
    return out, summary


def test_job_writes_the_clips(digits_job):
    import tensorflow as tf

    from keras_mm.pipelines import features as F

    out, s = digits_job
    assert s["splits"] == {"train": 30, "validation": 6, "test": 10}
    assert (s["written"], s["inputs"], s["dead_letters"]["total"], s["consistent"]) == (
        46, 46, 0, True)
    assert s["kind"] == "video_tubes" and s["shards"]["train"] == 2
    with open(os.path.join(out, moving_digits.METADATA_FILE)) as f:
        meta = json.load(f)
    assert meta["clips"] == {"train": 30, "validation": 6, "test": 10}
    assert (meta["canvas_size"], meta["num_frames"], meta["fps"], meta["seed"]) == (32, 8, 8.0, 5)
    assert meta["directions"] == list(DIRECTIONS)
    assert meta["source_digits"] == {"train": 1454, "validation": 174, "test": 169}
    seen = 0
    for split, n in zip(SPLITS, (30, 6, 10)):
        files = tf.io.gfile.glob(os.path.join(out, f"{split}.tfrecord-*"))
        for serialized in tf.data.TFRecordDataset(files):
            r = F.parse(serialized, F.VIDEO_TUBES)
            cid = r["id"].numpy().decode()
            assert cid.startswith(f"moving-{split}-")
            clip = moving_digits.generate_clip(split, int(cid[-6:]), seed=5)
            frames = np.stack([tf.io.decode_jpeg(b).numpy() for b in r["video/frames"]])
            assert frames.shape == (8, 32, 32, 3)
            assert np.abs(frames.astype(float) - clip.frames).mean() < 3
            assert [t.decode() for t in r["texts"].numpy()] == clip.captions
            assert r["transcript/current"].numpy().decode() == clip.transcript_current
            assert r["transcript/future"].numpy().decode() == clip.transcript_future
            assert int(r["label"]) == clip.label and r["label/name"].numpy().decode() == (
                clip.label_name)
            assert float(r["video/fps"]) == 8.0
            seen += 1
    assert seen == 46


def test_job_tokenizer_knows_the_transcripts(digits_job):
    import sentencepiece as spm

    out, _ = digits_job
    tok = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    for text in ("here is a small 3", "it moves to the left quickly"):
        assert not any(p.startswith("<0x") for p in tok.encode(text, out_type=str))
        assert tok.decode(tok.encode(text)) == text


def test_cli_help_and_bad_flags(capsys, tmp_path):
    from keras_mm import cli

    assert cli.main(["data", "video", "--help"]) == 0
    text = capsys.readouterr().out
    for word in ("moving-digits", "sample-gif", "manifest", "--num_frames", "--fps",
                 "--clips_per_video", "--num_train"):
        assert word in text, word
    assert cli.main(["data", "video", "--source", "moving-digits", "--out", str(tmp_path),
                     "--no_such_flag", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kmm: error:") and "--no_such_flag" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--source", "moving-digits", "--input", "x.jsonl"], "--input"),
    (["--source", "manifest"], "needs --input"),
    (["--source", "sample-gif", "--num_train", "5"], "--num_train"),
    (["--source", "moving-digits", "--size", "64"], "--size"),
    (["--source", "moving-digits", "--num_train", "0"], "--num_train"),
    (["--source", "moving-digits", "--num_frames", "12"], "--num_frames"),
    (["--source", "moving-digits", "--canvas_size", "16"], "--canvas_size"),
    (["--source", "moving-digits", "--seed", "-1"], "--seed"),
    (["--source", "moving-digits", "--split_fractions", "1,0,0"], "--split_fractions"),
    (["--source", "sample-gif", "--fps", "0"], "--fps"),
    (["--source", "sample-gif", "--clips_per_video", "0"], "--clips_per_video"),
    (["--source", "sample-gif", "--vocab_size", "100"], "--vocab_size"),
    (["--source", "manifest", "--input", "/no/such.jsonl"], "--input"),
    (["--source", "cats"], "--source"),
])
def test_bad_flags_are_one_line_errors(tmp_path, argv, message):
    with pytest.raises(job_flags.FlagError) as e:
        video_tubes.run(argv + ["--out", str(tmp_path / "out")])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out" / "stats.json")


def test_time_reversed_caption_is_the_caption_of_the_reversed_motion():
    """Every digit of the clip moving the opposite way at the same speed has exactly the
    time-reversed captions; reversing twice gives the caption back."""
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    changed = 0
    for clip in _clips("test", n=60):
        reversed_layout = [dict(item, direction=opposite[item["direction"]])
                           for item in clip.layout]
        expected = moving_digits.captions_for(reversed_layout)
        got = [moving_digits.time_reversed_caption(c) for c in clip.captions]
        assert got == expected
        assert [moving_digits.time_reversed_caption(c) for c in got] == clip.captions
        changed += sum(a != b for a, b in zip(got, clip.captions))
    assert changed > 60
    # whole words only: digits and speeds stay
    assert (moving_digits.time_reversed_caption("a 4 moves up quickly while a small 9 moves "
                                                "to the left slowly")
            == "a 4 moves down quickly while a small 9 moves to the right slowly")
