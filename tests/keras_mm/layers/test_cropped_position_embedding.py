"""Cropped positional embeddings (RO-ViT / MaMMUT) against a NumPy bilinear reference."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_mm.encoders.vit import ViTEncoder
from keras_mm.layers.cropped_position_embedding import crop_box, cropped_position_table

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(3)


def _np_resize(table, out_h, out_w):
    """Bilinear resize, half-pixel centres, edge clamp (no antialias), written out."""
    h, w, _ = table.shape
    return _np_sample(table, (np.arange(out_h) + 0.5) * h / out_h - 0.5,
                      (np.arange(out_w) + 0.5) * w / out_w - 0.5)


def _np_sample(table, ys, xs):
    h, w, _ = table.shape
    out = np.zeros((len(ys), len(xs), table.shape[2]))
    for i, y in enumerate(np.clip(ys, 0, h - 1)):
        for j, x in enumerate(np.clip(xs, 0, w - 1)):
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * ((1 - dx) * table[y0, x0] + dx * table[y0, x1])
                         + dy * ((1 - dx) * table[y1, x0] + dx * table[y1, x1]))
    return out


def test_full_box_without_upsampling_is_the_identity():
    table = RNG.normal(size=(4, 5, 3)).astype("float32")
    out = ops.convert_to_numpy(cropped_position_table(table, 1.0, (0.0, 0.0, 1.0, 1.0)))
    np.testing.assert_allclose(out, table, atol=1e-6)


@pytest.mark.parametrize("box", [(0.0, 0.0, 1.0, 1.0), (0.25, 0.5, 0.5, 0.25),
                                 (0.1, 0.0, 0.9, 0.6)])
def test_crop_matches_numpy(box):
    table = RNG.normal(size=(4, 4, 2)).astype("float32")
    up = _np_resize(table.astype(np.float64), 8, 8)                  # upsample x2
    y0, x0, hh, ww = box
    ys = (y0 + (np.arange(4) + 0.5) / 4 * hh) * 8 - 0.5
    xs = (x0 + (np.arange(4) + 0.5) / 4 * ww) * 8 - 0.5
    expected = _np_sample(up, ys, xs)
    out = ops.convert_to_numpy(cropped_position_table(table, 2.0, box))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_random_boxes_stay_inside_and_follow_the_scale():
    seed = keras.random.SeedGenerator(0)
    for _ in range(50):
        y0, x0, h, w = (float(ops.convert_to_numpy(v)) for v in crop_box(seed))
        assert 0 <= y0 and y0 + h <= 1 + 1e-6 and 0 <= x0 and x0 + w <= 1 + 1e-6
        assert 0.1 * 0.5 <= h * w <= 1.0 + 1e-6     # clipped boxes can only shrink the area


def test_vit_uses_crops_in_training_only():
    keras.utils.set_random_seed(0)
    kwargs = dict(image_size=16, patch_size=4, width=8, depth=1, heads=2, mlp_dim=16,
                  pool="gap")
    cropped = ViTEncoder(position_crop=4.0, **kwargs)
    plain = ViTEncoder(**kwargs)
    images = RNG.normal(size=(2, 16, 16, 3)).astype("float32")
    cropped(images), plain(images)
    for target, source in zip(plain.weights, cropped.weights):
        target.assign(source)
    np.testing.assert_allclose(ops.convert_to_numpy(cropped(images)),
                               ops.convert_to_numpy(plain(images)), atol=1e-6)
    trained = ops.convert_to_numpy(cropped(images, training=True))
    assert np.abs(trained - ops.convert_to_numpy(plain(images))).max() > 1e-4
    assert cropped.get_config()["position_crop"] == 4.0
    assert "position_crop" not in plain.get_config()
    with pytest.raises(ValueError, match="position_crop"):
        ViTEncoder(position_crop=2.0, pos_embedding="sincos2d", **kwargs)
