"""TensorFlow backend only: the encoders trace with an unknown batch size, compile with XLA and
export to a SavedModel that reproduces their outputs (what keras_mm.export builds on)."""

import keras
import numpy as np
import pytest

from keras_mm.encoders.text import TextEncoder
from keras_mm.encoders.vit import ViTEncoder

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="SavedModel export is TensorFlow only")


def test_encoders_export_to_saved_model_and_compile_with_xla(tmp_path):
    import tensorflow as tf

    images = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype("float32")
    ids = np.array([[1, 5, 2, 0, 0, 0], [1, 6, 7, 8, 2, 0], [1, 2, 0, 0, 0, 0]], "int32")
    vit = ViTEncoder(image_size=16, patch_size=4, width=16, depth=1, heads=2, mlp_dim=32,
                     pool="map", output_dim=8)
    text = TextEncoder(vocab_size=20, max_len=6, width=16, depth=1, heads=2, mlp_dim=32,
                       causal=True, pool="eos", output_dim=8)
    expected_image, expected_text = np.asarray(vit(images)), np.asarray(text(ids))

    archive = keras.export.ExportArchive()
    archive.track(vit)
    archive.track(text)
    archive.add_endpoint("embed_image", lambda x: vit(x, training=False),
                         [tf.TensorSpec([None, 16, 16, 3], tf.float32)])
    archive.add_endpoint("embed_text", lambda t: text(t, training=False),
                         [tf.TensorSpec([None, None], tf.int32)])
    archive.write_out(str(tmp_path / "export"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(loaded.embed_image(images).numpy(), expected_image, atol=1e-5)
    np.testing.assert_allclose(loaded.embed_text(ids).numpy(), expected_text, atol=1e-5)
    np.testing.assert_allclose(loaded.embed_text(ids[:, :5]).numpy(), expected_text, atol=1e-5)

    xla = tf.function(lambda x: vit(x, training=False), jit_compile=True)
    np.testing.assert_allclose(xla(images).numpy(), expected_image, atol=1e-4)
