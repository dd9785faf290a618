"""keras_mm.pipelines.datasets, video part: video_tubes folders written here -> batches."""

import functools
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_mm.pipelines import datasets as D
from keras_mm.pipelines import features as F
from keras_mm.pipelines.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_sentencepiece

from .conftest import write_split

FRAMES, HEIGHT, WIDTH, SQUARE, STEP = 12, 32, 40, 8, 2
DIRECTIONS = ("right", "left")
CAPTIONS = {
    "right": ["a square moves to the right", "the box slides right"],
    "left": ["a square moves to the left", "the box slides left"],
}
TRANSCRIPTS = [("now it moves on", "and then it stops"), ("", "")]
HAS_LABEL = F.LABEL in F.keys(F.VIDEO_TUBES)


def moving_square(direction, y0=12):
    """uint8 [T, H, W, 3]: a white 8x8 square moving 2 px a frame; the grey background
    brightens 16 levels a frame, so a frame's background names its index."""
    video = np.zeros([FRAMES, HEIGHT, WIDTH, 3], np.uint8)
    for t in range(FRAMES):
        video[t] = 8 + 16 * t
        x = 4 + STEP * t if direction == "right" else WIDTH - 4 - SQUARE - STEP * t
        video[t, y0:y0 + SQUARE, x:x + SQUARE] = 255
    return video


@functools.lru_cache(maxsize=None)
def record(i, split, label=True):
    """Serialized record i of a split (cached: the same bytes every time)."""
    direction = DIRECTIONS[i % 2]
    current, future = TRANSCRIPTS[(i // 2) % 2]
    frames = [tf.io.encode_jpeg(f, quality=95).numpy() for f in moving_square(direction, 6 + i % 8)]
    rec = {F.VIDEO_FRAMES: frames, F.VIDEO_FPS: 8.0, F.TEXTS: CAPTIONS[direction],
           F.ID: f"{split}-{i}", F.TRANSCRIPT_CURRENT: current, F.TRANSCRIPT_FUTURE: future}
    if HAS_LABEL and label:
        rec[F.LABEL] = i % 2
        rec[F.LABEL_NAME] = direction
    return F.serialize(rec, F.VIDEO_TUBES)


@pytest.fixture(scope="session")
def video_sp_model():
    sentences = [c for cs in CAPTIONS.values() for c in cs] + [t for p in TRANSCRIPTS for t in p]
    return train_sentencepiece([s for s in sentences if s] * 4, 400)


@pytest.fixture
def video_folder(tmp_path, video_sp_model):
    def make(splits=None, shards=2, label=True, classnames=False, name="moving"):
        folder = os.path.join(str(tmp_path), name)
        os.makedirs(folder, exist_ok=True)
        for split, n in (splits or {"train": 8, "validation": 5}).items():
            write_split(folder, split, [record(i, split, label) for i in range(n)], shards)
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
            f.write(video_sp_model)
        if classnames:
            with open(os.path.join(folder, "classnames.txt"), "w") as f:
                f.write("\n".join(DIRECTIONS) + "\n")
        return folder

    return make


SMALL = dict(image_size=24, num_frames=4, max_text_len=32, batch_size=4, shuffle_buffer=8,
             cycle_length=2, value_range="0_1", max_current_len=24)


def config(**kwargs):
    return D.VideoInputConfig(**{**SMALL, **kwargs})


def detok(folder, ids):
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.model"))
    return [t.decode() for t in tok.detokenize(ids).numpy()]


def motion(video):
    """Mean horizontal step per frame of the bright square in float [T, S, S, 3] (0..1), from
    a line fit of its centroid over the frames where it is visible; None if under 2 frames."""
    ts, xs = [], []
    for t, frame in enumerate(video):
        mask = frame.mean(axis=-1) > 0.85
        if mask.sum() >= 2:
            ts.append(t)
            xs.append(np.nonzero(mask)[1].mean())
    if len(ts) < 2:
        return None
    return np.polyfit(ts, xs, 1)[0]


def frame_index(video, value_range=(0.0, 1.0)):
    """Source frame index of each output frame, from its background level (8 + 16 t)."""
    lo, hi = value_range
    corner = (video[:, :3, :3].mean(axis=(1, 2, 3)) - lo) / (hi - lo) * 255
    return np.round((corner - 8) / 16).astype(int).tolist()


def test_detect_kind_reports_video(video_folder, label_as_text_folder):
    assert D.detect_kind(video_folder()) == F.VIDEO_TUBES
    assert D.detect_kind(video_folder(classnames=True, name="with_classes")) == F.VIDEO_TUBES
    assert D.detect_kind(label_as_text_folder({"train": 2}, shards=1)) == F.LABEL_AS_TEXT


def test_train_batches_keys_shapes_dtypes(video_folder):
    folder = video_folder()
    batches = list(D.video_train_dataset(folder, config(transcripts=True)).take(5))
    batch = batches[0]
    assert set(batch) == {"video", "text", "id", "label", "current", "future"}
    assert batch["video"].shape == (4, 4, 24, 24, 3) and batch["video"].dtype == tf.float32
    assert batch["text"].shape == (4, 32) and batch["text"].dtype == tf.int32
    assert batch["label"].shape == (4,) and batch["label"].dtype == tf.int64
    assert batch["id"].shape == (4,) and batch["id"].dtype == tf.string
    assert batch["current"].shape == (4, 24) and batch["current"].dtype == tf.int32
    assert batch["future"].shape == (4, 32) and batch["future"].dtype == tf.int32
    videos = np.concatenate([b["video"].numpy() for b in batches])
    assert videos.min() >= 0.0 and videos.max() <= 1.0 and videos.max() > 0.9
    for b in batches:
        for ident, text, label in zip(b["id"].numpy(), detok(folder, b["text"]),
                                      b["label"].numpy()):
            i = int(ident.decode().split("-")[1])
            assert text in CAPTIONS[DIRECTIONS[i % 2]]            # one of its own captions
            assert label == (i % 2 if HAS_LABEL else -1)
    # without transcripts: no transcript keys
    plain = next(iter(D.video_train_dataset(folder, config())))
    assert set(plain) == {"video", "text", "id", "label"}


def test_train_random_caption_and_window_vary(video_folder):
    folder = video_folder({"train": 2}, shards=1)
    cfg = config(batch_size=2, video_augment="none", num_frames=3, frame_stride=2)
    captions, starts = set(), set()
    for b in D.video_train_dataset(folder, cfg).take(10):
        for video, text in zip(b["video"].numpy(), detok(folder, b["text"])):
            captions.add(text)
            frames = frame_index(video)
            assert frames == [frames[0], frames[0] + 2, frames[0] + 4]   # contiguous, stride 2
            assert 0 <= frames[0] <= FRAMES - 5
            starts.add(frames[0])
    assert captions == {c for cs in CAPTIONS.values() for c in cs}
    assert len(starts) >= 4


def test_train_is_deterministic_for_a_seed(video_folder):
    folder = video_folder({"train": 6}, shards=2)
    cfg = config(deterministic=True, seed=3)
    a = [b["video"].numpy() for b in D.video_train_dataset(folder, cfg).take(3)]
    b = [b["video"].numpy() for b in D.video_train_dataset(folder, cfg).take(3)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))


def test_motion_direction_is_kept_without_flip(video_folder):
    folder = video_folder({"train": 8, "validation": 4})
    cfg = config(num_frames=6, frame_stride=2, crop_scale=(0.6, 1.0), batch_size=8)
    checked = 0
    for b in D.video_train_dataset(folder, cfg).take(4):
        for video, ident in zip(b["video"].numpy(), b["id"].numpy()):
            step = motion(video)
            if step is None:                  # the crop cut the square out of most frames
                continue
            direction = DIRECTIONS[int(ident.decode().split("-")[1]) % 2]
            assert (step > 0) == (direction == "right"), (ident, step)
            checked += 1
    assert checked >= 24
    for b in D.video_eval_dataset(folder, "validation", config(num_frames=6)):
        for video, ident in zip(b["video"].numpy(), b["id"].numpy()):
            direction = DIRECTIONS[int(ident.decode().split("-")[1]) % 2]
            assert (motion(video) > 0) == (direction == "right")


def test_flip_swaps_caption_with_the_motion(video_folder):
    folder = video_folder({"train": 8})
    cfg = config(num_frames=6, video_augment="none", video_flip=True, batch_size=8,
                 transcripts=True)
    swapped = kept = 0
    for b in D.video_train_dataset(folder, cfg).take(5):
        for video, ident, text in zip(b["video"].numpy(), b["id"].numpy(),
                                      detok(folder, b["text"])):
            direction = DIRECTIONS[int(ident.decode().split("-")[1]) % 2]
            said = "right" if "right" in text.split() else "left"
            # whatever the flip did, the caption still describes the clip's motion
            assert (motion(video) > 0) == (said == "right"), (ident, text)
            swapped += said != direction
            kept += said == direction
    assert swapped >= 8 and kept >= 8
    # flip off (the default): captions are never swapped
    for b in D.video_train_dataset(folder, config(batch_size=8)).take(2):
        for ident, text in zip(b["id"].numpy(), detok(folder, b["text"])):
            assert text in CAPTIONS[DIRECTIONS[int(ident.decode().split("-")[1]) % 2]]


def reference_ids(model_bytes, text, length, bos):
    """Independent tokenization with the sentencepiece library: lower-cased (the model was
    trained lower-case), [BOS] pieces EOS, PAD to length."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    ids = ([BOS_ID] if bos else []) + sp.encode(text.lower()) + [EOS_ID]
    return ids + [PAD_ID] * (length - len(ids))


def test_eval_order_uniform_frames_and_transcripts(video_folder, video_sp_model):
    folder = video_folder({"validation": 5})
    cfg = config(batch_size=2, num_frames=5, eval_mode="resize", transcripts=True,
                 eval_texts="all", eval_max_texts=3)
    ds = D.video_eval_dataset(folder, "validation", cfg)
    first, second = list(ds), list(ds)
    assert [b["video"].shape[0] for b in first] == [2, 2, 1]
    assert set(first[0]) == {"video", "text", "texts", "num_texts", "id", "label", "current",
                             "future"}
    assert first[0]["texts"].shape == (2, 3, 32)
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    ids = [i.decode() for b in first for i in b["id"].numpy()]
    assert ids == ["validation-0", "validation-2", "validation-4", "validation-1",
                   "validation-3"]
    for b in first:
        np.testing.assert_array_equal(b["num_texts"].numpy(), [2] * len(b["id"]))
        np.testing.assert_array_equal(b["text"].numpy(), b["texts"].numpy()[:, 0])
        assert (b["texts"].numpy()[:, 2] == PAD_ID).all()
        for video in b["video"].numpy():
            # uniform over 12 frames: floor((2i + 1) * 12 / 10) for i = 0..4
            assert frame_index(video) == [1, 3, 6, 8, 10]
        for ident, text, current, future in zip(b["id"].numpy(), detok(folder, b["text"]),
                                                b["current"].numpy(), b["future"].numpy()):
            i = int(ident.decode().split("-")[1])
            assert text == CAPTIONS[DIRECTIONS[i % 2]][0]        # the canonical caption
            cur, fut = TRANSCRIPTS[(i // 2) % 2]
            assert current.tolist() == reference_ids(video_sp_model, cur, 24, bos=False)
            assert future.tolist() == reference_ids(video_sp_model, fut, 32, bos=True)
    # an empty transcript: EOS alone / BOS EOS
    by_id = {i.decode(): (c, f) for b in first
             for i, c, f in zip(b["id"].numpy(), b["current"].numpy(), b["future"].numpy())}
    current, future = by_id["validation-2"]
    assert current.tolist() == [EOS_ID] + [PAD_ID] * 23
    assert future.tolist() == [BOS_ID, EOS_ID] + [PAD_ID] * 30


def test_eval_first_caption_center_crop(video_folder):
    folder = video_folder({"validation": 3}, shards=1)
    cfg = config(batch_size=3, value_range="-1_1", eval_resize_ratio=1.0)
    batch = next(iter(D.video_eval_dataset(folder, "validation", cfg)))
    assert set(batch) == {"video", "text", "id", "label"}
    assert batch["video"].shape == (3, 4, 24, 24, 3)
    # 32 x 40 frames: short side 32 -> 24 (x 0.75) gives 24 x 30, then central 24 x 24 (cols 3..)
    source = moving_square("right", 6).astype(np.float32)
    indices = [1, 4, 7, 10]                                         # uniform, 4 of 12
    expected = tf.image.resize(source[indices], [24, 30]).numpy()[:, :, 3:27]
    expected = np.clip(np.round(expected), 0, 255) / 127.5 - 1
    assert np.abs(batch["video"][0].numpy() - expected).mean() < 0.03


def test_missing_label_is_minus_one(video_folder):
    folder = video_folder({"validation": 2}, shards=1, label=False, name="unlabelled")
    batch = next(iter(D.video_eval_dataset(folder, "validation", config())))
    np.testing.assert_array_equal(batch["label"].numpy(), [-1, -1])


def test_caption_eval_dataset(video_folder):
    folder = video_folder({"validation": 3}, shards=1)
    ds = D.video_caption_eval_dataset(folder, "validation", config(batch_size=2, transcripts=True))
    batches = list(ds)
    batch = batches[0]
    assert set(batch) == {"video", "id", "label", "texts", "current", "transcript/current",
                          "transcript/future"}
    assert batch["video"].shape == (2, 4, 24, 24, 3)
    assert batch["texts"].dtype == tf.string and batch["texts"].shape == (2, 2)
    assert [t.decode() for t in batch["texts"].numpy()[1]] == CAPTIONS["left"]
    assert batch["transcript/future"].numpy().tolist() == [b"and then it stops"] * 2
    assert batches[1]["transcript/current"].numpy().tolist() == [b""]
    assert batch["current"].shape == (2, 24)
    plain = next(iter(D.video_caption_eval_dataset(folder, "validation", config())))
    assert set(plain) == {"video", "id", "label", "texts"}


def test_clear_errors(video_folder, label_as_text_folder):
    folder = video_folder({"train": 2}, shards=1)
    with pytest.raises(TypeError, match="InputConfig"):
        D.video_train_dataset(folder, {"image_size": 16})
    with pytest.raises(ValueError, match="render_text does not apply to video"):
        D.video_train_dataset(folder, config(render_text=True))
    with pytest.raises(ValueError, match="prompt_mixture does not apply to video"):
        D.video_eval_dataset(folder, "train", config(prompt_mixture="caption_qa"))
    image_folder = label_as_text_folder({"train": 2}, shards=1)
    with pytest.raises(ValueError, match="not video_tubes"):
        D.video_train_dataset(image_folder, config())
    with pytest.raises(ValueError, match="temporal_sampling"):
        config(temporal_sampling="tsn")
    with pytest.raises(ValueError, match="eval_temporal_sampling"):
        config(eval_temporal_sampling="random")
    with pytest.raises(ValueError, match="num_frames"):
        config(num_frames=0)
    with pytest.raises(ValueError, match="video_augment"):
        config(video_augment="randaugment")
