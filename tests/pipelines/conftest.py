"""Shared fixtures of the pipelines tests: real images, dataset folders, a trained tokenizer."""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Sequence

import numpy as np
import pytest
import tensorflow as tf

from keras_mm.pipelines import features as F

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the number {}.", "a blurry photo of a {}.", "a drawing of the digit {}.",
             "the handwritten digit {}", "{} written by hand"]
EXTRA_SENTENCES = ["café naïve", "an old café with a naïve painting", "東京の写真",
                   "東京の夜の写真", "a photo of a chinese temple", "a red flower with leaves"]


@pytest.fixture(scope="session")
def digits():
    """1797 real 8x8 digits (sklearn) as uint8 RGB ``[N, 32, 32, 3]`` and labels ``[N]``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0 * 255.0).round().astype(np.uint8)            # [N, 8, 8]
    images = images.repeat(4, axis=1).repeat(4, axis=2)                        # [N, 32, 32]
    return np.stack([images] * 3, axis=-1), data.target.astype(np.int64)


@pytest.fixture(scope="session")
def photos():
    """sklearn's two real photos (china, flower), downscaled to uint8 ``[107, 160, 3]``."""
    from sklearn.datasets import load_sample_images

    return [tf.image.resize(im, [107, 160], antialias=True).numpy().round().astype(np.uint8)
            for im in load_sample_images().images]


@pytest.fixture(scope="session")
def corpus() -> List[str]:
    """Training sentences for the tokenizer (digit captions plus non-ASCII ones)."""
    return [t.format(n) for n in DIGIT_NAMES for t in TEMPLATES] + EXTRA_SENTENCES


@pytest.fixture(scope="session")
def sp_model(corpus) -> bytes:
    from keras_mm.pipelines.tokenizer import train_sentencepiece

    return train_sentencepiece(corpus, 1000)


def encode_png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(image).numpy()


def encode_jpeg(image: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(image, quality=95).numpy()


def write_split(folder: str, split: str, records: Sequence[bytes], num_shards: int) -> List[str]:
    """Writes serialized records round-robin into ``{split}.tfrecord-{i:05d}-of-{n:05d}``."""
    paths = [os.path.join(folder, f"{split}.tfrecord-{i:05d}-of-{num_shards:05d}")
             for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    for i, record in enumerate(records):
        writers[i % num_shards].write(record)
    for w in writers:
        w.close()
    return paths


@pytest.fixture
def label_as_text_folder(tmp_path, digits, sp_model) -> Callable[..., str]:
    """Makes a label-as-text folder: ``make(splits={"train": n, ...}, shards=2, tokenizer=True)``.

    Record i of a split has digit image i, label = its digit, id ``{split}-{i}``, and 1 + i % 3
    captions from the templates (first caption: template 0).
    """
    images, labels = digits

    def make(splits: Dict[str, int] = None, shards: int = 2, tokenizer: bool = True,
             name: str = "digits") -> str:
        folder = os.path.join(str(tmp_path), name)
        os.makedirs(folder, exist_ok=True)
        offset = 0
        for split, n in (splits or {"train": 24, "validation": 10}).items():
            records = []
            for i in range(n):
                image, label = images[offset + i], int(labels[offset + i])
                texts = [TEMPLATES[j].format(DIGIT_NAMES[label]) for j in range(1 + i % 3)]
                records.append(F.serialize({
                    F.IMAGE_ENCODED: encode_png(image), F.IMAGE_HEIGHT: 32, F.IMAGE_WIDTH: 32,
                    F.TEXTS: texts, F.ID: f"{split}-{i}", F.LABEL: label,
                    F.LABEL_NAME: DIGIT_NAMES[label]}, F.LABEL_AS_TEXT))
            offset += n
            write_split(folder, split, records, shards)
        with open(os.path.join(folder, "classnames.txt"), "w") as f:
            f.write("\n".join(DIGIT_NAMES) + "\n")
        if tokenizer:
            with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
                f.write(sp_model)
        return folder

    return make


@pytest.fixture
def image_text_folder(tmp_path, photos, sp_model) -> Callable[..., str]:
    """Makes an image-text folder of the two photos as JPEG, alternating, with 1 or 3 captions."""
    captions = [["a photo of a chinese temple", "an old café with a naïve painting",
                 "東京の写真"],
                ["a red flower with leaves"]]

    def make(splits: Dict[str, int] = None, shards: int = 2) -> str:
        folder = os.path.join(str(tmp_path), "photos")
        os.makedirs(folder, exist_ok=True)
        encoded = [encode_jpeg(p) for p in photos]
        for split, n in (splits or {"train": 8, "validation": 5}).items():
            records = [F.serialize({
                F.IMAGE_ENCODED: encoded[i % 2], F.IMAGE_HEIGHT: 107, F.IMAGE_WIDTH: 160,
                F.TEXTS: captions[i % 2], F.ID: f"{split}-{i}"}, F.IMAGE_TEXT) for i in range(n)]
            write_split(folder, split, records, shards)
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
            f.write(sp_model)
        return folder

    return make


@pytest.fixture
def eager_and_tfdata():
    """``run(op, features) -> (eager_result, tf_data_result)`` as NumPy dicts."""

    def run(op, features):
        eager = op(dict(features))
        ds = tf.data.Dataset.from_tensors(dict(features)).map(op)
        graph = next(iter(ds))
        to_np = lambda d: {k: np.asarray(v.numpy()) for k, v in d.items()}  # noqa: E731
        return to_np(eager), to_np(graph)

    return run
