"""Video preprocessing ops: each function takes its config and returns ``op(features) -> features``.

The same conventions as :mod:`keras_mm.pipelines.ops.image`: ops are pure (they return a new
dict), TensorFlow-only and graph-compatible (the number of frames T may be unknown when tracing),
and random ops are stateless, drawing from the per-example seed ``features["_seed"]`` (int ``[2]``)
folded with a constant that differs for every op (:func:`~keras_mm.pipelines.ops.image.op_seed`).

A video is ``uint8 [T, H, W, 3]`` from :func:`decode_frames` until :func:`value_range` /
:func:`normalize_imagenet` turn it into ``float32``. Every spatial op draws ONE crop box and ONE
flip decision for the whole clip and applies it to every frame, so motion stays coherent.

Temporal sampling (:func:`sample_frames`, :func:`frame_indices`) works on any tensor whose leading
axis is time: on the decoded frames, or better on the encoded ``video/frames`` bytes ``[T]``
before :func:`decode_frames`, so only the sampled frames get decoded. Modes:

``uniform`` (eval, deterministic)
    index ``i`` is the middle frame of the i-th of ``num_frames`` equal segments of the clip:
    ``floor((2 i + 1) T / (2 num_frames))``; a clip shorter than ``num_frames`` gives
    ``0, 1, .., T-1`` and then repeats its last frame.
``random`` (training)
    a contiguous window ``start, start + s, .., start + (num_frames - 1) s`` (``s`` = stride)
    with ``start`` uniform over every position where the window fits; a clip shorter than the
    window starts at 0 and repeats its last frame for the indices past its end.
``center`` (eval, deterministic)
    the same window as ``random``, centred: ``start = (T - span) // 2``; useful when training
    used a stride and evaluation must see the same frame rate.

:func:`random_flip` mirrors every frame left-right and, on the text keys it is given, swaps
the words "left" and "right" (see :func:`swap_left_right`), so a caption still describes the
flipped clip. Leave it off for data whose labels encode horizontal direction.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import tensorflow as tf

from keras_mm.pipelines.ops import image as image_ops
from keras_mm.pipelines.ops.image import SEED_KEY, Features, Op, Size, compose, op_seed

__all__ = [
    "SAMPLING_MODES", "decode_frames", "frame_indices", "sample_frames", "resize",
    "resize_small", "central_crop", "resize_center_crop", "random_crop", "random_resized_crop",
    "random_flip", "swap_left_right", "value_range", "normalize_imagenet", "compose",
]

VIDEO_KEY = "video"
FRAMES_KEY = "video/frames"
SAMPLING_MODES = ("uniform", "random", "center")

# Salts folded into the example seed, one per random op (distinct from the image ops' salts).
_SALT_SAMPLE = 0x7e5a
_SALT_CROP = 0x7c40
_SALT_FLIP = 0x7f11

# (word, its mirror) pairs swapped by random_flip, in the case forms handled.
_MIRROR_WORDS = (("left", "right"), ("Left", "Right"), ("LEFT", "RIGHT"))
# Optional suffixes kept by the swap: "leftward(s)" <-> "rightward(s)" ("WARDS" for upper case).
_SUFFIX = {"left": "(wards?)?", "Left": "(wards?)?", "LEFT": "(WARDS?)?"}


def _hw(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


# ----------------------------------------------------------------------------------- decode


def decode_frames(key: str = FRAMES_KEY, out_key: str = VIDEO_KEY) -> Op:
    """Encoded frames string ``[T]`` (JPEG, or PNG/GIF/BMP: one still image each, all the same
    size) -> ``features[out_key]`` uint8 ``[T, H, W, 3]``. T may be unknown in graph mode."""

    def decode_one(encoded):
        frame = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
        return tf.ensure_shape(frame, [None, None, 3])

    def op(features: Features) -> Features:
        features = dict(features)
        encoded = tf.convert_to_tensor(features[key], tf.string)
        frames = tf.map_fn(decode_one, encoded,
                           fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
        features[out_key] = tf.ensure_shape(frames, [encoded.shape[0], None, None, 3])
        return features

    return op


# ----------------------------------------------------------------------------------- time


def _check_sampling(num_frames: int, mode: str, stride: int) -> None:
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode must be one of {SAMPLING_MODES}, got {mode!r}")
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be >= 1, got {num_frames}, {stride}")


def frame_indices(length, num_frames: int, mode: str = "uniform", *, stride: int = 1,
                  seed: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Which frames of a clip of ``length`` frames to keep (module docstring for the modes).

    Args:
      length: int scalar tensor T >= 1 (frames in the clip).
      num_frames: frames to keep, n.
      mode: "uniform", "random" or "center".
      stride: frame step of the "random" / "center" window (ignored by "uniform").
      seed: int ``[2]`` stateless seed ("random" only).
    Returns:
      int32 ``[num_frames]`` indices in ``[0, T)``, non-decreasing.
    """
    _check_sampling(num_frames, mode, stride)
    length = tf.cast(length, tf.int32)
    tf.debugging.assert_positive(length, message="sample_frames: the clip has no frame")
    steps = tf.range(num_frames, dtype=tf.int32)                                   # [n]
    if mode == "uniform":
        spread = ((2 * steps + 1) * length) // (2 * num_frames)
        return tf.where(length >= num_frames, spread, tf.minimum(steps, length - 1))
    span = (num_frames - 1) * stride + 1
    max_start = tf.maximum(length - span, 0)
    if mode == "center":
        start = max_start // 2
    else:
        if seed is None:
            raise ValueError("random frame sampling needs a seed")
        start = tf.random.stateless_uniform([], seed, minval=0, maxval=max_start + 1,
                                            dtype=tf.int32)
    return tf.minimum(start + steps * stride, length - 1)


def sample_frames(num_frames: int, mode: str = "uniform", *, stride: int = 1,
                  key: str = VIDEO_KEY, seed_key: str = SEED_KEY,
                  indices_key: Optional[str] = None) -> Op:
    """Temporal sampling: ``features[key]`` ``[T, ...]`` -> ``[num_frames, ...]`` (same dtype),
    with the indices of :func:`frame_indices` (``mode``, ``stride``); also writes them (int32
    ``[num_frames]``) to ``features[indices_key]`` when given. "random" needs ``seed_key``."""
    _check_sampling(num_frames, mode, stride)

    def op(features: Features) -> Features:
        features = dict(features)
        frames = tf.convert_to_tensor(features[key])
        seed = op_seed(features, _SALT_SAMPLE, seed_key) if mode == "random" else None
        indices = frame_indices(tf.shape(frames)[0], num_frames, mode, stride=stride, seed=seed)
        sampled = tf.gather(frames, indices)
        features[key] = tf.ensure_shape(sampled, [num_frames] + frames.shape[1:].as_list())
        if indices_key:
            features[indices_key] = indices
        return features

    return op


# ----------------------------------------------------------------------------------- space


def resize(size: Size, *, key: str = VIDEO_KEY, method: str = "bilinear",
           antialias: bool = False) -> Op:
    """Plain resize of every frame: ``[T, H, W, 3]`` -> ``[T, h, w, 3]``, same dtype."""

    def op(features: Features) -> Features:
        features = dict(features)
        features[key] = image_ops.resize_image(features[key], size, method, antialias)
        return features

    return op


def resize_small(short_side: int, *, key: str = VIDEO_KEY, method: str = "bilinear",
                 antialias: bool = False) -> Op:
    """Resizes every frame so that the shorter side is ``short_side`` (aspect ratio kept, the
    longer side rounded): ``[T, H, W, 3]`` -> ``[T, h, w, 3]``, same dtype."""

    def op(features: Features) -> Features:
        features = dict(features)
        video = tf.convert_to_tensor(features[key])
        shape = tf.shape(video)
        height, width = tf.cast(shape[1], tf.float64), tf.cast(shape[2], tf.float64)
        scale = short_side / tf.minimum(height, width)
        new_h = tf.maximum(1, tf.cast(tf.round(height * scale), tf.int32))
        new_w = tf.maximum(1, tf.cast(tf.round(width * scale), tf.int32))
        out = tf.image.resize(video, tf.stack([new_h, new_w]), method=method,
                              antialias=antialias)
        features[key] = image_ops._restore_dtype(out, video.dtype)
        return features

    return op


def _crop(video: tf.Tensor, top, left, height: int, width: int) -> tf.Tensor:
    """The same ``[height, width]`` window of every frame of ``[T, H, W, C]``."""
    crop = video[:, top:top + height, left:left + width]
    return tf.ensure_shape(crop, [video.shape[0], height, width, video.shape[-1]])


def _check_fits(video: tf.Tensor, height: int, width: int, name: str) -> None:
    static = video.shape[1:3]
    if any(dim is not None and dim < want for dim, want in zip(static, (height, width))):
        raise ValueError(f"{name}: frames {static} smaller than the crop {height}x{width}")
    tf.debugging.assert_greater_equal(
        tf.shape(video)[1:3], tf.constant([height, width]),
        message=f"{name}: frames smaller than the crop {height}x{width}")


def central_crop(size: Size, *, key: str = VIDEO_KEY) -> Op:
    """Crops the central ``[h, w]`` window of every frame (offsets ``(H - h) // 2``,
    ``(W - w) // 2``): ``[T, H, W, 3]`` -> ``[T, h, w, 3]``; frames must be at least that large."""
    crop_h, crop_w = _hw(size)

    def op(features: Features) -> Features:
        features = dict(features)
        video = tf.convert_to_tensor(features[key])
        _check_fits(video, crop_h, crop_w, "central_crop")
        shape = tf.shape(video)
        features[key] = _crop(video, (shape[1] - crop_h) // 2, (shape[2] - crop_w) // 2,
                              crop_h, crop_w)
        return features

    return op


def resize_center_crop(size: int, resize_ratio: float = 0.875, *, key: str = VIDEO_KEY,
                       method: str = "bilinear", antialias: bool = False) -> Op:
    """Eval transform: short side to ``round(size / resize_ratio)``, then the central
    ``[size, size]`` of every frame."""
    if not 0.0 < resize_ratio <= 1.0:
        raise ValueError(f"resize_ratio must be in (0, 1], got {resize_ratio}")
    return compose(resize_small(int(round(size / resize_ratio)), key=key, method=method,
                                antialias=antialias),
                   central_crop(size, key=key))


def random_crop(size: Size, *, key: str = VIDEO_KEY, seed_key: str = SEED_KEY) -> Op:
    """One random ``[h, w]`` window (offsets uniform over every position where it fits), the same
    for every frame: ``[T, H, W, 3]`` -> ``[T, h, w, 3]``. Stateless (``seed_key``)."""
    crop_h, crop_w = _hw(size)

    def op(features: Features) -> Features:
        features = dict(features)
        video = tf.convert_to_tensor(features[key])
        _check_fits(video, crop_h, crop_w, "random_crop")
        shape = tf.shape(video)
        limits = tf.stack([shape[1] - crop_h, shape[2] - crop_w]) + 1              # [2]
        seed = op_seed(features, _SALT_CROP, seed_key)
        draws = tf.random.stateless_uniform([2], seed, minval=0, maxval=2 ** 30, dtype=tf.int32)
        offsets = draws % limits
        features[key] = _crop(video, offsets[0], offsets[1], crop_h, crop_w)
        return features

    return op


def random_resized_crop(size: Size, *, scale: Tuple[float, float] = (0.08, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3), max_attempts: int = 10,
                        key: str = VIDEO_KEY, seed_key: str = SEED_KEY, method: str = "bilinear",
                        antialias: bool = False) -> Op:
    """Inception-style crop of the whole clip: ONE random window (a ``scale`` fraction of the
    frame area, aspect ratio width / height in ``ratio``; the whole frame after
    ``max_attempts`` misses) cut from every frame and resized to ``size``:
    ``[T, H, W, 3]`` -> ``[T, h, w, 3]``, same dtype. Stateless (``seed_key``)."""
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {ratio}")

    def op(features: Features) -> Features:
        features = dict(features)
        video = tf.convert_to_tensor(features[key])
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(video)[1:],                                      # one frame [H, W, C]
            bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
            seed=op_seed(features, _SALT_CROP, seed_key),
            min_object_covered=0.0,
            aspect_ratio_range=ratio,
            area_range=scale,
            max_attempts=max_attempts,
            use_image_if_no_bounding_boxes=True)
        crop = video[:, begin[0]:begin[0] + crop_size[0], begin[1]:begin[1] + crop_size[1]]
        features[key] = image_ops.resize_image(crop, size, method, antialias)
        return features

    return op


def swap_left_right(text: tf.Tensor) -> tf.Tensor:
    """Swaps the whole words "left" <-> "right" (also "Left"/"Right", "LEFT"/"RIGHT" and the
    forms "leftward(s)" <-> "rightward(s)") in a string tensor of any shape.

    Both directions hold at once ("left then right" -> "right then left"): "left" first becomes
    a placeholder (a Unicode private-use character), "right" becomes "left", the placeholder
    becomes "right". Word boundaries are RE2's ``\\b`` (ASCII word characters)."""
    text = tf.convert_to_tensor(text, tf.string)
    for i, (word, mirror) in enumerate(_MIRROR_WORDS):
        holder = chr(0xE000 + i)
        suffix = _SUFFIX[word]
        text = tf.strings.regex_replace(text, rf"\b{word}{suffix}\b", holder + r"\1")
        text = tf.strings.regex_replace(text, rf"\b{mirror}{suffix}\b", word + r"\1")
        text = tf.strings.regex_replace(text, holder, mirror)
    return text


def random_flip(*, key: str = VIDEO_KEY, text_keys: Sequence[str] = (),
                seed_key: str = SEED_KEY, flag_key: Optional[str] = None) -> Op:
    """With probability 1/2 mirrors every frame of ``[T, H, W, C]`` left-right and swaps
    left/right (:func:`swap_left_right`) in each of ``text_keys`` (string tensors of any shape,
    skipped when absent): ONE decision for the clip and its texts. Writes the decision (bool
    ``[]``) to ``features[flag_key]`` when given. Stateless (``seed_key``)."""
    text_keys = tuple(text_keys)

    def op(features: Features) -> Features:
        features = dict(features)
        seed = op_seed(features, _SALT_FLIP, seed_key)
        flip = tf.random.stateless_uniform([], seed) < 0.5
        video = tf.convert_to_tensor(features[key])
        features[key] = tf.cond(flip, lambda: tf.reverse(video, axis=[2]), lambda: video)
        for text_key in text_keys:
            if text_key in features:
                text = features[text_key]
                features[text_key] = tf.cond(flip, lambda t=text: swap_left_right(t),
                                             lambda t=text: t)
        if flag_key:
            features[flag_key] = flip
        return features

    return op


def value_range(vmin: float = -1.0, vmax: float = 1.0, *, key: str = VIDEO_KEY,
                in_min: float = 0.0, in_max: float = 255.0) -> Op:
    """Maps ``[in_min, in_max]`` linearly to ``[vmin, vmax]`` -> float32 ``[T, H, W, 3]``."""
    return image_ops.value_range(vmin, vmax, key=key, in_min=in_min, in_max=in_max)


def normalize_imagenet(*, key: str = VIDEO_KEY) -> Op:
    """uint8 RGB ``[T, H, W, 3]`` -> float32 ``(x / 255 - mean) / std`` (ImageNet mean / std)."""
    return image_ops.normalize_imagenet(key=key)
