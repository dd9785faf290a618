"""Image preprocessing ops: each function takes its config and returns ``op(features) -> features``.

Ops are pure (they return a new dict), TensorFlow-only and graph-compatible, so the same op runs
eagerly and inside ``tf.data``. Random ops are stateless: they draw from the per-example seed
``features["_seed"]`` (int ``[2]``), folded with a constant that is different for every op, so a
given seed gives the same result eagerly and inside ``tf.data`` whatever the op order.

Images are ``uint8 [H, W, 3]`` from :func:`decode` until :func:`value_range` /
:func:`normalize_imagenet` turn them into ``float32``; the resizing ops keep the input dtype
(rounding and saturating back to uint8), which is what RandAugment needs.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple, Union

import tensorflow as tf

Features = Dict[str, tf.Tensor]
Op = Callable[[Features], Features]
Size = Union[int, Tuple[int, int], Sequence[int]]

SEED_KEY = "_seed"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # of RGB values scaled to [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)

# Salts folded into the example seed, one per random op (any distinct constants).
_SALT_CROP = 0x1c40
_SALT_FLIP = 0x0f11


def _hw(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def op_seed(features: Features, salt: int, seed_key: str = SEED_KEY) -> tf.Tensor:
    """The seed of one random op: the example seed ``features[seed_key]`` (int ``[2]``) folded
    with ``salt`` -> int64 ``[2]``."""
    if seed_key not in features:
        raise KeyError(f"random op needs the per-example seed features[{seed_key!r}] (int [2]); "
                       "the datasets add it, add it yourself when calling ops directly")
    seed = tf.cast(features[seed_key], tf.int64)
    return tf.random.experimental.stateless_fold_in(seed, salt)


def resize_image(image: tf.Tensor, size: Size, method: str = "bilinear",
                 antialias: bool = False) -> tf.Tensor:
    """Resizes ``[H, W, C]`` to ``[h, w, C]`` keeping the dtype (uint8 is rounded and clipped)."""
    height, width = _hw(size)
    dtype = image.dtype
    out = tf.image.resize(image, [height, width], method=method, antialias=antialias)
    return _restore_dtype(out, dtype)


def _restore_dtype(image: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """tf.image.resize output (float32, or the input dtype for "nearest") -> ``dtype``."""
    if image.dtype == dtype:
        return image
    if dtype == tf.uint8:
        image = tf.cast(image, tf.float32)
        return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    return tf.cast(image, dtype)


# ----------------------------------------------------------------------------------- ops


def decode(key: str = "image/encoded", out_key: str = "image") -> Op:
    """Encoded JPEG/PNG/GIF/BMP string ``[]`` -> ``features[out_key]`` uint8 ``[H, W, 3]``."""

    def op(features: Features) -> Features:
        features = dict(features)
        image = tf.io.decode_image(features[key], channels=3, dtype=tf.uint8,
                                   expand_animations=False)
        features[out_key] = tf.ensure_shape(image, [None, None, 3])
        return features

    return op


def resize(size: Size, *, key: str = "image", method: str = "bilinear",
           antialias: bool = False) -> Op:
    """Plain resize (aspect ratio not kept): ``[H, W, 3]`` -> ``[h, w, 3]``, same dtype."""

    def op(features: Features) -> Features:
        features = dict(features)
        features[key] = resize_image(features[key], size, method, antialias)
        return features

    return op


def resize_small(short_side: int, *, key: str = "image", method: str = "bilinear",
                 antialias: bool = False) -> Op:
    """Resizes so that the shorter side is ``short_side``, keeping the aspect ratio (the longer
    side is rounded to the nearest integer): ``[H, W, 3]`` -> ``[h, w, 3]``, same dtype."""

    def op(features: Features) -> Features:
        features = dict(features)
        image = features[key]
        shape = tf.shape(image)
        height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
        scale = short_side / tf.minimum(height, width)
        new_h = tf.maximum(1, tf.cast(tf.round(height * scale), tf.int32))
        new_w = tf.maximum(1, tf.cast(tf.round(width * scale), tf.int32))
        dtype = image.dtype
        out = tf.image.resize(image, tf.stack([new_h, new_w]), method=method,
                              antialias=antialias)
        features[key] = _restore_dtype(out, dtype)
        return features

    return op


def central_crop(size: Size, *, key: str = "image") -> Op:
    """Crops the central ``[h, w]`` window (offsets ``(H - h) // 2``, ``(W - w) // 2``);
    the image must be at least that large."""
    crop_h, crop_w = _hw(size)

    def op(features: Features) -> Features:
        features = dict(features)
        image = features[key]
        static = image.shape[:2]
        if any(dim is not None and dim < want for dim, want in zip(static, (crop_h, crop_w))):
            raise ValueError(f"central_crop: image {static} smaller than the crop "
                             f"{crop_h}x{crop_w}")
        shape = tf.shape(image)
        tf.debugging.assert_greater_equal(
            shape[:2], tf.constant([crop_h, crop_w]),
            message=f"central_crop: image smaller than the crop {crop_h}x{crop_w}")
        top = (shape[0] - crop_h) // 2
        left = (shape[1] - crop_w) // 2
        crop = image[top:top + crop_h, left:left + crop_w]
        features[key] = tf.ensure_shape(crop, [crop_h, crop_w, image.shape[-1]])
        return features

    return op


def resize_center_crop(size: int, resize_ratio: float = 0.875, *, key: str = "image",
                       method: str = "bilinear", antialias: bool = False) -> Op:
    """Eval transform: resize the short side to ``round(size / resize_ratio)``, then crop the
    central ``[size, size]``. ``resize_ratio=1`` crops the largest central square."""
    if not 0.0 < resize_ratio <= 1.0:
        raise ValueError(f"resize_ratio must be in (0, 1], got {resize_ratio}")
    small = resize_small(int(round(size / resize_ratio)), key=key, method=method,
                         antialias=antialias)
    crop = central_crop(size, key=key)
    return compose(small, crop)


def random_resized_crop(size: Size, *, scale: Tuple[float, float] = (0.08, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3), max_attempts: int = 10,
                        key: str = "image", seed_key: str = SEED_KEY, method: str = "bilinear",
                        antialias: bool = False) -> Op:
    """Inception-style crop: a random window covering a ``scale`` fraction of the image area with
    aspect ratio (width / height) in ``ratio`` (the whole image after ``max_attempts`` misses),
    resized to ``size``: ``[H, W, 3]`` -> ``[h, w, 3]``, same dtype. Stateless (``seed_key``)."""
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {ratio}")

    def op(features: Features) -> Features:
        features = dict(features)
        image = features[key]
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
            seed=op_seed(features, _SALT_CROP, seed_key),
            min_object_covered=0.0,
            aspect_ratio_range=ratio,
            area_range=scale,
            max_attempts=max_attempts,
            use_image_if_no_bounding_boxes=True)
        crop = tf.slice(image, begin, crop_size)
        features[key] = resize_image(crop, size, method, antialias)
        return features

    return op


def random_flip_lr(*, key: str = "image", seed_key: str = SEED_KEY) -> Op:
    """Mirrors ``[H, W, C]`` left-right with probability 1/2 (stateless, ``seed_key``)."""

    def op(features: Features) -> Features:
        features = dict(features)
        features[key] = tf.image.stateless_random_flip_left_right(
            features[key], op_seed(features, _SALT_FLIP, seed_key))
        return features

    return op


def value_range(vmin: float = -1.0, vmax: float = 1.0, *, key: str = "image",
                in_min: float = 0.0, in_max: float = 255.0) -> Op:
    """Maps ``[in_min, in_max]`` (uint8 default 0..255) linearly to ``[vmin, vmax]`` ->
    float32, same shape."""

    def op(features: Features) -> Features:
        features = dict(features)
        image = tf.cast(features[key], tf.float32)
        image = (image - in_min) / (in_max - in_min)
        features[key] = image * (vmax - vmin) + vmin
        return features

    return op


def normalize_imagenet(*, key: str = "image") -> Op:
    """uint8 RGB ``[..., 3]`` -> float32 ``(x / 255 - mean) / std`` with the ImageNet mean/std."""

    def op(features: Features) -> Features:
        features = dict(features)
        image = tf.cast(features[key], tf.float32) / 255.0
        features[key] = (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)
        return features

    return op


def compose(*ops: Op) -> Op:
    """Applies ``ops`` left to right."""

    def op(features: Features) -> Features:
        for fn in ops:
            features = fn(features)
        return features

    return op
