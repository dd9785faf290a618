"""Caption samples in TensorBoard: written, then read back from the event files with TensorFlow's own
summary_iterator (images decoded from the PNGs, the table's markdown text)."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_mm.evaluation.caption_samples import write_caption_samples


def read_events(logdir):
    """{(tag, step): [value tensor as NumPy, ...]} from every event file under logdir."""
    found = {}
    for path in sorted(glob.glob(os.path.join(str(logdir), "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault((value.tag, event.step), []).append(
                    (value.metadata.plugin_data.plugin_name, tf.make_ndarray(value.tensor)))
    return found


def _images(n=5, size=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_images_and_table_round_trip(tmp_path):
    images = _images()
    predictions = ["a seven", "two | three", "", "café\nnoir", "not written"]
    references = ["seven", ["two", "three"], "four", "café noir", "five"]
    table = write_caption_samples(tmp_path, 12, images, predictions, references, max_samples=4,
                                  ids=["img-a", "img-b", "img-c", "img-d", "img-e"])
    events = read_events(tmp_path)
    assert set(events) == {("caption_samples/images", 12), ("caption_samples/table", 12)}

    (plugin, image_tensor), = events[("caption_samples/images", 12)]
    assert plugin == "images"
    # tf.summary.image's tensor: [width, height, PNG 1, ..., PNG k] as strings.
    assert image_tensor[0] == b"6" and image_tensor[1] == b"6" and len(image_tensor) == 2 + 4
    for i, png in enumerate(image_tensor[2:]):
        np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), images[i])

    (plugin, text_tensor), = events[("caption_samples/table", 12)]
    assert plugin == "text"
    text = text_tensor.item().decode("utf-8")
    assert text == table
    assert text.splitlines() == [
        "| id | prediction | reference |",
        "|---|---|---|",
        "| img-a | a seven | seven |",
        "| img-b | two \\| three | two / three |",
        "| img-c | \u2014 | four |",
        "| img-d | café noir | café noir |",
    ]


@pytest.mark.parametrize("low", [-1.0, 0.0])
def test_float_images_are_scaled_to_uint8(tmp_path, low):
    """Floats in [-1, 1] (any negative value) or [0, 1] map to 0..255."""
    expected = np.array([[[[0], [128]], [[255], [64]]]], np.uint8)  # [1, 2, 2, 1]
    unit = expected.astype(np.float32) / 255.0
    images = unit * 2.0 - 1.0 if low < 0 else unit
    write_caption_samples(tmp_path, 0, images, ["p"], ["r"])
    (_, image_tensor), = read_events(tmp_path)[("caption_samples/images", 0)]
    decoded = tf.io.decode_png(image_tensor[2]).numpy()
    np.testing.assert_array_equal(decoded, expected[0])


def test_default_ids_and_several_steps(tmp_path):
    for step in (1, 2):
        write_caption_samples(tmp_path, step, _images(3), [f"p{step}"] * 3, ["r"] * 3, max_samples=8)
    events = read_events(tmp_path)
    for step in (1, 2):
        (_, text), = events[("caption_samples/table", step)]
        rows = text.item().decode("utf-8").splitlines()[2:]
        assert rows == [f"| {i} | p{step} | r |" for i in range(3)]
        (_, image_tensor), = events[("caption_samples/images", step)]
        assert len(image_tensor) == 2 + 3


def test_bad_images_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="images"):
        write_caption_samples(tmp_path, 0, np.zeros((2, 4, 4, 2), np.float32), ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="images"):
        write_caption_samples(tmp_path, 0, _images(1), ["a", "b"], ["a", "b"])
