"""digit-scenes: scenes of 1-3 real handwritten digits, with true captions and questions.

A scene is a square black canvas (``canvas_size`` px, default 64, stored as an RGB PNG) with
1, 2 or 3 (uniformly) of scikit-learn's real 8x8 digits (``load_digits``: grey values 0..16,
white strokes on black) upscaled bilinearly and pasted at random non-overlapping positions:

* sizes: each digit is "small" (side in [3S/16, S/4], 12-16 px at S = 64) or "large" (side in
  [3S/8, 15S/32], 24-30 px), uniformly; when the digits do not fit, the sizes are drawn again.
* boxes keep a gap of ``max(2, S // 32)`` px, and every two digits' centres differ by at least
  that much along x *and* along y, so left / right and top / bottom orders are always strict.
* split by source digit: a scene of split ``s`` uses only digits that label-as-text puts in split
  ``s`` (digit ``i`` has id ``digits-{i:04d}`` and split ``dataset_writer.assign_split(id,
  fractions)``; with the default fractions 0.8,0.1,0.1: 1454 / 174 / 169 digits), distinct
  source digits within a scene (numerals may repeat). So test scenes never show a digit seen in
  training.
* deterministic: scene ``i`` of split ``s`` comes from ``np.random.default_rng([seed, k, i])``
  (``k`` = 0, 1, 2 for train, validation, test), whatever the runner or worker. Two scenes can
  rarely be identical (one digit, same size and place: about one pair in 6000 scenes);
  BuildDataset then keeps one and counts the other in ``stats.json`` as a duplicate.

Grammar (version :data:`GRAMMAR_VERSION`). Digits are written as numerals ("7"), counts as words
("two"), sizes "small" / "large"; ``<np X>`` is "a <size> <digit>" (e.g. "a small 3") and
"a <X>" is written "an 8" for the 8.

Geometry. ``(cx, cy)`` is a digit's box centre (y grows downwards). A digit's *region* splits
each axis in thirds (a centre coordinate < S/3: top / left, > 2S/3: bottom / right, else
middle): region names "top left", "top",
"top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"; region phrases
"in the top left", "at the top", "in the top right", "on the left", "in the centre", "on the
right", "in the bottom left", "at the bottom", "in the bottom right". Digit A is *above* /
*below* B when ``|dy| > |dx|`` (vertical separation dominates; dy = cy_A - cy_B, negative:
above), else *to the left of* / *to the right of* B by the sign of dx. The *reading order* of
two digits puts first the one that is to the left of / above the other.

Captions, four a scene, the canonical (most informative) one first:

=========  ==================================================================================
digits     captions
=========  ==================================================================================
1          "<np A> <region phrase A>"                      ("a large 7 in the top left")
           "<np A>"                                        ("a large 7")
           "a <A> <region phrase A>"                       ("a 7 in the top left")
2          "<np A> to the left of|above <np B>"            ("a small 3 to the left of a large 7")
           "<np B> to the right of|below <np A>"           ("a large 7 to the right of a small 3")
           "a <A> and a <B>"                               ("a 3 and a 7")
           (A, B in reading order)
3          "<np P>, <np Q> and <np R> from left to right"  when the x spread of the centres is
           or "... from top to bottom" (y order)           >= the y spread, else top to bottom
           "a <P>, a <Q> and a <R> from left to right"     (P, Q, R by cx)
           "a <U>, a <V> and a <W> from top to bottom"     (U, V, W by cy)
all        "<count> large digit(s) and <count> small digit(s)", zero counts left out
           ("one large digit and two small digits", "three small digits")
=========  ==================================================================================

Questions and answers (PaLI-style prompts; 2-4 a scene, the first always the count question,
the others drawn without repeats from those that apply; every answer is a single fact):

==========================================  ==============  ===================================
question                                    answer          asked when
==========================================  ==============  ===================================
"how many digits are there?"                count word      always (first)
"how many small|large digits are there?"    count word      always ("zero" allowed)
"is the <d> small or large?"                "small|large"   the numeral d occurs once
"where is the <d>?"                         region name     the numeral d occurs once
"what digit is to the left of the <B>?"     A               2 digits, A != B, horizontal (also
"what digit is to the right of the <A>?"    B               "above" / "below" when vertical)
"what is the first|second|third digit       numeral         3 digits (by cx / by cy)
 from the left|top?"
"which digit is the biggest?"               numeral         2-3 digits, exactly one large
"what is the highest number?"               numeral         2-3 digits
==========================================  ==============  ===================================

The job also writes ``digit_scenes.json`` (grammar version, canvas size, seed, scene and digit
counts per split) and always trains ``tokenizer.model`` on the training scenes' captions,
questions and answers (``--vocab_size``, default :data:`DEFAULT_VOCAB_SIZE`).

    kmm data image-text --source digit-scenes --out runs/digit_scenes [--num_train 60000 ...]
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np

from keras_mm.beam_jobs import dataset_writer
from keras_mm.beam_jobs import records as rec

GRAMMAR_VERSION = 1
SPLITS = dataset_writer.SPLITS
# 60 000 training scenes: the tiny captioner recipes (2500 steps of 64) see each scene under 3
# times; with 6000 (27 epochs) they memorised the training scenes (CoCa: training pair accuracy
# 0.69 against test R@1 0.19). About a minute of Beam work on 2 cores.
DEFAULT_COUNTS = {"train": 60000, "validation": 500, "test": 500}
DEFAULT_CANVAS_SIZE = 64
MIN_CANVAS_SIZE, MAX_CANVAS_SIZE = 32, 512
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
MAX_DIGITS = 3
MIN_QUESTIONS, MAX_QUESTIONS = 2, 4
# The grammar has 51 words and marks; the tokenizer also holds 4 specials, <lowercase> and 256
# byte pieces. BPE at 450 makes every word one piece (longest text: 14 tokens); unigram splits
# many words into letters at any size.
DEFAULT_VOCAB_SIZE = 450
TOKENIZER_MODEL_TYPE = "bpe"
METADATA_FILE = "digit_scenes.json"
NUM_SOURCE_DIGITS = 1797
SMALL, LARGE = "small", "large"
COUNT_WORDS = ("zero", "one", "two", "three")
ORDINALS = ("first", "second", "third")
# label_as_text.ReadDigits's id of sklearn digit i: the split is a function of it.
SOURCE_DIGIT_ID = "digits-{:04d}"

_PLACE_TRIES = 50       # positions tried per digit
_LAYOUT_TRIES = 20      # size draws tried before falling back to all-small digits
_RELATION_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above",
                    "below": "below"}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


# ---------------------------------------------------------------------------------------------
# Source digits and their split


def source_digit_split(index: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split label-as-text gives sklearn digit ``index`` (with the same fractions)."""
    return dataset_writer.assign_split(SOURCE_DIGIT_ID.format(index), fractions)


@functools.lru_cache(maxsize=1)
def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


@dataclasses.dataclass(frozen=True)
class DigitPool:
    """The source digits of one split: sklearn indices ``[N]``, images ``[N, 8, 8]`` (0..16),
    labels ``[N]``."""

    indices: np.ndarray
    images: np.ndarray
    labels: np.ndarray


@functools.lru_cache(maxsize=8)
def digit_pool(split: str, fractions: Tuple[float, ...] = DEFAULT_FRACTIONS) -> DigitPool:
    """The digits of ``split`` (see :func:`source_digit_split`), in sklearn order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _load_digits()
    indices = np.array([i for i in range(len(images))
                        if source_digit_split(i, fractions) == split], dtype=np.int64)
    if len(indices) < MAX_DIGITS:
        raise ValueError(f"split {split!r} has {len(indices)} source digits with fractions "
                         f"{fractions}; a scene needs {MAX_DIGITS}")
    return DigitPool(indices, images[indices], labels[indices])


# ---------------------------------------------------------------------------------------------
# Scenes


def size_range(size: str, canvas_size: int) -> Tuple[int, int]:
    """Inclusive side range in px of a ``small`` / ``large`` digit on a ``canvas_size`` canvas."""
    s = canvas_size
    if size == SMALL:
        return round(3 * s / 16), s // 4
    if size == LARGE:
        return round(3 * s / 8), round(15 * s / 32)
    raise ValueError(f"size must be {SMALL!r} or {LARGE!r}, got {size!r}")


def min_separation(canvas_size: int) -> int:
    """Gap between boxes, and between centres along each axis, in px."""
    return max(2, canvas_size // 32)


def upscale_digit(pixels: np.ndarray, side: int) -> np.ndarray:
    """One sklearn digit (``[8, 8]`` floats in 0..16) -> uint8 ``[side, side]``, bilinear."""
    from PIL import Image

    grey = np.round(np.asarray(pixels, np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return np.asarray(Image.fromarray(grey, mode="L").resize((side, side),
                                                             Image.Resampling.BILINEAR))


def centre(item: Mapping) -> Tuple[float, float]:
    """``(cx, cy)`` of a layout item's box, in px."""
    return item["x"] + item["w"] / 2.0, item["y"] + item["h"] / 2.0


def _fits(box: Tuple[int, int, int], placed: List[Tuple[int, int, int]], sep: int) -> bool:
    """A square box ``(x, y, side)`` keeps ``sep`` px from every placed box and its centre
    differs by >= sep along x and along y from theirs."""
    x, y, side = box
    for px, py, pside in placed:
        apart = (x + side + sep <= px or px + pside + sep <= x
                 or y + side + sep <= py or py + pside + sep <= y)
        if not apart or abs((2 * x + side) - (2 * px + pside)) < 2 * sep or abs(
                (2 * y + side) - (2 * py + pside)) < 2 * sep:
            return False
    return True


def _place(sides: Sequence[int], rng: np.random.Generator,
           canvas_size: int) -> Optional[List[Tuple[int, int, int]]]:
    """Random ``(x, y, side)`` boxes for ``sides`` that satisfy :func:`_fits`; None if not
    found within the tries."""
    sep = min_separation(canvas_size)
    placed: List[Tuple[int, int, int]] = []
    for side in sides:
        for _ in range(_PLACE_TRIES):
            x, y = (int(v) for v in rng.integers(0, canvas_size - side + 1, size=2))
            if _fits((x, y, side), placed, sep):
                placed.append((x, y, side))
                break
        else:
            return None
    return placed


def make_scene(digit_images: np.ndarray, digit_labels: np.ndarray, rng: np.random.Generator,
               canvas_size: int = DEFAULT_CANVAS_SIZE,
               source_ids: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, List[Dict]]:
    """One scene from a pool of digits.

    Args:
      digit_images: ``[N, 8, 8]`` grey values in 0..16 (sklearn digits), N >= 3.
      digit_labels: ``[N]`` the digits' classes 0..9.
      rng: the scene's generator (all randomness comes from it).
      canvas_size: side S of the square canvas, in [MIN_CANVAS_SIZE, MAX_CANVAS_SIZE].
      source_ids: ``[N]`` ids stored as each item's ``source`` (default: the pool index).

    Returns:
      ``(image, layout)``: image uint8 ``[S, S, 3]`` (grey: the three channels are equal),
      layout one dict per digit, in drawing order: ``{"digit": int, "size": "small"|"large",
      "x": int, "y": int, "w": int, "h": int, "source": int}`` (box top-left corner, width,
      height in px; w == h).
    """
    if not MIN_CANVAS_SIZE <= canvas_size <= MAX_CANVAS_SIZE:
        raise ValueError(f"canvas_size must be in [{MIN_CANVAS_SIZE}, {MAX_CANVAS_SIZE}], "
                         f"got {canvas_size}")
    count = int(rng.integers(1, MAX_DIGITS + 1))
    picks = rng.choice(len(digit_images), size=count, replace=False)
    boxes, sizes = None, []
    for attempt in range(_LAYOUT_TRIES + 1):
        sizes = ([SMALL] * count if attempt == _LAYOUT_TRIES
                 else [str(s) for s in rng.choice((SMALL, LARGE), size=count)])
        sides = [int(rng.integers(lo, hi + 1)) for lo, hi in
                 (size_range(s, canvas_size) for s in sizes)]
        boxes = _place(sides, rng, canvas_size)
        if boxes is not None:
            break
    if boxes is None:
        raise RuntimeError(f"could not place {count} small digits on a {canvas_size} px canvas")
    canvas = np.zeros((canvas_size, canvas_size), np.uint8)
    layout = []
    for pick, size, (x, y, side) in zip(picks, sizes, boxes):
        canvas[y:y + side, x:x + side] = upscale_digit(digit_images[pick], side)
        layout.append({"digit": int(digit_labels[pick]), "size": size, "x": x, "y": y,
                       "w": side, "h": side,
                       "source": int(source_ids[pick] if source_ids is not None else pick)})
    return np.stack([canvas] * 3, axis=-1), layout


# ---------------------------------------------------------------------------------------------
# Grammar: regions, relations, captions, questions


def region(item: Mapping, canvas_size: int = DEFAULT_CANVAS_SIZE) -> str:
    """Region name of a layout item: "top left", "top", ..., "centre", ... "bottom right"."""

    def third(v: float, low: str, high: str) -> str:
        return low if v < canvas_size / 3 else high if v > 2 * canvas_size / 3 else ""

    cx, cy = centre(item)
    return " ".join(p for p in (third(cy, "top", "bottom"), third(cx, "left", "right"))
                    if p) or "centre"


def region_phrase(item: Mapping, canvas_size: int = DEFAULT_CANVAS_SIZE) -> str:
    """"in the top left", "at the top", "on the left", "in the centre", ..."""
    name = region(item, canvas_size)
    if name in ("top", "bottom"):
        return f"at the {name}"
    if name in ("left", "right"):
        return f"on the {name}"
    return f"in the {name}"


def relation(a: Mapping, b: Mapping) -> str:
    """Where ``a`` is relative to ``b``: "above" / "below" when |dy| > |dx|, else "left" /
    "right"."""
    (ax, ay), (bx, by) = centre(a), centre(b)
    dx, dy = ax - bx, ay - by
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return "left" if dx < 0 else "right"


def reading_order(a: Mapping, b: Mapping) -> Tuple[Mapping, Mapping, str]:
    """``(first, second, rel)``: the pair with the left / upper digit first, ``rel`` ("left"
    or "above") where first is relative to second."""
    rel = relation(a, b)
    if rel in ("right", "below"):
        return b, a, _OPPOSITE[rel]
    return a, b, rel


def _np(item: Mapping, with_size: bool = True) -> str:
    """"a small 3" (with_size) or "a 3"; "an 8" (read "an eight")."""
    if with_size:
        return f"a {item['size']} {item['digit']}"
    return f"{'an' if item['digit'] == 8 else 'a'} {item['digit']}"


def _series(items: Sequence[Mapping], with_size: bool) -> str:
    """"a 1, a 5 and a 9" (three items)."""
    phrases = [_np(item, with_size) for item in items]
    return f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def count_caption(layout: Sequence[Mapping]) -> str:
    """"one large digit and two small digits", "three small digits", ..."""
    parts = []
    for size in (LARGE, SMALL):
        n = sum(item["size"] == size for item in layout)
        if n:
            parts.append(f"{COUNT_WORDS[n]} {size} digit{'s' if n > 1 else ''}")
    return " and ".join(parts)


def captions_for(layout: Sequence[Mapping], canvas_size: int = DEFAULT_CANVAS_SIZE) -> List[str]:
    """The scene's captions (grammar in the module docstring), the canonical one first.

    Args:
      layout: as returned by :func:`make_scene` (1-3 items).
      canvas_size: the canvas side the layout was made on (regions are in thirds of it).
    """
    if not 1 <= len(layout) <= MAX_DIGITS:
        raise ValueError(f"a layout has 1..{MAX_DIGITS} digits, got {len(layout)}")
    if len(layout) == 1:
        (a,) = layout
        where = region_phrase(a, canvas_size)
        captions = [f"{_np(a)} {where}", _np(a), f"{_np(a, False)} {where}"]
    elif len(layout) == 2:
        first, second, rel = reading_order(*layout)
        captions = [f"{_np(first)} {_RELATION_PHRASE[rel]} {_np(second)}",
                    f"{_np(second)} {_RELATION_PHRASE[_OPPOSITE[rel]]} {_np(first)}",
                    f"{_np(first, False)} and {_np(second, False)}"]
    else:
        by_x = sorted(layout, key=lambda item: centre(item)[0])
        by_y = sorted(layout, key=lambda item: centre(item)[1])
        xs, ys = [centre(i)[0] for i in layout], [centre(i)[1] for i in layout]
        canonical = (f"{_series(by_x, True)} from left to right"
                     if max(xs) - min(xs) >= max(ys) - min(ys)
                     else f"{_series(by_y, True)} from top to bottom")
        captions = [canonical, f"{_series(by_x, False)} from left to right",
                    f"{_series(by_y, False)} from top to bottom"]
    captions.append(count_caption(layout))
    return list(dict.fromkeys(captions))


def question_pool(layout: Sequence[Mapping],
                  canvas_size: int = DEFAULT_CANVAS_SIZE) -> List[Tuple[str, str]]:
    """Every (question, answer) of the grammar that applies to the scene, in a fixed order;
    the count question first."""
    n = len(layout)
    pool = [("how many digits are there?", COUNT_WORDS[n])]
    for size in (SMALL, LARGE):
        pool.append((f"how many {size} digits are there?",
                     COUNT_WORDS[sum(item["size"] == size for item in layout)]))
    numerals = [item["digit"] for item in layout]
    for item in layout:
        if numerals.count(item["digit"]) == 1:
            pool.append((f"is the {item['digit']} small or large?", item["size"]))
            pool.append((f"where is the {item['digit']}?", region(item, canvas_size)))
    if n == 2 and numerals[0] != numerals[1]:
        first, second, rel = reading_order(*layout)
        for asked, about, where in ((first, second, rel), (second, first, _OPPOSITE[rel])):
            pool.append((f"what digit is {_RELATION_PHRASE[where]} the {about['digit']}?",
                         str(asked["digit"])))
    if n == 3:
        for axis, side in ((0, "left"), (1, "top")):
            ordered = sorted(layout, key=lambda item: centre(item)[axis])
            for ordinal, item in zip(ORDINALS, ordered):
                pool.append((f"what is the {ordinal} digit from the {side}?", str(item["digit"])))
    if n >= 2:
        large = [item for item in layout if item["size"] == LARGE]
        if len(large) == 1:
            pool.append(("which digit is the biggest?", str(large[0]["digit"])))
        pool.append(("what is the highest number?", str(max(numerals))))
    return pool


def questions_for(layout: Sequence[Mapping], rng: np.random.Generator,
                  canvas_size: int = DEFAULT_CANVAS_SIZE) -> List[Tuple[str, str]]:
    """2-4 (question, answer) pairs: the count question, then distinct ones drawn from
    :func:`question_pool` (kept in pool order)."""
    pool = question_pool(layout, canvas_size)
    k = min(int(rng.integers(MIN_QUESTIONS, MAX_QUESTIONS + 1)), len(pool))
    picks = sorted(rng.choice(len(pool) - 1, size=k - 1, replace=False) + 1)
    return [pool[0]] + [pool[int(i)] for i in picks]


# ---------------------------------------------------------------------------------------------
# One scene of a split, and the Beam source


@dataclasses.dataclass(frozen=True)
class Scene:
    """A generated scene: image uint8 ``[S, S, 3]``, its layout, captions (canonical first),
    and aligned questions / answers."""

    id: str
    split: str
    image: np.ndarray
    layout: List[Dict]
    captions: List[str]
    questions: List[str]
    answers: List[str]


def scene_id(split: str, index: int) -> str:
    return f"scene-{split}-{index:06d}"


def generate_scene(split: str, index: int, *, seed: int = 0,
                   canvas_size: int = DEFAULT_CANVAS_SIZE,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Scene:
    """Scene ``index`` of ``split``, exactly as the job writes it (layout ``source`` = sklearn
    digit index)."""
    pool = digit_pool(split, tuple(float(f) for f in fractions))
    rng = np.random.default_rng([int(seed), SPLITS.index(split), int(index)])
    image, layout = make_scene(pool.images, pool.labels, rng, canvas_size, pool.indices)
    qa = questions_for(layout, rng, canvas_size)
    return Scene(scene_id(split, index), split, image, layout, captions_for(layout, canvas_size),
                 [q for q, _ in qa], [a for _, a in qa])


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` -> lossless RGB PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


class _SceneCandidates(beam.DoFn):
    """(split, start, stop) -> a Candidate per scene index in [start, stop)."""

    def __init__(self, seed: int, canvas_size: int, fractions: Sequence[float]):
        self._seed, self._canvas_size = int(seed), int(canvas_size)
        self._fractions = tuple(float(f) for f in fractions)

    def process(self, chunk):
        split, start, stop = chunk
        for index in range(start, stop):
            scene = generate_scene(split, index, seed=self._seed, canvas_size=self._canvas_size,
                                   fractions=self._fractions)
            sources = ",".join(str(item["source"]) for item in scene.layout)
            yield rec.Candidate(
                id=scene.id, captions=tuple(scene.captions), split=split,
                source=f"digit-scenes seed={self._seed} {split}[{index}] digits [{sources}]",
                image_bytes=png_bytes(scene.image), questions=tuple(scene.questions),
                answers=tuple(scene.answers))


def tokenizer_texts(candidate: rec.Candidate) -> Iterable[str]:
    """Captions, questions and answers of a training-split candidate (the tokenizer corpus)."""
    if candidate.split == "train":
        yield from candidate.captions
        yield from candidate.questions
        yield from candidate.answers


class DigitScenes(beam.PTransform):
    """Generated digit scenes -> ``(candidates, source dead letters)`` (none: every scene is
    valid). Candidates carry PNG bytes, captions, questions / answers and their pinned split.

    Args:
      counts: scenes per split, e.g. ``{"train": 60000, "validation": 500, "test": 500}``.
      canvas_size: canvas side S in px.
      seed: the generator seed (scene i of split s depends only on seed, s, i).
      fractions: the train / validation / test fractions that split the source digits (those
        of label-as-text).
      chunk: scenes generated per DoFn call.
    """

    def __init__(self, counts: Mapping[str, int] = DEFAULT_COUNTS, *,
                 canvas_size: int = DEFAULT_CANVAS_SIZE, seed: int = 0,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, chunk: int = 250):
        super().__init__()
        unknown = set(counts) - set(SPLITS)
        if unknown or any(int(n) < 0 for n in counts.values()):
            raise ValueError(f"counts must map splits {SPLITS} to counts >= 0, got {counts}")
        if not MIN_CANVAS_SIZE <= canvas_size <= MAX_CANVAS_SIZE:
            raise ValueError(f"canvas_size must be in [{MIN_CANVAS_SIZE}, {MAX_CANVAS_SIZE}], "
                             f"got {canvas_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self._counts = {split: int(counts.get(split, 0)) for split in SPLITS}
        self._canvas_size, self._seed = int(canvas_size), int(seed)
        self._fractions = tuple(float(f) for f in fractions)
        self._chunk = int(chunk)

    def metadata(self) -> Dict:
        """What ``digit_scenes.json`` holds."""
        return {
            "grammar_version": GRAMMAR_VERSION,
            "canvas_size": self._canvas_size,
            "seed": self._seed,
            "scenes": dict(self._counts),
            "source_digits": {split: int(len(digit_pool(split, self._fractions).indices))
                              for split in SPLITS},
            "digit_split_fractions": list(self._fractions),
            "digits_per_scene": [1, MAX_DIGITS],
            "sizes": {size: list(size_range(size, self._canvas_size)) for size in (SMALL, LARGE)},
        }

    def extra_files(self) -> Dict[str, str]:
        """``{digit_scenes.json: text}`` for ``BuildDataset(extra_files=...)``."""
        return {METADATA_FILE: json.dumps(self.metadata(), indent=2, sort_keys=True) + "\n"}

    def expand(self, pbegin):
        chunks = [(split, start, min(start + self._chunk, self._counts[split]))
                  for split in SPLITS for start in range(0, self._counts[split], self._chunk)]
        candidates = (pbegin | "SceneChunks" >> beam.Create(chunks)
                      | "SpreadChunks" >> beam.Reshuffle()
                      | "RenderScenes" >> beam.ParDo(_SceneCandidates(
                          self._seed, self._canvas_size, self._fractions)))
        dead = pbegin | "NoSourceDeadLetters" >> beam.Create([])
        return candidates, dead
