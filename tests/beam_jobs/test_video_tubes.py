"""video-tubes job: videos written here with PyAV -> records -> frames and transcripts back.

The source videos are written losslessly (PNG codec, RGB) from frames the test draws, so the
expected frames of every clip are picked here by the documented rule (frame ``i`` of a video
at ``r`` fps is shown during ``[i / r, (i + 1) / r)``) and compared with the records' JPEGs up
to JPEG loss. The GIF is checked against TensorFlow's own GIF decoder.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from keras_mm.beam_jobs import dataset_writer, video_tubes
from keras_mm.beam_jobs import records as rec
from keras_mm.pipelines import features as F

H, W = 24, 32
SRC_FPS = 10


def _frames(n, seed):
    """``[n, H, W, 3]`` uint8: a smooth background and a white square moving right 1 px a
    frame, with the frame index in the grey level of the top-left 8x8 block."""
    rng = np.random.default_rng(seed)
    base = rng.integers(30, 200, size=(1, 1, 3))
    ys, xs = np.mgrid[:H, :W]
    out = np.zeros((n, H, W, 3), np.uint8)
    for i in range(n):
        frame = (base + np.stack([xs * 2, ys * 3, (xs + ys + i * 7) % 50], -1)).clip(0, 255)
        frame[6:14, (i % 20):(i % 20) + 8] = 255
        frame[:8, :8] = (i * 6) % 256     # one flat JPEG block: survives the encoding
        out[i] = frame
    return out


def _write_video(path, frames, fps=SRC_FPS):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "rgb24"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def _shown(t, fps=SRC_FPS):
    """Index of the frame shown at time t (s)."""
    return int(math.floor(t * fps + 1e-6))


def _read(out):
    import tensorflow as tf

    records = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(out, "*.tfrecord-*"))):
        for serialized in tf.data.TFRecordDataset(path):
            r = F.parse(serialized, F.VIDEO_TUBES)
            records[r["id"].numpy().decode()] = {
                "frames": np.stack([tf.io.decode_jpeg(b).numpy() for b in r["video/frames"]]),
                "fps": float(r["video/fps"]),
                "texts": [t.decode() for t in r["texts"].numpy()],
                "current": r["transcript/current"].numpy().decode(),
                "future": r["transcript/future"].numpy().decode(),
                "label": int(r["label"]), "label_name": r["label/name"].numpy().decode()}
    return records


SEGMENTS = [(0.0, 1.0, "first we draw a square"), (1.0, 2.6, "then it slides right"),
            (2.6, 4.0, "and now it stops")]


@pytest.fixture(scope="module")
def manifest_job(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    sub = d / "clips"
    sub.mkdir()
    narrated = _frames(40, 0)                       # 4.0 s
    plain = _frames(20, 1)                          # 2.0 s
    _write_video(sub / "narrated.mov", narrated)
    _write_video(d / "plain.mov", plain)
    _write_video(d / "short.mov", _frames(3, 2))    # 0.3 s < one clip (1 s)
    _write_video(d / "late.mov", _frames(20, 3))    # 2 s: its 2nd segment ends at 3 s
    (d / "garbage.mp4").write_bytes(b"\x00\x01 definitely not a video " * 40)
    lines = [
        {"video": "clips/narrated.mov", "captions": ["a square slides"],
         "transcript": [{"start": s, "end": e, "text": t} for s, e, t in SEGMENTS]},
        {"video": str(d / "plain.mov"), "captions": ["a square", "a moving  square"],
         "id": "plain"},
        {"video": "short.mov", "captions": ["too short"], "id": "short"},
        {"video": "late.mov", "captions": ["late"], "id": "late",
         "transcript": [{"start": 0, "end": 1.5, "text": "one"},
                        {"start": 1.5, "end": 3.0, "text": "two"},
                        {"start": 3.0, "end": 3.5, "text": "three"}]},
        {"video": "garbage.mp4", "captions": ["noise"], "id": "garbage"},
        {"video": "missing.mov", "captions": ["gone"], "id": "missing"},
        {"video": "plain.mov", "captions": ["", "   "], "id": "empty"},
        "this is not json",
        {"video": "plain.mov", "captions": ["x"], "transcript": [{"start": 0, "end": 1,
                                                                   "text": "only one"}]},
    ]
    manifest = d / "videos.jsonl"
    manifest.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines)
                        + "\n")
    out = str(d / "out")
    summary = video_tubes.run(["--source", "manifest", "--input", str(manifest), "--out", out,
                               "--num_frames", "5", "--fps", "5", "--clips_per_video", "3",
                               "--jpeg_quality", "95", "--split_fractions", "1,0,0"])
    return out, summary, {"narrated": narrated, "plain": plain}


def test_transcript_clips_cover_their_segments(manifest_job):
    out, _, sources = manifest_job
    records = _read(out)
    narrated = {k: v for k, v in records.items() if k.startswith("vid-")}
    assert len(narrated) == 2                      # a clip per segment with a next one
    by_index = {int(k[-3:]): v for k, v in narrated.items()}
    assert sorted(by_index) == [0, 1]
    for k, r in by_index.items():
        start, end, text = SEGMENTS[k]
        times = [start + i * (end - start) / 5 for i in range(5)]
        expected = sources["narrated"][[_shown(t) for t in times]]
        assert r["frames"].shape == (5, H, W, 3)
        assert np.abs(r["frames"].astype(float) - expected).mean() < 3, k
        # the frame-index marker survives JPEG: the right frames, not neighbours
        marker = r["frames"][:, 2:6, 2:6].mean(axis=(1, 2, 3))     # adjacent frames: 6 apart
        np.testing.assert_allclose(marker, expected[:, 2:6, 2:6].mean(axis=(1, 2, 3)), atol=2)
        assert r["current"] == text and r["future"] == SEGMENTS[k + 1][2]
        assert r["fps"] == pytest.approx(5 / (end - start), rel=1e-6)
        assert r["texts"] == ["a square slides"] and (r["label"], r["label_name"]) == (-1, "")
    assert [_shown(t) for t in (1.0, 1.32, 1.64, 1.96, 2.28)] == [10, 13, 16, 19, 22]


def test_plain_video_gives_evenly_spaced_clips(manifest_job):
    out, _, sources = manifest_job
    records = _read(out)
    for j, start in enumerate((0.0, 0.5, 1.0)):   # (2 s - 1 s clip) spread over 3 clips
        r = records[f"plain-clip{j:03d}"]
        expected = sources["plain"][[_shown(start + i / 5) for i in range(5)]]
        assert np.abs(r["frames"].astype(float) - expected).mean() < 3, j
        assert r["fps"] == 5.0 and r["current"] == "" and r["future"] == ""
        assert r["texts"] == ["a square", "a moving square"]


def test_bad_videos_are_dead_letters_and_counts_add_up(manifest_job):
    out, s, _ = manifest_job
    dead = {d["id"]: d for d in dataset_writer.read_dead_letters(out)}
    reasons = {k: d["reason"] for k, d in dead.items()}
    assert reasons["short"] == rec.VIDEO_TOO_SHORT
    assert reasons["garbage"] == rec.CORRUPT_VIDEO
    assert reasons["missing"] == rec.MISSING_FILE
    assert reasons["empty"] == rec.EMPTY_CAPTION
    assert reasons["late-clip001"] == rec.VIDEO_TOO_SHORT       # segment 1 ends after 2 s
    assert sorted(r for k, r in reasons.items() if k.startswith("line-")) == [
        rec.BAD_SOURCE_LINE] * 2                                 # not JSON; one segment
    assert "missing.mov" in dead["missing"]["detail"]
    records = _read(out)
    assert "late-clip000" in records and "late-clip001" not in records
    assert len(records) == 2 + 3 + 1
    assert s["written"] == 6 and s["dead_letters"]["total"] == len(dead) == 7
    assert s["dead_letters"]["by_reason"] == {
        "bad_source_line": 2, "corrupt_video": 1, "empty_caption": 1, "missing_file": 1,
        "video_too_short": 2}
    assert s["inputs"] == s["written"] + s["dead_letters"]["total"] + s["duplicates"]
    assert s["consistent"] is True and s["splits"]["train"] == 6


def test_folder_opens_with_tfds(manifest_job):
    import tensorflow_datasets as tfds

    out, _, _ = manifest_job
    (example,) = tfds.builder_from_directory(out).as_dataset(split="train").filter(
        lambda e: e["id"] == "plain-clip001").take(1)
    assert example["video"]["frames"].shape == (5,) and int(example["label"]) == -1


def test_no_frames_and_no_video_stream(tmp_path):
    import av

    with av.open(str(tmp_path / "empty.avi"), "w") as container:   # a stream, no frames
        stream = container.add_stream("png", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "rgb24"
        container.start_encoding()
    with av.open(str(tmp_path / "audio.wav"), "w") as container:    # no video stream
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    for name, detail in (("empty.avi", "no frames"), ("audio.wav", "no video stream")):
        assert os.path.getsize(tmp_path / name) > 0
        with pytest.raises(rec.RecordError) as e:
            video_tubes.probe_frames(str(tmp_path / name))
        assert e.value.reason == rec.NO_FRAMES and detail in e.value.detail, name


def test_plan_clips_and_frame_picking():
    opts = video_tubes.VideoOptions(num_frames=4, fps=2, clips_per_video=2)
    plans, short = video_tubes.plan_clips(5.0, (), opts)        # clips of 2 s in 5 s
    assert short == [] and [p.times for p in plans] == [(0, .5, 1, 1.5), (3, 3.5, 4, 4.5)]
    assert video_tubes.plan_clips(1.9, (), opts)[0] == []
    times = np.array([0.0, 0.1, 0.25, 0.4])                     # irregular timestamps
    assert video_tubes.frame_indices(times, [0, 0.05, 0.1, 0.3, 0.39, 0.9]).tolist() == [
        0, 0, 1, 2, 2, 3]


def test_resize_short_side_and_centre_crop():
    frame = np.zeros((20, 40, 3), np.uint8)
    frame[:, 15:25] = 255                                       # a centred vertical bar
    out = video_tubes.resize_frame(frame, 10)
    assert out.shape == (10, 10, 3)
    assert out[:, 4:6].min() > 200 and out[:, :2].max() < 30 and out[:, -2:].max() < 30
    assert video_tubes.resize_frame(frame, 0) is frame


def test_sample_gif_matches_tensorflows_decoder(tmp_path):
    import tensorflow as tf

    path = video_tubes.sample_gif_path()
    reference = tf.io.decode_gif(tf.io.read_file(path)).numpy()
    assert reference.shape == (24, 25, 14, 3)
    pts, times, end = video_tubes.probe_frames(path)
    decoded = video_tubes.decode_frames(path, pts)
    np.testing.assert_array_equal(np.stack([decoded[int(p)] for p in pts]), reference)
    assert end == pytest.approx(24 * 0.07)
    out = str(tmp_path / "gif")
    s = video_tubes.run(["--source", "sample-gif", "--out", out, "--num_frames", "24",
                         "--fps", str(100 / 7), "--jpeg_quality", "100"])
    assert (s["written"], s["splits"]["test"], s["dead_letters"]["total"]) == (1, 1, 0)
    (r,) = _read(out).values()
    assert r["frames"].shape == reference.shape
    assert np.abs(r["frames"].astype(float) - reference).mean() < 3
    assert r["texts"][0] == "a short animated gif"
