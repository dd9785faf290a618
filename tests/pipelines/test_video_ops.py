"""keras_mm.pipelines.ops.video: frame decode, temporal sampling, clip-wide crops and flips."""

import re

import numpy as np
import pytest
import tensorflow as tf

from keras_mm.pipelines.ops import video as V


def coordinate_video(frames, height, width):
    """uint8 [T, H, W, 3] whose pixel (t, y, x) is (y, x, t): every pixel names its place."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    return np.stack([y, x, t], axis=-1).astype(np.uint8)


def textured_frames(frames, height=24, width=32):
    """Smooth, distinct frames (JPEG-friendly): a colour gradient shifted by 9 grey levels a
    frame -> uint8 [T, H, W, 3]."""
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    out = []
    for t in range(frames):
        rgb = np.stack([40 + 150 * y, 40 + 150 * x, 40 + 100 * (x + y) / 2], axis=-1) + 9 * t
        out.append(np.clip(rgb, 0, 255).round().astype(np.uint8))
    return np.stack(out)


def seed(a, b=0):
    return tf.constant([a, b], tf.int64)


def jpegs(video):
    return [tf.io.encode_jpeg(frame, quality=95).numpy() for frame in video]


OPS = {
    "decode_frames": lambda: V.decode_frames(),
    "sample_uniform": lambda: V.sample_frames(4, "uniform"),
    "sample_random": lambda: V.sample_frames(3, "random", stride=2, indices_key="idx"),
    "sample_center": lambda: V.sample_frames(3, "center", stride=2),
    "sample_bytes": lambda: V.sample_frames(3, "random", key="video/frames"),
    "resize": lambda: V.resize((20, 28)),
    "resize_small": lambda: V.resize_small(16),
    "central_crop": lambda: V.central_crop(10),
    "resize_center_crop": lambda: V.resize_center_crop(16, 0.875),
    "random_crop": lambda: V.random_crop((10, 12)),
    "random_resized_crop": lambda: V.random_resized_crop(16),
    "random_flip": lambda: V.random_flip(text_keys=("texts",), flag_key="flipped"),
    "value_range": lambda: V.value_range(),
    "normalize_imagenet": lambda: V.normalize_imagenet(),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_same_eagerly_and_in_tf_data(name, eager_and_tfdata):
    video = textured_frames(7)
    features = {"video": tf.constant(video), "video/frames": tf.constant(jpegs(video)),
                "texts": tf.constant(["it moves left", "then right"]), "_seed": seed(11, 5)}
    for salt in range(3):   # several seeds: the random ops' both outcomes get compared
        features["_seed"] = seed(11 + salt, 5)
        eager, graph = eager_and_tfdata(OPS[name](), features)
        assert eager.keys() == graph.keys()
        for key in eager:
            assert eager[key].dtype == graph[key].dtype
            np.testing.assert_array_equal(eager[key], graph[key], err_msg=f"{name}: {key}")


def test_decode_frames_jpeg_png_and_unknown_length():
    video = textured_frames(5)
    out = V.decode_frames()({"video/frames": tf.constant(jpegs(video))})
    assert out["video"].dtype == tf.uint8 and out["video"].shape == video.shape
    assert "video/frames" in out                                           # input kept
    err = np.abs(out["video"].numpy().astype(float) - video)
    assert err.mean() < 2.0 and err.max() < 30
    # every decoded frame is closest to its own source frame (order kept)
    dists = np.abs(out["video"].numpy()[:, None].astype(float) - video[None]).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(dists.argmin(axis=1), np.arange(5))
    png = [tf.io.encode_png(frame).numpy() for frame in video]
    np.testing.assert_array_equal(V.decode_frames()({"video/frames": tf.constant(png)})["video"],
                                  video)                                   # lossless
    # graph with T unknown when tracing
    gen = tf.data.Dataset.from_generator(lambda: iter([png[:3], png]),
                                         output_signature=tf.TensorSpec([None], tf.string))
    ds = gen.map(lambda frames: V.decode_frames()({"video/frames": frames})["video"])
    assert ds.element_spec.shape.as_list() == [None, None, None, 3]
    shapes = [v.shape for v in ds]
    assert shapes == [(3, 24, 32, 3), (5, 24, 32, 3)]


def frame_numbers(video):
    """Which source frame each output frame is, from the coordinate video's third channel."""
    return video[:, 0, 0, 2].astype(int).tolist()


@pytest.mark.parametrize("length,num,expected", [
    (10, 4, [1, 3, 6, 8]),            # floor((2i + 1) * 10 / 8)
    (16, 4, [2, 6, 10, 14]),
    (7, 7, [0, 1, 2, 3, 4, 5, 6]),
    (9, 2, [2, 6]),                   # floor(9 / 4), floor(27 / 4)
    (3, 5, [0, 1, 2, 2, 2]),          # shorter clip: all frames, then the last one repeated
    (1, 3, [0, 0, 0]),
])
def test_uniform_sampling_picks_the_hand_computed_frames(length, num, expected):
    video = coordinate_video(length, 4, 5)
    out = V.sample_frames(num, "uniform", indices_key="idx")({"video": tf.constant(video)})
    assert out["video"].shape == (num, 4, 5, 3)
    assert frame_numbers(out["video"].numpy()) == expected
    assert out["idx"].numpy().tolist() == expected
    # the same indices on the encoded bytes, before decoding
    names = tf.constant([f"frame{i}".encode() for i in range(length)])
    sampled = V.sample_frames(num, "uniform", key="video/frames")({"video/frames": names})
    assert sampled["video/frames"].numpy().tolist() == [f"frame{i}".encode() for i in expected]


@pytest.mark.parametrize("length,num,stride,expected", [
    (20, 4, 2, [6, 8, 10, 12]),       # span 7, start (20 - 7) // 2 = 6
    (8, 4, 1, [2, 3, 4, 5]),
    (5, 4, 2, [0, 2, 4, 4]),          # window longer than the clip: last frame repeated
])
def test_center_sampling(length, num, stride, expected):
    out = V.sample_frames(num, "center", stride=stride)({"video": coordinate_video(length, 2, 2)})
    assert frame_numbers(out["video"].numpy()) == expected


def test_random_sampling_is_a_strided_window_inside_the_clip():
    length, num, stride = 20, 4, 3                    # span 10: starts 0..10
    video = tf.constant(coordinate_video(length, 2, 2))
    op = V.sample_frames(num, "random", stride=stride, indices_key="idx")
    starts = set()
    for i in range(120):
        out = op({"video": video, "_seed": seed(i, 3)})
        frames = frame_numbers(out["video"].numpy())
        assert frames == out["idx"].numpy().tolist()
        start = frames[0]
        assert frames == [start + stride * k for k in range(num)]
        assert 0 <= start and frames[-1] < length
        starts.add(start)
        # deterministic: the same seed gives the same window
        again = op({"video": video, "_seed": seed(i, 3)})["idx"].numpy().tolist()
        assert again == frames
    assert starts == set(range(11))                   # every window position is reachable


def test_random_sampling_of_a_short_clip_repeats_the_last_frame():
    op = V.sample_frames(5, "random", stride=2)
    for i in range(10):
        out = op({"video": coordinate_video(4, 2, 2), "_seed": seed(i)})
        assert frame_numbers(out["video"].numpy()) == [0, 2, 3, 3, 3]


def test_sampling_errors():
    with pytest.raises(ValueError, match="sampling mode"):
        V.sample_frames(4, "tsn")
    with pytest.raises(ValueError, match=">= 1"):
        V.sample_frames(0)
    with pytest.raises(KeyError, match="_seed"):
        V.sample_frames(2, "random")({"video": tf.zeros([5, 2, 2, 3], tf.uint8)})
    with pytest.raises(tf.errors.InvalidArgumentError, match="no frame"):
        V.sample_frames(2)({"video": tf.zeros([0, 2, 2, 3], tf.uint8)})


def windows(video):
    """(top, left, height, width) of the source window of every frame of a coordinate video."""
    out = []
    for frame in video:
        rows, cols = frame[..., 0].astype(int), frame[..., 1].astype(int)
        out.append((rows.min(), cols.min(), rows.max() - rows.min() + 1,
                    cols.max() - cols.min() + 1))
    return out


def test_random_crop_is_one_box_for_every_frame():
    source = coordinate_video(5, 30, 40)
    op = V.random_crop((12, 16))
    boxes = set()
    for i in range(40):
        out = op({"video": tf.constant(source), "_seed": seed(i)})["video"].numpy()
        assert out.shape == (5, 12, 16, 3)
        top, left = int(out[0, 0, 0, 0]), int(out[0, 0, 0, 1])
        assert 0 <= top <= 30 - 12 and 0 <= left <= 40 - 16
        # every frame is the same crop of its own source frame
        np.testing.assert_array_equal(out, source[:, top:top + 12, left:left + 16])
        boxes.add((top, left))
    assert len(boxes) >= 30


def test_random_resized_crop_is_one_box_for_every_frame():
    frames, height, width, size = 4, 60, 90, 96   # size >= window: nearest upsampling is exact
    source = coordinate_video(frames, height, width)
    op = V.random_resized_crop(size, scale=(0.2, 0.6), ratio=(0.5, 2.0), method="nearest")
    boxes = set()
    for i in range(25):
        out = op({"video": tf.constant(source), "_seed": seed(i)})["video"].numpy()
        assert out.shape == (frames, size, size, 3) and out.dtype == np.uint8
        per_frame = windows(out)
        assert len(set(per_frame)) == 1                               # one box for the clip
        top, left, h, w = per_frame[0]
        assert top + h <= height and left + w <= width
        assert 0.18 <= h * w / (height * width) <= 0.62
        assert frame_numbers(out) == list(range(frames))              # frame order kept
        # identical across frames up to the frame channel
        np.testing.assert_array_equal(out[..., :2],
                                      np.broadcast_to(out[:1, ..., :2], out[..., :2].shape))
        boxes.add(per_frame[0])
    assert len(boxes) >= 20


def test_central_crop_resize_and_resize_center_crop():
    source = coordinate_video(3, 31, 50)
    out = V.central_crop((11, 20))({"video": tf.constant(source)})["video"].numpy()
    np.testing.assert_array_equal(out, source[:, 10:21, 15:35])
    out = V.resize_center_crop(20, 0.5)({"video": tf.constant(coordinate_video(3, 40, 80))})
    # short side 40 -> 40 (no change), central 20 x 20 of every frame
    np.testing.assert_array_equal(out["video"].numpy(),
                                  coordinate_video(3, 40, 80)[:, 10:30, 30:50])
    small = V.resize_small(10)({"video": tf.zeros([6, 20, 61, 3], tf.uint8)})["video"]
    assert small.shape == (6, 10, 30) + (3,) and small.dtype == tf.uint8   # round(30.5) = 30
    frames = textured_frames(3)
    resized = V.resize((12, 16))({"video": tf.constant(frames)})["video"].numpy()
    for t in range(3):   # each frame resized on its own gives the same
        expected = tf.image.resize(frames[t].astype(np.float32), [12, 16]).numpy()
        np.testing.assert_array_equal(resized[t], np.clip(np.round(expected), 0, 255))
    with pytest.raises(ValueError, match="smaller than the crop"):
        V.central_crop(40)({"video": tf.zeros([2, 30, 50, 3], tf.uint8)})
    with pytest.raises(ValueError, match="smaller than the crop"):
        V.random_crop(40)({"video": tf.zeros([2, 30, 50, 3], tf.uint8), "_seed": seed(0)})


def swap_reference(text):
    """Independent left/right mirror of a caption: one regex pass with a lookup table."""
    table = {"left": "right", "right": "left", "Left": "Right", "Right": "Left",
             "LEFT": "RIGHT", "RIGHT": "LEFT"}

    def repl(match):
        return table[match.group(1)] + (match.group(2) or "")

    text = re.sub(r"\b(left|right|Left|Right)(wards?)?\b", repl, text)
    return re.sub(r"\b(LEFT|RIGHT)(WARDS?)?\b", repl, text)


CAPTIONS = [
    "a 4 moves to the left while a 9 moves right",
    "Left to right, then right to left.",
    "it turns RIGHT, then LEFT",
    "drifting leftward and rightwards",
    "the left-hand digit moves to the upper right",
    "bright lights, leftover copyright",                  # not whole words: untouched
    "no direction here",
    "",
]


def test_swap_left_right_whole_words_both_directions():
    swapped = V.swap_left_right(tf.constant(CAPTIONS)).numpy()
    assert [s.decode() for s in swapped] == [swap_reference(c) for c in CAPTIONS]
    assert swapped[0] == b"a 4 moves to the right while a 9 moves left"
    assert swapped[5] == CAPTIONS[5].encode()
    twice = V.swap_left_right(tf.constant(swapped)).numpy()
    assert [s.decode() for s in twice] == CAPTIONS                    # an involution
    assert V.swap_left_right(tf.constant("left")).numpy() == b"right"   # any shape


def test_random_flip_mirrors_every_frame_and_swaps_the_caption():
    source = coordinate_video(4, 6, 9)
    texts = tf.constant(CAPTIONS[:3])
    op = V.random_flip(text_keys=("texts", "absent_key"), flag_key="flipped")
    outcomes = []
    for i in range(40):
        out = op({"video": tf.constant(source), "texts": texts, "_seed": seed(i, 2)})
        video, captions = out["video"].numpy(), [t.decode() for t in out["texts"].numpy()]
        assert "absent_key" not in out
        if out["flipped"].numpy():
            np.testing.assert_array_equal(video, source[:, :, ::-1])   # every frame mirrored
            assert captions == [swap_reference(c) for c in CAPTIONS[:3]]
        else:
            np.testing.assert_array_equal(video, source)
            assert captions == CAPTIONS[:3]
        outcomes.append(bool(out["flipped"].numpy()))
    assert 8 <= sum(outcomes) <= 32
    # without text keys the text is never touched, though the video flips
    plain = V.random_flip()
    flipped_any = False
    for i in range(10):
        out = plain({"video": tf.constant(source), "texts": texts, "_seed": seed(i, 2)})
        assert [t.decode() for t in out["texts"].numpy()] == CAPTIONS[:3]
        flipped_any |= not np.array_equal(out["video"].numpy(), source)
    assert flipped_any


def test_value_range_and_imagenet():
    video = np.array([[[[0, 128, 255]]], [[[255, 0, 0]]]], np.uint8)          # [2, 1, 1, 3]
    out = V.value_range()({"video": tf.constant(video)})["video"].numpy()
    assert out.dtype == np.float32 and out.shape == (2, 1, 1, 3)
    np.testing.assert_allclose(out, video / 255.0 * 2 - 1, atol=1e-6)
    out = V.normalize_imagenet()({"video": tf.constant(video)})["video"].numpy()
    expected = (video / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
