"""video-tubes: videos (or built-in clips) -> a video_tubes dataset folder (DESIGN.md contract).

    kmm data video --source manifest --input videos.jsonl --out DIR [--num_frames 8 --fps 8
        --size 224 --clips_per_video 4 --jpeg_quality 95] [beam flags]
    kmm data video --source moving-digits --out DIR [--num_train 20000 --num_test 512 ...]
    kmm data video --source sample-gif --out DIR

Sources, each a PTransform returning ``(candidates, source_dead_letters)`` for
``dataset_writer.BuildDataset(kind=features.VIDEO_TUBES)``:

  ReadVideoManifest  JSON lines ``{"video": PATH, "captions": [...], "transcript": [{"start": s,
                     "end": s, "text": ...}, ...], "id": ...}`` ("transcript" and "id"
                     optional; a relative PATH resolves against the manifest's folder). Videos
                     are decoded with PyAV (FFmpeg ships in its wheels).
  MovingDigits       generated clips of real sklearn digits moving in 4 directions at 2 speeds,
                     with captions, MV-GPT transcripts and a motion label, split by source digit
                     (moving_digits.py).
  SampleGif          scikit-image's animated GIF (``no_time_for_that_tiny.gif``, 24 frames
                     25x14 at 100/7 fps) through the same decoder, in the test split: a decode
                     check that needs no download.

Clips. A video's frames have presentation times ``t_i`` (seconds after its first frame) and it
ends at ``end`` = last frame time + that frame's duration. A clip is ``--num_frames`` (T)
target times; each takes the frame shown at that time (the last frame with ``t_i <= t``), so
any frame rate is resampled by timestamps (frames repeat when the target rate is above the
source's, are skipped when below).

* without a transcript: ``--clips_per_video`` (n) clips of T frames at ``--fps`` (length
  L = T / fps seconds) with evenly spaced starts ``j * (end - L) / (n - 1)`` (one clip:
  centred); target times ``start + k / fps``. A video shorter than L is a dead letter.
* with a transcript (>= 2 segments): one clip per segment that has a next one, covering that
  segment's span ``[start, end)``: target times ``start + k * (end - start) / T``, the record's
  ``video/fps`` = ``T / (end - start)`` (the rate actually sampled), ``transcript/current`` =
  the segment's text and ``transcript/future`` = the next segment's. A segment ending after
  the video is a dead letter (that clip only).

Frames are resized (``--size`` > 0: short side to ``size``, bilinear, then a centre square
crop; 0 keeps the decoded size) and stored as RGB JPEGs (``--jpeg_quality``). Clip ids are
``<video id>-clip<k:03d>`` (video id: the line's ``id``, else ``vid-<hash of path and line>``);
all clips of a video share a split, assigned from a hash of its path (``--split_fractions``), so
clips of one video never straddle train and test.

Dead letters (reason: when): ``bad_source_line``: not JSON, missing / ill-typed fields, a
transcript with fewer than 2 segments or a segment with ``end <= start``; ``empty_caption``: no
non-empty caption; ``missing_file``; ``read_error``; ``corrupt_video``: FFmpeg cannot open or
decode it; ``no_frames``: no video stream or no frames; ``video_too_short``: shorter than one
clip, or a transcript segment past its end. Counts add up in ``stats.json``:
``inputs = written + dead letters + duplicates`` (a video's failure before clipping counts once).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from keras_mm.beam_jobs import dataset_writer, image_text, job_flags, moving_digits
from keras_mm.beam_jobs import records as rec
from keras_mm.pipelines import features

SOURCES = ("manifest", "moving-digits", "sample-gif")
BUILT_IN_SOURCES = ("moving-digits", "sample-gif")
SAMPLE_GIF = "no_time_for_that_tiny.gif"
SAMPLE_GIF_ID = "sample-gif"
SAMPLE_GIF_CAPTIONS = ("a short animated gif", "a tiny looping animation")
DEFAULT_RECORDS_PER_SHARD = 1000
# moving-digits only flags (default SUPPRESS: giving one with another source is an error)
DIGIT_FLAGS = {"num_train": moving_digits.DEFAULT_COUNTS["train"],
               "num_validation": moving_digits.DEFAULT_COUNTS["validation"],
               "num_test": moving_digits.DEFAULT_COUNTS["test"],
               "canvas_size": moving_digits.DEFAULT_CANVAS_SIZE, "seed": 0}
# decoded-video only flags
DECODE_FLAGS = {"size": 0, "clips_per_video": 1}
_EPS = 1e-6          # seconds: float slack when comparing target and frame times
_END_SLACK = 1e-3    # seconds a transcript segment may end after the video


# ---------------------------------------------------------------------------------------------
# Options, entries, clip plans


@dataclasses.dataclass(frozen=True)
class VideoOptions:
    """How clips are cut and stored: T frames at ``fps``, ``clips_per_video`` clips without a
    transcript, frames resized to ``size`` (0: kept), JPEG ``jpeg_quality``."""

    num_frames: int = moving_digits.DEFAULT_NUM_FRAMES
    fps: float = moving_digits.DEFAULT_FPS
    size: int = 0
    clips_per_video: int = 1
    jpeg_quality: int = 95

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")
        if self.clips_per_video < 1:
            raise ValueError(f"clips_per_video must be >= 1, got {self.clips_per_video}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


@dataclasses.dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


@dataclasses.dataclass(frozen=True)
class VideoEntry:
    """One manifest line: the video's uri, its id and split, captions and transcript."""

    uri: str
    id: str
    captions: Tuple[str, ...]
    transcript: Tuple[Segment, ...] = ()
    split: Optional[str] = None
    source: str = ""


@dataclasses.dataclass(frozen=True)
class ClipPlan:
    """One clip to cut: its index in the video, target times ``[T]`` (s), the fps stored,
    and its transcript texts."""

    index: int
    times: Tuple[float, ...]
    fps: float
    current: str = ""
    future: str = ""


def plan_clips(end: float, transcript: Sequence[Segment], options: VideoOptions
               ) -> Tuple[List[ClipPlan], List[Tuple[int, str]]]:
    """The clips of a video ending at ``end`` s (module docstring).

    Returns ``(plans, too_short)``: ``too_short`` lists ``(clip index, detail)`` of clips that
    do not fit in the video; without a transcript, a video shorter than one clip gives
    ``([], [(-1, detail)])``.
    """
    t = options.num_frames
    if transcript:
        plans, too_short = [], []
        for k, (seg, nxt) in enumerate(zip(transcript[:-1], transcript[1:])):
            if seg.end > end + _END_SLACK:
                too_short.append((k, f"segment {k} [{seg.start}, {seg.end}) s ends after the "
                                     f"video ({end:.3f} s)"))
                continue
            step = (seg.end - seg.start) / t
            plans.append(ClipPlan(k, tuple(seg.start + i * step for i in range(t)), t / (
                seg.end - seg.start), seg.text, nxt.text))
        return plans, too_short
    length = t / options.fps
    if end + _EPS < length:
        return [], [(-1, f"video lasts {end:.3f} s, a clip of {t} frames at {options.fps:g} "
                         f"fps needs {length:.3f} s")]
    n = options.clips_per_video
    spare = max(end - length, 0.0)
    starts = [spare / 2] if n == 1 else [j * spare / (n - 1) for j in range(n)]
    return [ClipPlan(j, tuple(s + i / options.fps for i in range(t)), options.fps)
            for j, s in enumerate(starts)], []


def frame_indices(frame_times: np.ndarray, targets: Sequence[float]) -> np.ndarray:
    """For each target time, the index of the frame shown then (last ``t_i <= t``)."""
    idx = np.searchsorted(frame_times, np.asarray(targets, np.float64) + _EPS, side="right") - 1
    return np.maximum(idx, 0)


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> ``[size, size, 3]``: short side to ``size`` (bilinear), centre
    crop; ``size`` 0 returns the frame."""
    if not size:
        return frame
    from PIL import Image

    h, w = frame.shape[:2]
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = Image.fromarray(frame).resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


# ---------------------------------------------------------------------------------------------
# Decoding with PyAV


def _open(uri: str):
    """An av container for a local path or any Beam filesystem URI; RecordError otherwise."""
    import av

    try:
        if image_text.has_scheme(uri):
            return av.open(io.BytesIO(rec.read_bytes(uri)))
        if not os.path.exists(uri):
            raise rec.RecordError(rec.MISSING_FILE, uri)
        if not os.access(uri, os.R_OK) or os.path.isdir(uri):
            raise rec.RecordError(rec.READ_ERROR, f"{uri}: not a readable file")
        return av.open(uri)
    except rec.RecordError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise rec.RecordError(rec.CORRUPT_VIDEO, f"{uri}: {type(e).__name__}: {e}") from e


def probe_frames(uri: str) -> Tuple[np.ndarray, np.ndarray, float]:
    """Demuxes (no decoding) a video's first video stream.

    Returns ``(pts [N] int64, times [N] s after the first frame, end s)``, sorted by time.
    Raises RecordError (missing_file, read_error, corrupt_video, no_frames).
    """
    import av

    with _open(uri) as container:
        if not container.streams.video:
            raise rec.RecordError(rec.NO_FRAMES, f"{uri}: no video stream")
        stream = container.streams.video[0]
        base = float(stream.time_base)
        pts, durations = [], []
        try:
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                pts.append(int(packet.pts))
                durations.append(int(packet.duration or 0))
        except (av.FFmpegError, OSError, ValueError, EOFError) as e:
            raise rec.RecordError(rec.CORRUPT_VIDEO, f"{uri}: {type(e).__name__}: {e}") from e
        rate = float(stream.average_rate or stream.guessed_rate or 0)
    if not pts:
        raise rec.RecordError(rec.NO_FRAMES, f"{uri}: the video stream has no frames")
    order = np.argsort(pts, kind="stable")
    pts_arr = np.asarray(pts, np.int64)[order]
    times = (pts_arr - pts_arr[0]) * base
    last = durations[int(order[-1])] * base
    if last <= 0:
        gaps = np.diff(times)
        last = float(np.median(gaps)) if len(gaps) else (1.0 / rate if rate > 0 else 0.0)
    return pts_arr, times, float(times[-1] + last)


def decode_frames(uri: str, wanted_pts: Sequence[int]) -> Dict[int, np.ndarray]:
    """Decodes the video's first video stream; returns ``{pts: uint8 [H, W, 3]}`` of the
    frames whose pts is in ``wanted_pts``. RecordError (corrupt_video) on a decoding error."""
    import av

    wanted = set(int(p) for p in wanted_pts)
    out: Dict[int, np.ndarray] = {}
    with _open(uri) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if frame.pts is not None and int(frame.pts) in wanted:
                    out[int(frame.pts)] = frame.to_ndarray(format="rgb24")
                    if len(out) == len(wanted):
                        break
        except (av.FFmpegError, OSError, ValueError, EOFError) as e:
            raise rec.RecordError(rec.CORRUPT_VIDEO, f"{uri}: {type(e).__name__}: {e}") from e
    return out


class DecodeClips(beam.DoFn):
    """VideoEntry -> a video Candidate per clip, or dead letters (tagged ``dead_letters``)."""

    def __init__(self, options: VideoOptions):
        self._options = options
        self._videos = Metrics.counter(rec.METRICS_NAMESPACE, "videos_decoded")
        self._clips = Metrics.counter(rec.METRICS_NAMESPACE, "clips_cut")

    def process(self, entry: VideoEntry):
        options = self._options
        where = entry.source or entry.uri
        if not rec.clean_captions(entry.captions, 1):
            yield rec.dead_letter(entry.id, where, rec.EMPTY_CAPTION,
                                  f"no non-empty caption in {list(entry.captions)[:4]!r}")
            return
        try:
            pts, times, end = probe_frames(entry.uri)
            plans, too_short = plan_clips(end, entry.transcript, options)
            if too_short and too_short[0][0] < 0:
                raise rec.RecordError(rec.VIDEO_TOO_SHORT, f"{entry.uri}: {too_short[0][1]}")
            picks = {plan.index: frame_indices(times, plan.times) for plan in plans}
            wanted = sorted({int(pts[i]) for idx in picks.values() for i in idx})
            decoded = decode_frames(entry.uri, wanted)
        except rec.RecordError as e:
            yield rec.dead_letter(entry.id, where, e.reason, e.detail)
            return
        if not decoded:
            yield rec.dead_letter(entry.id, where, rec.NO_FRAMES, f"{entry.uri}: no frame decoded")
            return
        self._videos.inc()
        for index, detail in too_short:
            yield rec.dead_letter(clip_id(entry.id, index), where, rec.VIDEO_TOO_SHORT, detail)
        for plan in plans:
            cid = clip_id(entry.id, plan.index)
            missing = [float(times[i]) for i in picks[plan.index] if int(pts[i]) not in decoded]
            if missing:
                yield rec.dead_letter(cid, where, rec.CORRUPT_VIDEO,
                                      f"frames at {missing[:4]} s did not decode")
                continue
            frames = tuple(
                moving_digits.jpeg_bytes(resize_frame(decoded[int(pts[i])], options.size),
                                         options.jpeg_quality)
                for i in picks[plan.index])
            self._clips.inc()
            yield rec.Candidate(
                id=cid, captions=entry.captions, split=entry.split,
                source=f"{where} clip {plan.index} [{plan.times[0]:.3f}, "
                       f"{plan.times[-1] + 1 / plan.fps:.3f}) s",
                frames=frames, fps=plan.fps, transcript_current=plan.current,
                transcript_future=plan.future)


def clip_id(video_id: str, index: int) -> str:
    return f"{video_id}-clip{index:03d}"


# ---------------------------------------------------------------------------------------------
# Sources


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise TypeError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def parse_manifest_line(line: str, manifest: str, fractions: Sequence[float]) -> VideoEntry:
    """One JSONL line -> VideoEntry; ValueError / TypeError / KeyError for a bad line."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise TypeError(f"a line must be a JSON object, got {type(obj).__name__}")
    video = obj.get("video")
    if not isinstance(video, str) or not video.strip():
        raise KeyError("'video' must be a non-empty string")
    captions = obj.get("captions", [obj["caption"]] if "caption" in obj else None)
    if captions is None:
        raise KeyError("no 'captions' (or 'caption') field")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise TypeError("'captions' must be a list of strings")
    segments = []
    transcript = obj.get("transcript")
    if transcript is not None:
        if not isinstance(transcript, list) or len(transcript) < 2:
            raise ValueError("'transcript' must be a list of >= 2 segments (a clip per segment "
                             "with a next one)")
        for k, seg in enumerate(transcript):
            if not isinstance(seg, dict) or not isinstance(seg.get("text"), str):
                raise TypeError(f"transcript[{k}] must be {{'start', 'end', 'text': str}}")
            start = _number(seg.get("start"), f"transcript[{k}].start")
            end = _number(seg.get("end"), f"transcript[{k}].end")
            if not 0 <= start < end:
                raise ValueError(f"transcript[{k}] needs 0 <= start < end, got {start}, {end}")
            segments.append(Segment(start, end, seg["text"]))
    explicit = obj.get("id", "")
    if isinstance(explicit, bool) or not isinstance(explicit, (str, int)):
        raise TypeError("'id' must be a string or an integer")
    uri = image_text.resolve_path(video.strip(), image_text.parent_dir(manifest))
    video_id = str(explicit) or image_text.stable_id("vid", f"{uri}\n{line}")
    split = dataset_writer.assign_split(image_text.stable_id("vid", uri), fractions)
    return VideoEntry(uri, video_id, tuple(captions), tuple(segments), split,
                      f"{manifest}: {video.strip()}")


class _ParseManifest(beam.DoFn):
    """(manifest file, raw line) -> VideoEntry, or a BAD_SOURCE_LINE dead letter."""

    def __init__(self, fractions: Sequence[float]):
        self._fractions = tuple(fractions)

    def process(self, element):
        filename, raw = element
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as e:
            yield image_text._bad_line(filename, repr(raw[:200]), f"not UTF-8: {e}")
            return
        line = line.lstrip("\ufeff").rstrip("\r\n")
        if not line.strip():
            return
        try:
            yield parse_manifest_line(line, filename, self._fractions)
        except (ValueError, TypeError, KeyError) as e:
            yield image_text._bad_line(filename, line, f"{type(e).__name__}: {e}")


class ReadVideoManifest(beam.PTransform):
    """JSONL manifest(s) of videos -> ``(clip candidates, dead letters)``.

    Args:
      path: manifest file or glob (local or gs://).
      options: clip sampling and storage.
      fractions: train / validation / test fractions (split per video).
    """

    def __init__(self, path: str, options: VideoOptions = VideoOptions(),
                 fractions: Sequence[float] = (0.8, 0.1, 0.1)):
        super().__init__()
        if not image_text.match_files(path):
            raise FileNotFoundError(f"no manifest matches {path!r}")
        self._path, self._options = path, options
        self._fractions = tuple(float(f) for f in fractions)

    def expand(self, pbegin):
        parsed = (pbegin | "ReadLines" >> beam.io.ReadFromTextWithFilename(
            self._path, coder=beam.coders.BytesCoder())
            | "ParseLines" >> beam.ParDo(_ParseManifest(self._fractions)).with_outputs(
                rec.DEAD_LETTERS, main="entries"))
        clips = (parsed.entries | "SpreadVideos" >> beam.Reshuffle()
                 | "DecodeClips" >> beam.ParDo(DecodeClips(self._options)).with_outputs(
                     rec.DEAD_LETTERS, main="candidates"))
        dead = ((parsed[rec.DEAD_LETTERS], clips[rec.DEAD_LETTERS])
                | "ManifestDeadLetters" >> beam.Flatten())
        return clips.candidates, dead


def sample_gif_path() -> str:
    """The animated GIF that ships with scikit-image."""
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data", SAMPLE_GIF)


class SampleGif(beam.PTransform):
    """scikit-image's animated GIF, decoded like any video, as one clip in the test split."""

    def __init__(self, options: VideoOptions = VideoOptions()):
        super().__init__()
        self._options = options

    def expand(self, pbegin):
        entry = VideoEntry(sample_gif_path(), SAMPLE_GIF_ID, SAMPLE_GIF_CAPTIONS, (), "test",
                           f"scikit-image {SAMPLE_GIF}")
        clips = (pbegin | "GifEntry" >> beam.Create([entry])
                 | "DecodeGif" >> beam.ParDo(DecodeClips(self._options)).with_outputs(
                     rec.DEAD_LETTERS, main="candidates"))
        return clips.candidates, clips[rec.DEAD_LETTERS]


# ---------------------------------------------------------------------------------------------
# The job


def build_parser() -> argparse.ArgumentParser:
    parser = job_flags.beam_parser(
        "kmm data video",
        "Turn videos (a JSONL manifest with captions and optional timed transcripts, decoded "
        "with PyAV) into video_tubes TFRecords of T-frame clips, or write a built-in dataset: "
        "moving-digits (clips of real digits moving in 4 directions at 2 speeds, with "
        "captions, MV-GPT transcripts and motion labels, split by source digit) or sample-gif "
        "(scikit-image's animated GIF, a decode check).")
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, help="dataset folder to write (local or gs://)")
    group.add_argument("--split_fractions", default="0.8,0.1,0.1",
                       help="train,validation,test fractions (manifest: per video; "
                            "moving-digits: of the source digits)")
    group.add_argument("--records_per_shard", type=int, default=DEFAULT_RECORDS_PER_SHARD,
                       help="target clips per TFRecord shard")
    group.add_argument("--vocab_size", type=int, default=0,
                       help="if > 0, train tokenizer.model of this size on the training "
                            "captions and transcripts (moving-digits always trains one, default "
                            f"{moving_digits.DEFAULT_VOCAB_SIZE})")
    group.add_argument("--tokenizer_model_type", choices=("unigram", "bpe"), default=None,
                       help="SentencePiece model type (default: bpe for moving-digits, else "
                            "unigram)")
    group = parser.add_argument_group("source and clips")
    group.add_argument("--source", choices=SOURCES, required=True)
    group.add_argument("--input", default=None, help="manifest: JSONL file or glob")
    group.add_argument("--num_frames", type=int, default=moving_digits.DEFAULT_NUM_FRAMES,
                       help="frames per clip (T)")
    group.add_argument("--fps", type=float, default=moving_digits.DEFAULT_FPS,
                       help="target frames per second (frames resampled by timestamps)")
    group.add_argument("--jpeg_quality", type=int, default=95, help="of the stored frames")
    group.add_argument("--max_captions", type=int, default=rec.ImageOptions().max_captions,
                       help="keep at most this many captions per clip")
    group.add_argument("--size", type=int, default=argparse.SUPPRESS,
                       help="manifest / sample-gif: frame side after resizing the short side "
                            "and centre cropping; 0 keeps the decoded size (default 0)")
    group.add_argument("--clips_per_video", type=int, default=argparse.SUPPRESS,
                       help="manifest / sample-gif: evenly spaced clips of a video without a "
                            "transcript (default 1)")
    group = parser.add_argument_group(
        "moving-digits (source digits split as label-as-text with --split_fractions)")
    for flag, text in (("num_train", "training clips"), ("num_validation", "validation clips"),
                       ("num_test", "test clips (>= 256 for the retrieval gallery)"),
                       ("canvas_size", f"canvas side in px ({moving_digits.MIN_CANVAS_SIZE}.."
                                       f"{moving_digits.MAX_CANVAS_SIZE})"),
                       ("seed", "clip generator seed")):
        group.add_argument(f"--{flag}", type=int, default=argparse.SUPPRESS,
                           help=f"{text} (default {DIGIT_FLAGS[flag]})")
    return parser


def video_options(args) -> VideoOptions:
    try:
        return VideoOptions(num_frames=args.num_frames, fps=args.fps,
                            size=getattr(args, "size", DECODE_FLAGS["size"]),
                            clips_per_video=getattr(args, "clips_per_video",
                                                    DECODE_FLAGS["clips_per_video"]),
                            jpeg_quality=args.jpeg_quality)
    except ValueError as e:
        raise job_flags.FlagError(f"--{str(e)}") from e


def digits_source(args, fractions) -> moving_digits.MovingDigits:
    values = {flag: getattr(args, flag, default) for flag, default in DIGIT_FLAGS.items()}
    counts = {split: values[f"num_{split}"] for split in dataset_writer.SPLITS}
    if counts["train"] < 1 or counts["validation"] < 0 or counts["test"] < 0:
        raise job_flags.FlagError(f"moving-digits needs --num_train >= 1 (the tokenizer is "
                                  f"trained on it) and --num_validation, --num_test >= 0, got "
                                  f"{counts}")
    if values["seed"] < 0:
        raise job_flags.FlagError(f"--seed must be >= 0, got {values['seed']}")
    if args.vocab_size < 0:
        raise job_flags.FlagError(f"moving-digits always trains a tokenizer: --vocab_size must "
                                  f"be > 0 (0: {moving_digits.DEFAULT_VOCAB_SIZE}), got "
                                  f"{args.vocab_size}")
    try:
        moving_digits.check_geometry(values["canvas_size"], args.num_frames)
    except ValueError as e:
        raise job_flags.FlagError(f"--canvas_size {values['canvas_size']} / --num_frames "
                                  f"{args.num_frames}: {e}") from e
    try:
        for split in dataset_writer.SPLITS:
            moving_digits.digit_scenes.digit_pool(split, tuple(fractions))
    except ValueError as e:
        raise job_flags.FlagError(f"--split_fractions {args.split_fractions}: {e}") from e
    return moving_digits.MovingDigits(counts, canvas_size=values["canvas_size"],
                                      num_frames=args.num_frames, fps=args.fps,
                                      seed=values["seed"], fractions=fractions,
                                      jpeg_quality=args.jpeg_quality)


def make_source(args, options: VideoOptions, fractions) -> beam.PTransform:
    """The source PTransform the flags ask for; FlagError for flags that do not apply."""
    digit_flags = [f"--{f}" for f in DIGIT_FLAGS if hasattr(args, f)]
    if digit_flags and args.source != "moving-digits":
        raise job_flags.FlagError(f"{', '.join(digit_flags)} only apply to --source "
                                  f"moving-digits, not {args.source}")
    decode_flags = [f"--{f}" for f in DECODE_FLAGS if hasattr(args, f)]
    if decode_flags and args.source == "moving-digits":
        raise job_flags.FlagError(f"{', '.join(decode_flags)} do not apply to --source "
                                  "moving-digits (use --canvas_size)")
    if args.source in BUILT_IN_SOURCES and args.input is not None:
        raise job_flags.FlagError(f"--input does not apply to --source {args.source} "
                                  "(a built-in dataset)")
    if args.source == "moving-digits":
        return digits_source(args, fractions)
    if args.source == "sample-gif":
        if args.vocab_size > 0:
            raise job_flags.FlagError("--vocab_size does not apply to --source sample-gif (it "
                                      "has no training split)")
        return SampleGif(options)
    if args.input is None:
        raise job_flags.FlagError("--source manifest needs --input")
    if not image_text.match_files(args.input):
        raise job_flags.FlagError(f"--input {args.input!r}: no such file")
    return ReadVideoManifest(args.input, options, fractions)


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the job; returns ``{"job", "source", "out", "seconds", "records_per_second",
    **stats.json}``."""
    args, beam_options = job_flags.parse_job_args(build_parser(), argv)
    fractions = job_flags.split_fractions(args)
    if args.records_per_shard < 1:
        raise job_flags.FlagError("--records_per_shard must be >= 1")
    if args.max_captions < 1:
        raise job_flags.FlagError("--max_captions must be >= 1")
    if args.vocab_size < 0:
        raise job_flags.FlagError(f"--vocab_size must be >= 0, got {args.vocab_size}")
    options = video_options(args)
    source = make_source(args, options, fractions)
    digits = args.source == "moving-digits"
    vocab_size = args.vocab_size or (moving_digits.DEFAULT_VOCAB_SIZE if digits else 0)
    tokenizer = None
    if vocab_size > 0:
        from keras_mm.beam_jobs.tokenizer import TrainTokenizer  # lazily: optional step

        tokenizer = TrainTokenizer(args.out, vocab_size, model_type=args.tokenizer_model_type or (
            moving_digits.TOKENIZER_MODEL_TYPE if digits else "unigram"))
    extra_files = source.extra_files() if digits else {}
    description = (f"video_tubes from {args.source}" if args.source in BUILT_IN_SOURCES
                   else f"video_tubes from {args.source}: {args.input}")
    if not image_text.has_scheme(args.out) and not FileSystems.exists(args.out):
        FileSystems.mkdirs(args.out)
    logging.info("video: source=%s input=%s T=%d fps=%g %s", args.source, args.input,
                 options.num_frames, options.fps, " ".join(job_flags.output_flags(args)))
    image_options = rec.ImageOptions(max_captions=args.max_captions)

    def build(pipeline):
        _ = (pipeline | f"Read_{args.source}" >> source
             | "BuildDataset" >> dataset_writer.BuildDataset(
                 args.out, features.VIDEO_TUBES, split_fractions=fractions,
                 records_per_shard=args.records_per_shard, image_options=image_options,
                 train_captions=tokenizer, extra_files=extra_files, description=description))

    return job_flags.run_dataset_job(build, beam_options, job="video", source=args.source,
                                     out=args.out, name="video")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return job_flags.main_for(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
