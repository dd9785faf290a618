"""From a raw candidate (image bytes or path + captions) to a validated record, or a dead letter.

Every source of every job yields :class:`Candidate` s; :class:`ToRecord` reads, decodes,
validates and canonicalises each one. A candidate that cannot become a record is never an
exception that stops the job: it leaves on the ``dead_letters`` output as a
:class:`DeadLetter` with one of :data:`REASONS`, and is counted in Beam metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
import warnings
from typing import Dict, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from keras_mm.pipelines import features
from keras_mm.pipelines.ops.text import normalize_text_py

METRICS_NAMESPACE = "kmm"
PROGRESS_EVERY = 1000
DEAD_LETTERS = "dead_letters"

# Why a record was rejected. Stable strings: they appear in stats.json and dead-letter files.
MISSING_FILE = "missing_file"
READ_ERROR = "read_error"
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_IMAGE = "truncated_image"
IMAGE_TOO_SMALL = "image_too_small"
IMAGE_TOO_LARGE = "image_too_large"
BAD_ASPECT_RATIO = "bad_aspect_ratio"
EMPTY_CAPTION = "empty_caption"
BAD_LABEL = "bad_label"
BAD_SOURCE_LINE = "bad_source_line"
DOWNLOAD_TIMEOUT = "download_timeout"
DOWNLOAD_HTTP_ERROR = "download_http_error"
DOWNLOAD_TOO_LARGE = "download_too_large"
DOWNLOAD_ERROR = "download_error"
CORRUPT_VIDEO = "corrupt_video"          # not a decodable video (or a frame that is no JPEG)
VIDEO_TOO_SHORT = "video_too_short"      # shorter than one clip / a segment past its end
NO_FRAMES = "no_frames"                  # a video stream without decodable frames
REASONS = (
    MISSING_FILE, READ_ERROR, CORRUPT_IMAGE, TRUNCATED_IMAGE, IMAGE_TOO_SMALL, IMAGE_TOO_LARGE,
    BAD_ASPECT_RATIO, EMPTY_CAPTION, BAD_LABEL, BAD_SOURCE_LINE, DOWNLOAD_TIMEOUT,
    DOWNLOAD_HTTP_ERROR, DOWNLOAD_TOO_LARGE, DOWNLOAD_ERROR, CORRUPT_VIDEO, VIDEO_TOO_SHORT,
    NO_FRAMES,
)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One raw example from a source, before validation.

    An image candidate sets exactly one of ``image_bytes`` (already in memory: tar member,
    download, generated) and ``image_uri`` (a local or ``gs://`` path, read through Beam's
    FileSystems). A video clip candidate (kind video_tubes) sets neither: its sources decode
    the video and give ``frames`` (one JPEG a frame), ``fps`` and optionally the MV-GPT
    ``transcript_current`` / ``transcript_future`` and a ``label`` / ``label_name``.
    ``source`` says where it came from (manifest line, URL, tar member) for dead letters.
    ``split`` pins the split (a source with its own train/test split); None: assigned from id.
    ``questions`` / ``answers``: optional question-answer pairs (same length, PaLI-style QA),
    written as the record's ``questions`` / ``answers`` when non-empty.
    """

    id: str
    captions: Tuple[str, ...]
    source: str = ""
    image_bytes: Optional[bytes] = None
    image_uri: Optional[str] = None
    label: Optional[int] = None
    label_name: Optional[str] = None
    split: Optional[str] = None
    questions: Tuple[str, ...] = ()
    answers: Tuple[str, ...] = ()
    frames: Tuple[bytes, ...] = ()
    fps: float = 0.0
    transcript_current: str = ""
    transcript_future: str = ""


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A rejected candidate: its id, where it came from, the reason (one of REASONS), details."""

    id: str
    source: str
    reason: str
    detail: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)


def count_dead_letter(reason: str) -> None:
    """Count one dead letter in Beam metrics (``kmm/dead_letters/<reason>``)."""
    Metrics.counter(METRICS_NAMESPACE, f"{DEAD_LETTERS}/{reason}").inc()


def dead_letter(candidate_id: str, source: str, reason: str, detail: str = ""):
    """A tagged dead-letter output for a DoFn: ``yield dead_letter(...)``. Counts it too."""
    if reason not in REASONS:
        raise ValueError(f"unknown dead-letter reason {reason!r}")
    count_dead_letter(reason)
    return beam.pvalue.TaggedOutput(
        DEAD_LETTERS, DeadLetter(str(candidate_id), str(source), reason, str(detail)[:500]))


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """Validation and canonicalisation of images.

    min_side / max_side: reject images whose short side is below ``min_side`` or whose long side
    is above ``max_side`` pixels (before resizing). max_aspect: reject long/short above this.
    resize_max_side: if > 0, downscale (never upscale) so the long side is at most this, and
    re-encode. jpeg_quality: quality of re-encoded JPEGs. max_captions: keep at most this many.
    """

    min_side: int = 8
    max_side: int = 16384
    max_aspect: float = 20.0
    resize_max_side: int = 0
    jpeg_quality: int = 95
    max_captions: int = 16


def _encode(image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, format="PNG", optimize=False)
    else:
        image.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


def canonicalize_image(data: bytes, options: ImageOptions) -> Tuple[bytes, int, int, str]:
    """Decode, validate and (if needed) re-encode one image.

    Returns ``(encoded, height, width, content_hash)``. The output is always a 3-channel RGB
    JPEG or PNG: RGB JPEGs and PNGs that need no resizing are kept byte for byte; other modes
    (grayscale, CMYK, palette, alpha: composited on white) and other formats are converted,
    lossless sources (PNG, GIF, BMP, ...) to PNG and JPEG sources to JPEG. ``content_hash`` is
    the SHA-256 of the decoded RGB pixels and size, so re-encodings of one image are duplicates.
    Raises ``RecordError`` with a reason from REASONS.
    """
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # size limits are ours (max_side), not PIL's bomb check
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            fmt = image.format
            image.load()
    except UnidentifiedImageError as e:
        raise RecordError(CORRUPT_IMAGE, f"not a decodable image: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = TRUNCATED_IMAGE if "truncated" in str(e).lower() else CORRUPT_IMAGE
        raise RecordError(reason, f"{type(e).__name__}: {e}") from e
    width, height = image.size
    if min(width, height) < options.min_side:
        raise RecordError(IMAGE_TOO_SMALL, f"{width}x{height} < min side {options.min_side}")
    if max(width, height) > options.max_side:
        raise RecordError(IMAGE_TOO_LARGE, f"{width}x{height} > max side {options.max_side}")
    if max(width, height) / min(width, height) > options.max_aspect:
        raise RecordError(BAD_ASPECT_RATIO, f"{width}x{height} aspect > {options.max_aspect}")

    keep_bytes = fmt in ("JPEG", "PNG") and image.mode == "RGB"
    if image.mode != "RGB":
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            image = image.convert("RGB")
    content_hash = hashlib.sha256(
        f"{image.size}".encode() + image.tobytes()).hexdigest()
    if options.resize_max_side and max(image.size) > options.resize_max_side:
        scale = options.resize_max_side / max(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        keep_bytes = False
    out_fmt = "JPEG" if fmt == "JPEG" else "PNG"
    encoded = data if keep_bytes else _encode(image, out_fmt, options.jpeg_quality)
    return encoded, image.size[1], image.size[0], content_hash


class RecordError(Exception):
    """A candidate cannot become a record; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def clean_captions(captions, max_captions: int) -> Tuple[str, ...]:
    """Normalise captions, drop empty ones and exact repeats (order kept), keep ``max_captions``."""
    out = []
    for caption in captions:
        if caption is None:
            continue
        text = normalize_text_py(caption if isinstance(caption, (str, bytes)) else str(caption))
        if text and text not in out:
            out.append(text)
    return tuple(out[:max_captions])


def read_bytes(uri: str) -> bytes:
    """Read a local or remote (gs://, ...) file through Beam's FileSystems."""
    try:
        with FileSystems.open(uri, compression_type="uncompressed") as f:
            return f.read()
    except FileNotFoundError as e:
        raise RecordError(MISSING_FILE, uri) from e
    except Exception as e:  # noqa: BLE001 - every filesystem raises its own IOError flavour
        if not FileSystems.exists(uri):
            raise RecordError(MISSING_FILE, uri) from e
        raise RecordError(READ_ERROR, f"{uri}: {type(e).__name__}: {e}") from e


@dataclasses.dataclass(frozen=True)
class KeyedRecord:
    """A validated record with what dedup and split assignment need."""

    id: str
    content_hash: str
    record: Dict
    split: Optional[str] = None


class ToRecord(beam.DoFn):
    """Candidate -> KeyedRecord (main output) or DeadLetter (tagged ``dead_letters``)."""

    def __init__(self, kind: str, options: ImageOptions = ImageOptions()):
        if kind not in features.KINDS:
            raise ValueError(f"unknown record kind {kind!r}; expected one of {features.KINDS}")
        self._kind = kind
        self._options = options
        self._ok = Metrics.counter(METRICS_NAMESPACE, "validated")
        self._bytes = Metrics.distribution(METRICS_NAMESPACE, "image_bytes")
        self._seen = 0
        self._started = None

    def _progress(self):
        """A log line every PROGRESS_EVERY candidates seen by this worker."""
        self._seen += 1
        if self._started is None:
            self._started = time.time()
        if self._seen % PROGRESS_EVERY == 0:
            rate = self._seen / max(time.time() - self._started, 1e-9)
            logging.getLogger(__name__).info("validated %d candidates (%.0f/s on this worker)",
                                             self._seen, rate)

    def process(self, candidate: Candidate):
        self._progress()
        src = candidate.source or candidate.image_uri or candidate.id
        captions = clean_captions(candidate.captions, self._options.max_captions)
        if not captions:
            yield dead_letter(candidate.id, src, EMPTY_CAPTION,
                              f"no non-empty caption in {list(candidate.captions)[:4]!r}")
            return
        if self._kind == features.LABEL_AS_TEXT and (
                candidate.label is None or int(candidate.label) < 0):
            yield dead_letter(candidate.id, src, BAD_LABEL, f"label {candidate.label!r}")
            return
        if self._kind == features.VIDEO_TUBES:
            yield from self._video_record(candidate, src, captions)
            return
        if len(candidate.questions) != len(candidate.answers):
            yield dead_letter(candidate.id, src, BAD_SOURCE_LINE,
                              f"{len(candidate.questions)} questions but "
                              f"{len(candidate.answers)} answers")
            return
        try:
            data = candidate.image_bytes
            if data is None:
                if not candidate.image_uri:
                    raise RecordError(MISSING_FILE, "candidate has neither bytes nor a path")
                data = read_bytes(candidate.image_uri)
            encoded, height, width, content_hash = canonicalize_image(data, self._options)
        except RecordError as e:
            yield dead_letter(candidate.id, src, e.reason, e.detail)
            return
        record = {
            features.IMAGE_ENCODED: encoded,
            features.IMAGE_HEIGHT: height,
            features.IMAGE_WIDTH: width,
            features.TEXTS: list(captions),
            features.ID: candidate.id,
        }
        if self._kind == features.LABEL_AS_TEXT:
            record[features.LABEL] = int(candidate.label)
            record[features.LABEL_NAME] = candidate.label_name or ""
        if candidate.questions:
            record[features.QUESTIONS] = [normalize_text_py(q) for q in candidate.questions]
            record[features.ANSWERS] = [normalize_text_py(a) for a in candidate.answers]
        self._ok.inc()
        self._bytes.update(len(encoded))
        yield KeyedRecord(candidate.id, content_hash, record, candidate.split)

    def _video_record(self, candidate: Candidate, src: str, captions: Tuple[str, ...]):
        """A video clip candidate (frames already decoded and JPEG-encoded by its source) ->
        KeyedRecord; every frame must be an RGB JPEG of one common size."""
        from PIL import Image, UnidentifiedImageError

        if not candidate.frames:
            yield dead_letter(candidate.id, src, NO_FRAMES, "clip has no frames")
            return
        if not candidate.fps > 0:
            yield dead_letter(candidate.id, src, CORRUPT_VIDEO, f"fps {candidate.fps!r} <= 0")
            return
        sizes = set()
        for k, frame in enumerate(candidate.frames):
            try:
                with Image.open(io.BytesIO(frame)) as image:
                    if image.format != "JPEG" or image.mode != "RGB":
                        raise ValueError(f"a {image.format} {image.mode} image")
                    sizes.add(image.size)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                yield dead_letter(candidate.id, src, CORRUPT_VIDEO,
                                  f"frame {k} is not an RGB JPEG: {e}")
                return
        if len(sizes) != 1:
            yield dead_letter(candidate.id, src, CORRUPT_VIDEO, f"frame sizes differ: {sizes}")
            return
        record = {
            features.VIDEO_FRAMES: list(candidate.frames),
            features.VIDEO_FPS: float(candidate.fps),
            features.TEXTS: list(captions),
            features.ID: candidate.id,
            features.TRANSCRIPT_CURRENT: normalize_text_py(candidate.transcript_current or ""),
            features.TRANSCRIPT_FUTURE: normalize_text_py(candidate.transcript_future or ""),
            features.LABEL: features.NO_LABEL if candidate.label is None else int(candidate.label),
            features.LABEL_NAME: candidate.label_name or "",
        }
        digest = hashlib.sha256(f"{candidate.fps:.6f}".encode())
        for frame in candidate.frames:
            digest.update(hashlib.sha256(frame).digest())
        self._ok.inc()
        self._bytes.update(sum(len(f) for f in candidate.frames))
        yield KeyedRecord(candidate.id, digest.hexdigest(), record, candidate.split)
