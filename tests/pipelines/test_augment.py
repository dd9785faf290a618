"""keras_mm.pipelines.ops.augment: stateless RandAugment on Model Garden's transformations."""

import numpy as np
import pytest
import tensorflow as tf
from official.vision.ops import augment as mg

from keras_mm.pipelines.ops import augment as A


def seed(a, b=0):
    return tf.constant([a, b], tf.int64)


@pytest.fixture(scope="module")
def image(photos):
    return tf.constant(photos[0][:64, :80])


def test_same_eagerly_and_in_tf_data(image, eager_and_tfdata):
    eager, graph = eager_and_tfdata(A.randaugment(2, 9), {"image": image, "_seed": seed(4, 42)})
    assert eager["image"].dtype == np.uint8 and eager["image"].shape == (64, 80, 3)
    np.testing.assert_array_equal(eager["image"], graph["image"])


def test_parallel_tf_data_map_is_per_example_reproducible(image):
    """Many examples through a parallel, non-deterministic map give each example the result of
    its own seed, the same as eagerly (stateful random ops would not)."""
    op = A.randaugment(2, 10)
    seeds = np.stack([np.arange(16), np.full(16, 3)], axis=1).astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices({"_seed": seeds, "i": np.arange(16)}).map(
        lambda f: {**f, "image": image}).map(op, num_parallel_calls=4, deterministic=False)
    for out in ds:
        expected = op({"image": image, "_seed": tf.constant(seeds[int(out["i"])])})["image"]
        np.testing.assert_array_equal(out["image"].numpy(), expected.numpy())


def test_choice_is_uniform_over_ops_and_identity(image):
    counts = np.zeros(len(A.OPS) + 1, int)
    for i in range(340):
        _, chosen = A.rand_augment_image(image, seed(i, 9), num_layers=1)
        counts[int(chosen[0])] += 1
    assert (counts > 0).all()                     # every op and the identity branch happen
    assert counts.max() < 3 * counts.mean()       # roughly uniform (expected 20 each)


def test_zero_layers_is_identity(image):
    out = A.randaugment(0, 10)({"image": image, "_seed": seed(1)})["image"]
    np.testing.assert_array_equal(out.numpy(), image.numpy())


def test_invert_and_posterize_against_numpy(image):
    img = image.numpy()
    outcomes = set()
    for name, expected in [("Invert", 255 - img), ("Posterize", img & 0xF0)]:  # M=10 -> 4 bits
        op = A.randaugment(1, 10, exclude_ops=[o for o in A.OPS if o != name])
        for i in range(12):
            out = op({"image": image, "_seed": seed(i)})["image"].numpy()
            if np.array_equal(out, img):
                outcomes.add((name, "identity"))
            else:
                np.testing.assert_array_equal(out, expected)
                outcomes.add((name, "applied"))
    assert outcomes == {("Invert", "identity"), ("Invert", "applied"),
                        ("Posterize", "identity"), ("Posterize", "applied")}


def test_rotate_matches_model_garden_with_random_sign(image):
    """Magnitude 10 rotates by +-30 degrees (Model Garden's level_to_arg), fill 128."""
    signs = set()
    plus = mg.wrapped_rotate(image, 30.0, [128] * 3).numpy()
    minus = mg.wrapped_rotate(image, -30.0, [128] * 3).numpy()
    for i in range(16):
        out, chosen = A.rand_augment_image(image, seed(i), num_layers=1, ops=["Rotate"])
        out = out.numpy()
        if int(chosen[0]) == 1:
            np.testing.assert_array_equal(out, image.numpy())
        elif np.array_equal(out, plus):
            signs.add(+1)
        else:
            np.testing.assert_array_equal(out, minus)
            signs.add(-1)
    assert signs == {+1, -1}


def test_cutout_square(image):
    img = image.numpy()
    for i in range(8):
        out, chosen = A.rand_augment_image(image, seed(i), num_layers=1, ops=["Cutout"],
                                           magnitude=5)   # half size int(5 / 10 * 40) = 20
        out = out.numpy()
        if int(chosen[0]) == 1:
            continue
        changed = np.any(out != img, axis=-1)
        rows, cols = np.nonzero(changed)
        assert (out[changed] == 128).all()
        assert rows.max() - rows.min() < 40 and cols.max() - cols.min() < 40
        # the filled region is one axis-aligned rectangle
        filled = np.all(out == 128, axis=-1)
        box = filled[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all()


def test_rejects_bad_arguments(image):
    with pytest.raises(ValueError, match="magnitude"):
        A.rand_augment_image(image, seed(0), magnitude=11)
    with pytest.raises(ValueError, match="unknown"):
        A.rand_augment_image(image, seed(0), ops=["Mixup"])
    with pytest.raises(ValueError, match="uint8"):
        A.rand_augment_image(tf.cast(image, tf.float32), seed(0))
