"""A small real export for the serving tests, built without keras_mm's models.

``save_test_export(path, sp_model, seed)`` writes a SavedModel whose signatures follow DESIGN.md's
contract shape-wise, with tensorflow-text ops inside (the SentencePiece tokenizer):

| signature | inputs | outputs |
|---|---|---|
| ``embed_image``, ``serving_default`` | ``image_bytes`` string[N] | ``embedding`` float32[N, D] |
| ``embed_text`` | ``text`` string[N] | ``embedding`` float32[N, D] |
| ``classify`` | ``image_bytes`` string[N], ``labels`` string[K] | ``scores`` float32[N, K] |
| ``tokenize`` | ``text`` string[N] | ``ids`` int32[N, L], ``length`` int32[N], ``normalized`` string[N] |
| ``echo`` | ``text`` string[N] | ``text`` string[N], ``text_bytes`` string[N] |

Embeddings are fixed functions of the inputs: the L2-normalised sum of a random table's rows over
the token ids, and the L2-normalised projection of the image decoded and resized to 8x8.
Empty or non-image bytes fail with InvalidArgumentError (a tf.debugging assertion and
tf.io.decode_image).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

DIM = 8
MAX_LEN = 12
CORPUS = [template.format(name)
          for name in ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                       "nine"]
          for template in ["a photo of the number {}.", "the handwritten digit {}",
                           "a drawing of a {}"]] + ["東京の写真", "café"]


def train_test_tokenizer() -> bytes:
    from keras_mm.pipelines.tokenizer import train_sentencepiece

    return train_sentencepiece(CORPUS, 320)


class _TestExport(tf.Module):

    def __init__(self, sp_model: bytes, seed: int):
        super().__init__()
        from keras_mm.pipelines.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(sp_model, max_len=MAX_LEN)
        rng = np.random.default_rng(seed)
        self.token_table = tf.Variable(
            rng.normal(size=[self.tokenizer.vocab_size, DIM]).astype(np.float32))
        self.pixel_projection = tf.Variable(rng.normal(size=[8 * 8 * 3, DIM]).astype(np.float32))

    def _images(self, image_bytes):
        """string [N] -> float32 [N, 8 * 8 * 3]."""
        def decode(data):
            not_empty = tf.debugging.assert_greater(tf.strings.length(data), 0,
                                                    message="image_bytes holds an empty string")
            with tf.control_dependencies([not_empty]):
                image = tf.io.decode_image(data, channels=3, expand_animations=False)
            return tf.image.resize(tf.cast(image, tf.float32) / 255.0, [8, 8])

        images = tf.map_fn(decode, image_bytes,
                           fn_output_signature=tf.TensorSpec([8, 8, 3], tf.float32))
        return tf.reshape(images, [-1, 8 * 8 * 3])

    def _image_embedding(self, image_bytes):
        return tf.math.l2_normalize(tf.matmul(self._images(image_bytes), self.pixel_projection),
                                    axis=-1)

    def _text_embedding(self, text):
        ids = self.tokenizer.tokenize(text)                                   # [N, L]
        mask = tf.cast(self.tokenizer.mask(ids), tf.float32)[..., tf.newaxis]
        summed = tf.reduce_sum(tf.gather(self.token_table, ids) * mask, axis=1)  # [N, D]
        return tf.math.l2_normalize(summed, axis=-1)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def embed_image(self, image_bytes):
        return {"embedding": self._image_embedding(image_bytes)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def embed_text(self, text):
        return {"embedding": self._text_embedding(text)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"),
                                  tf.TensorSpec([None], tf.string, name="labels")])
    def classify(self, image_bytes, labels):
        cos = tf.matmul(self._image_embedding(image_bytes), self._text_embedding(labels),
                        transpose_b=True)                                     # [N, K]
        return {"scores": tf.sigmoid(10.0 * cos - 2.0)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def tokenize(self, text):
        ids = self.tokenizer.tokenize(text)
        return {"ids": ids, "length": self.tokenizer.lengths(ids),
                "normalized": self.tokenizer.normalize(text)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def echo(self, text):
        return {"text": tf.identity(text), "text_bytes": tf.identity(text)}


def save_test_export(path: str, sp_model: bytes, seed: int) -> str:
    """Writes the test SavedModel to ``path`` (e.g. ``<base>/<version>``); returns ``path``."""
    module = _TestExport(sp_model, seed)
    signatures = {name: getattr(module, name).get_concrete_function()
                  for name in ("embed_image", "embed_text", "classify", "tokenize", "echo")}
    signatures["serving_default"] = signatures["embed_image"]
    tf.saved_model.save(module, path, signatures=signatures)
    return path


def png(seed: int, size: int = 16) -> bytes:
    """A real PNG of random pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=[size, size, 3], dtype=np.uint8)
    return tf.io.encode_png(pixels).numpy()


def jpeg(seed: int, size: int = 24) -> bytes:
    """A real JPEG of a smooth random image."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=[4, 4, 3]).astype(np.float32)
    image = tf.image.resize(small[np.newaxis], [size, size])[0]
    return tf.io.encode_jpeg(tf.cast(tf.round(image), tf.uint8)).numpy()
