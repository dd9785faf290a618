"""moving-digits: short clips of 1-2 real handwritten digits moving in straight lines.

A clip is ``num_frames`` (T, default 8) frames at ``fps`` (default 8) of a square black canvas
(``canvas_size`` S px, default 32, RGB, the three channels equal) showing 1 or 2 (uniformly)
of scikit-learn's real 8x8 digits (``load_digits``) upscaled bilinearly
(:func:`digit_scenes.upscale_digit`):

* sizes: a digit is "small" (side in [S/4, 5S/16], 8-10 px at S = 32) or "large" (side in
  [3S/8, 7S/16], 12-14 px). A 2-digit clip has one large and one small digit; a 1-digit clip's
  digit is small or large (uniformly).
* motion: each digit moves in a straight line in one of :data:`DIRECTIONS` ("left", "right",
  "up", "down"; y grows downwards) at one of :data:`SPEEDS` ("slow": 1 px a frame, "fast":
  2 px a frame), all uniformly and independently. In frame ``f`` (0..T-1) its box's top-left
  corner is ``(x0 + f * v * ux, y0 + f * v * uy)`` with ``(ux, uy)`` the direction's unit step.
  The start ``(x0, y0)`` is uniform among the positions that keep the whole path inside the
  canvas. Digits may overlap; overlapping pixels take the maximum (white strokes on black).
* primary digit: the large one in a 2-digit clip, the only one otherwise. The clip's ``label``
  is the index of the primary digit's direction in :data:`DIRECTIONS`, ``label/name`` the
  word (the motion probe's classes).
* split by source digit, exactly as digit-scenes (:func:`digit_scenes.digit_pool`): clips of
  split ``s`` use only source digits label-as-text puts in ``s``, distinct within a clip, so
  test clips never show a digit seen in training.
* deterministic: clip ``i`` of split ``s`` comes from ``np.random.default_rng([seed, k, i])``
  (``k`` = 0, 1, 2 for train, validation, test) whatever the runner; ids ``moving-{s}-{i:06d}``.

Grammar (version :data:`GRAMMAR_VERSION`). Digits are numerals ("7"), "a 7" but "an 8".
``<dir>``: "to the left", "to the right", "up", "down"; ``<speed>``: "slowly" (slow),
"quickly" (fast). Captions, the canonical (most informative) one first:

=========  ==========================================================================================
digits     captions
=========  ==========================================================================================
1 (A)      "a <size> <A> moves <dir A> <speed A>"                 ("a large 4 moves to the left quickly")
           "a <A> moves <dir A>"                                  ("a 4 moves to the left")
           "a <A> moves <speed A>"                                ("a 4 moves quickly")
2 (P, Q)   "a large <P> moves <dir P> <speed P> while a small <Q> moves <dir Q> <speed Q>"
           "a large <P> moves <dir P> while a small <Q> moves <dir Q>"
           "a small <Q> moves <dir Q> while a large <P> moves <dir P>"
           "a <P> and a <Q> are moving"                           ("a 4 and a 9 are moving")
=========  ==========================================================================================

(P the large, primary digit; Q the small one.)

Transcripts (MV-GPT). A clip is narrated in two segments; the record's ``transcript/current``
is segment 1 and ``transcript/future`` segment 2. The future utterance states what only the
frames show, never what the current one implies:

=========  ==========================================  =====================================
digits     transcript/current                          transcript/future
=========  ==========================================  =====================================
1 (A)      "here is a <size> <A>"                      "it moves <dir A> <speed A>"
2 (P, Q)   "the large <P> moves <dir P> <speed P>"     "the small <Q> moves <dir Q> <speed Q>"
=========  ==========================================  =====================================

In a 1-digit clip the future gives the motion, independent of the digit and size the current
names; in a 2-digit clip it names the small digit and its motion, drawn independently of the
large digit's. So generating the future from the current utterance alone is chance (1 of 8
motions, 1 of 10 x 8 for the small digit), and from the frames it is exact.

The job (``kmm data video --source moving-digits``, beam_jobs/video_tubes.py) also writes
``moving_digits.json`` (grammar version, canvas, frames, fps, directions, speeds, sizes, seed,
clip and source-digit counts per split) and trains ``tokenizer.model`` on the training clips'
captions and transcripts (``--vocab_size``, default :data:`DEFAULT_VOCAB_SIZE`, BPE).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from typing import Dict, List, Mapping, Sequence, Tuple

import apache_beam as beam
import numpy as np

from keras_mm.beam_jobs import dataset_writer, digit_scenes
from keras_mm.beam_jobs import records as rec

GRAMMAR_VERSION = 1
SPLITS = dataset_writer.SPLITS
DEFAULT_COUNTS = {"train": 20000, "validation": 256, "test": 512}
DEFAULT_CANVAS_SIZE = 32
DEFAULT_NUM_FRAMES = 8
DEFAULT_FPS = 8.0
DEFAULT_JPEG_QUALITY = 95
MIN_CANVAS_SIZE, MAX_CANVAS_SIZE = 32, 256
DEFAULT_FRACTIONS = digit_scenes.DEFAULT_FRACTIONS
DIRECTIONS = ("left", "right", "up", "down")
# unit step (ux, uy) per frame of each direction; y grows downwards
STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
SPEEDS = {"slow": 1, "fast": 2}               # px a frame
SPEED_ADVERBS = {"slow": "slowly", "fast": "quickly"}
SMALL, LARGE = "small", "large"
MAX_DIGITS = 2
# 30 grammar words; BPE at 400 makes each one piece (at 360 "are", "and", "moving" split;
# checked in the tests). The longest text is 17 tokens.
DEFAULT_VOCAB_SIZE = 400
TOKENIZER_MODEL_TYPE = "bpe"
METADATA_FILE = "moving_digits.json"


def size_range(size: str, canvas_size: int) -> Tuple[int, int]:
    """Inclusive side range in px of a ``small`` / ``large`` digit on a ``canvas_size`` canvas."""
    s = canvas_size
    if size == SMALL:
        return s // 4, round(5 * s / 16)
    if size == LARGE:
        return round(3 * s / 8), round(7 * s / 16)
    raise ValueError(f"size must be {SMALL!r} or {LARGE!r}, got {size!r}")


def check_geometry(canvas_size: int, num_frames: int) -> None:
    """ValueError unless the largest, fastest digit's whole path fits the canvas."""
    if not MIN_CANVAS_SIZE <= canvas_size <= MAX_CANVAS_SIZE:
        raise ValueError(f"canvas_size must be in [{MIN_CANVAS_SIZE}, {MAX_CANVAS_SIZE}], "
                         f"got {canvas_size}")
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 (motion needs two frames), got {num_frames}")
    need = size_range(LARGE, canvas_size)[1] + max(SPEEDS.values()) * (num_frames - 1)
    if need > canvas_size:
        raise ValueError(f"a large fast digit moves over {need} px in {num_frames} frames, more "
                         f"than the {canvas_size} px canvas: use fewer frames or a larger canvas")


def _article(digit: int) -> str:
    return "an" if digit == 8 else "a"


def _motion(item: Mapping) -> str:
    """"to the left quickly"."""
    return f"{DIRECTION_PHRASES[item['direction']]} {SPEED_ADVERBS[item['speed']]}"


def make_clip(digit_images: np.ndarray, digit_labels: np.ndarray, rng: np.random.Generator,
              canvas_size: int = DEFAULT_CANVAS_SIZE, num_frames: int = DEFAULT_NUM_FRAMES,
              source_ids: Sequence[int] = None) -> Tuple[np.ndarray, List[Dict]]:
    """One clip from a pool of digits.

    Args:
      digit_images: ``[N, 8, 8]`` grey values in 0..16 (sklearn digits), N >= 2.
      digit_labels: ``[N]`` the digits' classes.
      rng: the clip's generator (all randomness comes from it).
      canvas_size: side S of the canvas; num_frames: T (see :func:`check_geometry`).
      source_ids: ``[N]`` ids stored as each item's ``source`` (default: the pool index).

    Returns:
      ``(frames, layout)``: frames uint8 ``[T, S, S, 3]``; layout one dict per digit, the
      primary digit first: ``{"digit", "size", "side", "x0", "y0", "direction", "speed",
      "source"}`` (start corner of the box in px; in frame f the corner is ``(x0 + f*v*ux,
      y0 + f*v*uy)``).
    """
    check_geometry(canvas_size, num_frames)
    count = int(rng.integers(1, MAX_DIGITS + 1))
    picks = rng.choice(len(digit_images), size=count, replace=False)
    sizes = [LARGE, SMALL] if count == 2 else [str(rng.choice((SMALL, LARGE)))]
    layout = []
    for pick, size in zip(picks, sizes):
        lo, hi = size_range(size, canvas_size)
        side = int(rng.integers(lo, hi + 1))
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        speed = ("slow", "fast")[int(rng.integers(2))]
        travel = SPEEDS[speed] * (num_frames - 1)
        ux, uy = STEPS[direction]
        # the corner's range along each axis so that every frame's box stays inside
        ranges = []
        for u in (ux, uy):
            low, high = 0, canvas_size - side
            if u < 0:
                low += travel
            elif u > 0:
                high -= travel
            ranges.append((low, high))
        x0, y0 = (int(rng.integers(low, high + 1)) for low, high in ranges)
        layout.append({"digit": int(digit_labels[pick]), "size": size, "side": side,
                       "x0": x0, "y0": y0, "direction": direction, "speed": speed,
                       "source": int(source_ids[pick] if source_ids is not None else pick),
                       "_pick": int(pick)})
    frames = np.zeros((num_frames, canvas_size, canvas_size), np.uint8)
    for item in layout:
        sprite = digit_scenes.upscale_digit(digit_images[item.pop("_pick")], item["side"])
        for f, (x, y) in enumerate(positions(item, num_frames)):
            window = frames[f, y:y + item["side"], x:x + item["side"]]
            np.maximum(window, sprite, out=window)
    return np.stack([frames] * 3, axis=-1), layout


def positions(item: Mapping, num_frames: int) -> List[Tuple[int, int]]:
    """The box's top-left ``(x, y)`` in each frame."""
    ux, uy = STEPS[item["direction"]]
    v = SPEEDS[item["speed"]]
    return [(item["x0"] + f * v * ux, item["y0"] + f * v * uy) for f in range(num_frames)]


def captions_for(layout: Sequence[Mapping]) -> List[str]:
    """The clip's captions (grammar in the module docstring), canonical first."""
    if len(layout) == 1:
        (a,) = layout
        d = a["digit"]
        return [f"a {a['size']} {d} moves {_motion(a)}",
                f"{_article(d)} {d} moves {DIRECTION_PHRASES[a['direction']]}",
                f"{_article(d)} {d} moves {SPEED_ADVERBS[a['speed']]}"]
    if len(layout) == 2:
        p, q = layout
        return [f"a large {p['digit']} moves {_motion(p)} while a small {q['digit']} moves "
                f"{_motion(q)}",
                f"a large {p['digit']} moves {DIRECTION_PHRASES[p['direction']]} while a small "
                f"{q['digit']} moves {DIRECTION_PHRASES[q['direction']]}",
                f"a small {q['digit']} moves {DIRECTION_PHRASES[q['direction']]} while a large "
                f"{p['digit']} moves {DIRECTION_PHRASES[p['direction']]}",
                f"{_article(p['digit'])} {p['digit']} and {_article(q['digit'])} {q['digit']} "
                "are moving"]
    raise ValueError(f"a layout has 1..{MAX_DIGITS} digits, got {len(layout)}")


_REVERSED_DIRECTION = {"to the left": "to the right", "to the right": "to the left",
                       "up": "down", "down": "up"}


def time_reversed_caption(caption: str) -> str:
    """The caption of the clip played backwards: every digit moves the opposite way at the same
    speed (left <-> right, up <-> down), and nothing else changes. A clip and its reversal have
    the same frames in another order, so a model that averages over frames embeds them alike."""
    return re.sub(r"\bto the (?:left|right)\b|\b(?:up|down)\b",
                  lambda m: _REVERSED_DIRECTION[m.group(0)], caption)


def transcripts_for(layout: Sequence[Mapping]) -> Tuple[str, str]:
    """``(current, future)``: the clip's two narrated segments (module docstring)."""
    if len(layout) == 1:
        (a,) = layout
        return f"here is a {a['size']} {a['digit']}", f"it moves {_motion(a)}"
    if len(layout) == 2:
        p, q = layout
        return (f"the large {p['digit']} moves {_motion(p)}",
                f"the small {q['digit']} moves {_motion(q)}")
    raise ValueError(f"a layout has 1..{MAX_DIGITS} digits, got {len(layout)}")


@dataclasses.dataclass(frozen=True)
class Clip:
    """A generated clip: frames uint8 ``[T, S, S, 3]``, layout (primary digit first),
    captions (canonical first), transcripts and the motion label."""

    id: str
    split: str
    frames: np.ndarray
    layout: List[Dict]
    captions: List[str]
    transcript_current: str
    transcript_future: str
    label: int
    label_name: str


def clip_id(split: str, index: int) -> str:
    return f"moving-{split}-{index:06d}"


def generate_clip(split: str, index: int, *, seed: int = 0,
                  canvas_size: int = DEFAULT_CANVAS_SIZE, num_frames: int = DEFAULT_NUM_FRAMES,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Clip:
    """Clip ``index`` of ``split``, exactly as the job writes it (before JPEG encoding)."""
    pool = digit_scenes.digit_pool(split, tuple(float(f) for f in fractions))
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index)])
    frames, layout = make_clip(pool.images, pool.labels, rng, canvas_size, num_frames,
                               pool.indices)
    current, future = transcripts_for(layout)
    direction = layout[0]["direction"]
    return Clip(clip_id(split, index), split, frames, layout, captions_for(layout), current,
                future, DIRECTIONS.index(direction), direction)


def jpeg_bytes(frame: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """uint8 ``[H, W, 3]`` -> RGB JPEG bytes (4:4:4 chroma at quality >= 90)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(frame, np.uint8), mode="RGB").save(
        buf, format="JPEG", quality=int(quality), subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


class _ClipCandidates(beam.DoFn):
    """(split, start, stop) -> a video Candidate per clip index in [start, stop)."""

    def __init__(self, seed, canvas_size, num_frames, fps, fractions, jpeg_quality):
        self._seed, self._canvas_size = int(seed), int(canvas_size)
        self._num_frames, self._fps = int(num_frames), float(fps)
        self._fractions = tuple(float(f) for f in fractions)
        self._quality = int(jpeg_quality)

    def process(self, chunk):
        split, start, stop = chunk
        for index in range(start, stop):
            clip = generate_clip(split, index, seed=self._seed, canvas_size=self._canvas_size,
                                 num_frames=self._num_frames, fractions=self._fractions)
            sources = ",".join(str(item["source"]) for item in clip.layout)
            yield rec.Candidate(
                id=clip.id, captions=tuple(clip.captions), split=split,
                source=f"moving-digits seed={self._seed} {split}[{index}] digits [{sources}]",
                frames=tuple(jpeg_bytes(f, self._quality) for f in clip.frames), fps=self._fps,
                transcript_current=clip.transcript_current,
                transcript_future=clip.transcript_future, label=clip.label,
                label_name=clip.label_name)


class MovingDigits(beam.PTransform):
    """Generated moving-digit clips -> ``(candidates, source dead letters)`` (none).

    Candidates carry JPEG frames, fps, captions, transcripts, the motion label and their
    pinned split; write them with ``BuildDataset(kind=features.VIDEO_TUBES)``.

    Args:
      counts: clips per split.
      canvas_size, num_frames, fps: S, T and the frame rate stored in the records.
      seed: clip i of split s depends only on (seed, s, i).
      fractions: train / validation / test fractions splitting the source digits.
      jpeg_quality: of the stored frames.
      chunk: clips generated per DoFn call.
    """

    def __init__(self, counts: Mapping[str, int] = DEFAULT_COUNTS, *,
                 canvas_size: int = DEFAULT_CANVAS_SIZE, num_frames: int = DEFAULT_NUM_FRAMES,
                 fps: float = DEFAULT_FPS, seed: int = 0,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 jpeg_quality: int = DEFAULT_JPEG_QUALITY, chunk: int = 250):
        super().__init__()
        unknown = set(counts) - set(SPLITS)
        if unknown or any(int(n) < 0 for n in counts.values()):
            raise ValueError(f"counts must map splits {SPLITS} to counts >= 0, got {counts}")
        check_geometry(canvas_size, num_frames)
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
        self._counts = {split: int(counts.get(split, 0)) for split in SPLITS}
        self._canvas_size, self._num_frames = int(canvas_size), int(num_frames)
        self._fps, self._seed = float(fps), int(seed)
        self._fractions = tuple(float(f) for f in fractions)
        self._quality, self._chunk = int(jpeg_quality), int(chunk)

    def metadata(self) -> Dict:
        """What ``moving_digits.json`` holds."""
        return {
            "grammar_version": GRAMMAR_VERSION,
            "canvas_size": self._canvas_size,
            "num_frames": self._num_frames,
            "fps": self._fps,
            "seed": self._seed,
            "directions": list(DIRECTIONS),
            "speeds_px_per_frame": dict(SPEEDS),
            "sizes": {size: list(size_range(size, self._canvas_size)) for size in (SMALL, LARGE)},
            "digits_per_clip": [1, MAX_DIGITS],
            "clips": dict(self._counts),
            "source_digits": {split: int(len(digit_scenes.digit_pool(
                split, self._fractions).indices)) for split in SPLITS},
            "digit_split_fractions": list(self._fractions),
            "jpeg_quality": self._quality,
        }

    def extra_files(self) -> Dict[str, str]:
        """``{moving_digits.json: text}`` for ``BuildDataset(extra_files=...)``."""
        return {METADATA_FILE: json.dumps(self.metadata(), indent=2, sort_keys=True) + "\n"}

    def expand(self, pbegin):
        chunks = [(split, start, min(start + self._chunk, self._counts[split]))
                  for split in SPLITS for start in range(0, self._counts[split], self._chunk)]
        candidates = (pbegin | "ClipChunks" >> beam.Create(chunks)
                      | "SpreadChunks" >> beam.Reshuffle()
                      | "RenderClips" >> beam.ParDo(_ClipCandidates(
                          self._seed, self._canvas_size, self._num_frames, self._fps,
                          self._fractions, self._quality)))
        dead = pbegin | "NoSourceDeadLetters" >> beam.Create([])
        return candidates, dead
