"""keras_mm.pipelines.ops.image: decode, crops, resizes, flips, value ranges."""

import numpy as np
import pytest
import tensorflow as tf

from keras_mm.pipelines.ops import image as I


def coordinate_image(height, width):
    """uint8 [H, W, 3] whose pixel (y, x) is (y, x, 7): every pixel names its position."""
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([y, x, np.full_like(y, 7)], axis=-1).astype(np.uint8)


def seed(a, b=0):
    return tf.constant([a, b], tf.int64)


OPS = {
    "decode": lambda: I.decode(),
    "resize": lambda: I.resize(40),
    "resize_small": lambda: I.resize_small(50),
    "central_crop": lambda: I.central_crop(30),
    "resize_center_crop": lambda: I.resize_center_crop(32, 0.875),
    "random_resized_crop": lambda: I.random_resized_crop(48),
    "random_flip_lr": lambda: I.random_flip_lr(),
    "value_range": lambda: I.value_range(),
    "normalize_imagenet": lambda: I.normalize_imagenet(),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_same_eagerly_and_in_tf_data(name, photos, eager_and_tfdata):
    image = photos[0]
    features = {"image": tf.constant(image), "_seed": seed(11, 5),
                "image/encoded": tf.constant(tf.io.encode_jpeg(image).numpy())}
    eager, graph = eager_and_tfdata(OPS[name](), features)
    assert eager.keys() == graph.keys()
    for key in eager:
        assert eager[key].dtype == graph[key].dtype
        np.testing.assert_array_equal(eager[key], graph[key], err_msg=f"{name}: {key}")


def test_decode_png_jpeg_and_gray(photos):
    image = photos[1]
    png = I.decode()({"image/encoded": tf.io.encode_png(image)})
    assert png["image"].dtype == tf.uint8 and png["image"].shape == image.shape
    np.testing.assert_array_equal(png["image"].numpy(), image)   # PNG is lossless
    assert "image/encoded" in png                                 # input kept
    jpeg = I.decode()({"image/encoded": tf.io.encode_jpeg(image, quality=95)})["image"].numpy()
    assert jpeg.shape == image.shape
    assert np.abs(jpeg.astype(float) - image).mean() < 4.0
    gray = I.decode()({"image/encoded": tf.io.encode_png(image[:, :, :1])})["image"].numpy()
    assert gray.shape == image.shape[:2] + (3,)
    np.testing.assert_array_equal(gray[..., 2], image[..., 0])


def window(crop):
    """(top, left, height, width) of the source window of a crop of a coordinate image."""
    rows, cols = crop[..., 0].astype(int), crop[..., 1].astype(int)
    return rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def test_random_resized_crop_window_and_variation():
    height, width, size = 150, 240, 256   # size >= any window side: nearest upsampling is exact
    image = tf.constant(coordinate_image(height, width))
    scale, ratio = (0.2, 0.6), (0.5, 2.0)
    op = I.random_resized_crop(size, scale=scale, ratio=ratio, method="nearest")
    windows = set()
    for i in range(30):
        out = op({"image": image, "_seed": seed(i)})["image"].numpy()
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        assert (out[..., 2] == 7).all()
        top, left, h, w = window(out)
        # contiguous window inside the image
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        np.testing.assert_array_equal(out[:, :, 0][:, 0], np.sort(out[:, 0, 0]))
        area = h * w / (height * width)
        assert scale[0] - 0.02 <= area <= scale[1] + 0.02, area
        assert ratio[0] - 0.05 <= w / h <= ratio[1] + 0.05, (w, h)
        windows.add((top, left, h, w))
    assert len(windows) >= 25   # the window really depends on the seed
    # and only on the seed
    again = op({"image": image, "_seed": seed(3)})["image"].numpy()
    np.testing.assert_array_equal(again, op({"image": image, "_seed": seed(3)})["image"].numpy())


def test_random_resized_crop_needs_seed_and_valid_ranges():
    with pytest.raises(KeyError, match="_seed"):
        I.random_resized_crop(8)({"image": tf.zeros([10, 10, 3], tf.uint8)})
    with pytest.raises(ValueError, match="scale"):
        I.random_resized_crop(8, scale=(0.5, 1.5))


def test_random_flip():
    image = coordinate_image(20, 30)
    op = I.random_flip_lr()
    outcomes = []
    for i in range(20):
        out = op({"image": tf.constant(image), "_seed": seed(i, 1)})["image"].numpy()
        if np.array_equal(out, image):
            outcomes.append("same")
        else:
            np.testing.assert_array_equal(out, image[:, ::-1])
            outcomes.append("flipped")
    assert 3 <= outcomes.count("flipped") <= 17


def test_central_crop_picks_the_centre():
    image = coordinate_image(101, 200)
    out = I.central_crop((31, 40))({"image": tf.constant(image)})["image"].numpy()
    assert out.shape == (31, 40, 3)
    assert (out[0, 0, 0], out[0, 0, 1]) == ((101 - 31) // 2, (200 - 40) // 2)   # (35, 80)
    assert (out[-1, -1, 0], out[-1, -1, 1]) == (35 + 30, 80 + 39)


def test_resize_center_crop_ratio_one_is_a_pure_crop():
    image = coordinate_image(120, 240)
    out = I.resize_center_crop(60, 0.5)({"image": tf.constant(image)})["image"].numpy()
    # short side resized to 60 / 0.5 = 120 (no change), central 60 x 60
    np.testing.assert_array_equal(out, image[30:90, 90:150])


def test_resize_center_crop_scaled():
    image = coordinate_image(120, 240)
    out = I.resize_center_crop(48, 0.8)({"image": tf.constant(image)})["image"].numpy()
    assert out.shape == (48, 48, 3)
    # 120x240 -> 60x120 (factor 2), crop rows/cols 6.. and 36..; output pixel i samples source
    # coordinate 2 * (offset + i) + 0.5 of the linear ramp.
    rows = 2 * (6 + np.arange(48)) + 0.5
    cols = 2 * (36 + np.arange(48)) + 0.5
    np.testing.assert_allclose(out[:, 0, 0], rows, atol=0.51)
    np.testing.assert_allclose(out[0, :, 1], cols, atol=0.51)
    assert abs(out[..., 0].mean() - 59.5) <= 0.51 and abs(out[..., 1].mean() - 119.5) <= 0.51


def test_resize_small_keeps_aspect_ratio():
    out = I.resize_small(50)({"image": tf.zeros([100, 301, 3], tf.uint8)})["image"]
    assert out.shape == (50, 150, 3) and out.dtype == tf.uint8   # round(301 / 2) = 150
    out = I.resize_small(50)({"image": tf.zeros([300, 100, 3], tf.float32)})["image"]
    assert out.shape == (150, 50, 3) and out.dtype == tf.float32


def test_resize_keeps_dtype_and_values():
    image = np.full([37, 53, 3], 200, np.uint8)
    out = I.resize((20, 30))({"image": tf.constant(image)})["image"]
    assert out.shape == (20, 30, 3) and out.dtype == tf.uint8
    assert (out.numpy() == 200).all()


def test_value_range_and_imagenet():
    pixels = np.array([[[0, 128, 255]]], np.uint8)
    out = I.value_range()({"image": tf.constant(pixels)})["image"].numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[-1.0, 128 / 255 * 2 - 1, 1.0]]], atol=1e-6)
    out = I.value_range(0, 1)({"image": tf.constant(pixels)})["image"].numpy()
    np.testing.assert_allclose(out, [[[0.0, 128 / 255, 1.0]]], atol=1e-6)
    out = I.normalize_imagenet()({"image": tf.constant(pixels)})["image"].numpy()
    expected = (np.array([0, 128, 255]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-5)


def test_central_crop_of_a_too_small_image_fails():
    op = I.central_crop(40)
    with pytest.raises(ValueError, match="smaller than the crop"):
        op({"image": tf.zeros([30, 50, 3], tf.uint8)})
    # static shape: caught when the map function is traced
    with pytest.raises(ValueError, match="smaller than the crop"):
        tf.data.Dataset.from_tensors({"image": tf.zeros([30, 50, 3], tf.uint8)}).map(op)
    # dynamic shape: caught when the example runs
    ds = tf.data.Dataset.from_generator(lambda: iter([np.zeros([30, 50, 3], np.uint8)]),
                                        output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="smaller than the crop"):
        next(iter(ds.map(lambda x: op({"image": x}))))
