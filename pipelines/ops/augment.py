"""RandAugment (Cubuk et al. 2019, arXiv:1909.13719) driven by a per-example stateless seed.

``official.vision.ops.augment.RandAugment`` draws its randomness (which transformation, the sign
of rotations / shears / translations, the cutout position) with *stateful* ``tf.random.uniform``
ops, so its output depends on how many images the pipeline processed before and on the order of
parallel map calls: it cannot give the same result for the same example eagerly and inside
``tf.data``. This module keeps Model Garden's image transformations (``autocontrast``,
``equalize``, ``wrapped_rotate``, ``shear_x``, ...) and its policy (uniform choice among the ops
plus an identity branch for each of ``num_layers`` layers; the magnitude -> argument mapping of
``official.vision.ops.augment.level_to_arg``; replace value 128), and draws every random decision
with stateless ops from ``features["_seed"]``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
from official.vision.ops import augment as mg  # Model Garden image transformations

from keras_mm.pipelines.ops import image as image_ops

Features = Dict[str, tf.Tensor]
Op = Callable[[Features], Features]

MAX_LEVEL = 10.0
REPLACE = 128
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
       "Cutout", "SolarizeAdd")
_SIGNED = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
_SALT_RANDAUGMENT = 0x5a11


def _arguments(name: str, magnitude: float, cutout_const: float, translate_const: float):
    """Unsigned argument of op ``name`` at ``magnitude`` in [0, 10] (Model Garden's mapping)."""
    level = float(magnitude)
    mult = lambda m: int((level / MAX_LEVEL) * m)  # noqa: E731
    enhance = (level / MAX_LEVEL) * 1.8 + 0.1
    return {
        "AutoContrast": None,
        "Equalize": None,
        "Invert": None,
        "Rotate": (level / MAX_LEVEL) * 30.0,               # degrees
        "Posterize": mult(4),                              # bits kept
        "Solarize": mult(256),                             # threshold
        "SolarizeAdd": mult(110),                          # addition
        "Color": enhance, "Contrast": enhance, "Brightness": enhance, "Sharpness": enhance,
        "ShearX": (level / MAX_LEVEL) * 0.3, "ShearY": (level / MAX_LEVEL) * 0.3,
        "TranslateX": (level / MAX_LEVEL) * float(translate_const),   # pixels
        "TranslateY": (level / MAX_LEVEL) * float(translate_const),
        "Cutout": mult(cutout_const),                      # half size of the square
    }[name]


def _cutout(image: tf.Tensor, seed: tf.Tensor, half: int) -> tf.Tensor:
    """Fills the square ``[cy - half, cy + half) x [cx - half, cx + half)`` (clipped) with 128;
    the centre is uniform over the image."""
    shape = tf.shape(image)
    centre = tf.random.stateless_uniform([2], seed, minval=0, maxval=tf.int32.max, dtype=tf.int32)
    cy, cx = centre[0] % shape[0], centre[1] % shape[1]
    rows = tf.range(shape[0])[:, None]
    cols = tf.range(shape[1])[None, :]
    inside = ((rows >= cy - half) & (rows < cy + half)) & ((cols >= cx - half) & (cols < cx + half))
    return tf.where(inside[:, :, None], tf.constant(REPLACE, image.dtype), image)


def _apply(name: str, image: tf.Tensor, arg, sign: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Applies op ``name`` to uint8 ``[H, W, 3]``; ``sign`` is +1/-1 for the signed ops."""
    if name in _SIGNED:
        arg = sign * arg
    if name == "AutoContrast":
        return mg.autocontrast(image)
    if name == "Equalize":
        return mg.equalize(image)
    if name == "Invert":
        return mg.invert(image)
    if name == "Rotate":
        return mg.wrapped_rotate(image, arg, [REPLACE] * 3)
    if name == "Posterize":
        return mg.posterize(image, arg)
    if name == "Solarize":
        return mg.solarize(image, arg)
    if name == "SolarizeAdd":
        return mg.solarize_add(image, arg)
    if name == "Color":
        return mg.color(image, arg)
    if name == "Contrast":
        return mg.contrast(image, arg)
    if name == "Brightness":
        return mg.brightness(image, arg)
    if name == "Sharpness":
        return mg.sharpness(image, arg)
    if name == "ShearX":
        return mg.shear_x(image, arg, [REPLACE] * 3)
    if name == "ShearY":
        return mg.shear_y(image, arg, [REPLACE] * 3)
    if name == "TranslateX":
        return mg.translate_x(image, arg, [REPLACE] * 3)
    if name == "TranslateY":
        return mg.translate_y(image, arg, [REPLACE] * 3)
    if name == "Cutout":
        return _cutout(image, seed, arg)
    raise ValueError(f"unknown RandAugment op {name!r}")


def rand_augment_image(image: tf.Tensor, seed: tf.Tensor, *, num_layers: int = 2,
                       magnitude: float = 10.0, ops: Sequence[str] = OPS,
                       cutout_const: float = 40.0, translate_const: float = 100.0
                       ) -> Tuple[tf.Tensor, tf.Tensor]:
    """RandAugment of one uint8 image ``[H, W, 3]`` with seed int ``[2]``.

    For each of ``num_layers`` layers one of ``len(ops) + 1`` branches is chosen uniformly, the
    last being the identity (as in Model Garden), and applied at ``magnitude``; rotations,
    shears and translations get a random sign.

    Returns:
      (uint8 ``[H, W, 3]``, int32 ``[num_layers]`` the chosen branch per layer,
      ``len(ops)`` = identity).
    """
    ops = list(ops)
    if not ops:
        raise ValueError("RandAugment needs at least one op")
    unknown = [name for name in ops if name not in OPS]
    if unknown:
        raise ValueError(f"unknown RandAugment ops {unknown}; known: {OPS}")
    if not 0.0 <= magnitude <= MAX_LEVEL:
        raise ValueError(f"RandAugment magnitude must be in [0, {MAX_LEVEL}], got {magnitude}")
    if image.dtype != tf.uint8:
        raise ValueError(f"RandAugment takes uint8 images, got {image.dtype}")
    args = [_arguments(name, magnitude, cutout_const, translate_const) for name in ops]
    seed = tf.cast(seed, tf.int64)
    chosen = []
    for layer in range(num_layers):
        layer_seeds = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, layer), 3)  # [3, 2]
        index = tf.random.stateless_uniform([], layer_seeds[0], minval=0, maxval=len(ops) + 1,
                                            dtype=tf.int32)
        sign = tf.where(tf.random.stateless_uniform([], layer_seeds[1]) < 0.5, -1.0, 1.0)
        branches = [
            (lambda name=name, arg=arg, img=image: _apply(name, img, arg, sign, layer_seeds[2]))
            for name, arg in zip(ops, args)
        ]
        branches.append(lambda img=image: tf.identity(img))
        image = tf.switch_case(index, branches)
        image = tf.ensure_shape(image, [None, None, 3])
        chosen.append(index)
    chosen = tf.stack(chosen) if chosen else tf.zeros([0], tf.int32)
    return image, chosen


def randaugment(num_layers: int = 2, magnitude: float = 10.0, *,
                exclude_ops: Optional[Sequence[str]] = None, cutout_const: float = 40.0,
                translate_const: float = 100.0, key: str = "image",
                seed_key: str = image_ops.SEED_KEY) -> Op:
    """The RandAugment op: uint8 ``features[key]`` ``[H, W, 3]`` -> uint8 ``[H, W, 3]``,
    stateless from ``features[seed_key]`` (int ``[2]``). ``exclude_ops`` removes ops from
    :data:`OPS`."""
    unknown = sorted(set(exclude_ops or ()) - set(OPS))
    if unknown:
        raise ValueError(f"unknown RandAugment ops to exclude {unknown}; known: {OPS}")
    ops: List[str] = [name for name in OPS if name not in set(exclude_ops or ())]

    def op(features: Features) -> Features:
        features = dict(features)
        seed = image_ops.op_seed(features, _SALT_RANDAUGMENT, seed_key)
        features[key], _ = rand_augment_image(
            features[key], seed, num_layers=num_layers, magnitude=magnitude, ops=ops,
            cutout_const=cutout_const, translate_const=translate_const)
        return features

    return op
