"""keras_mm.export.clippo: the export renders text in-graph and serves what the Keras CLIPPO model
computes, in a process that imports only tensorflow and tensorflow_text."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mm.export import clippo as export_lib
from keras_mm.models.clippo import build_clippo
from keras_mm.pipelines import datasets
from keras_mm.pipelines.ops.render_text import TextRenderer

TEXTS = ["a photo of the number seven", "zero", "Ünïcode café", "3"]
LABELS = ["zero", "one", "two"]
TEMPLATES = ["a photo of the number {}.", "the digit {}"]

LOADER = r'''
import json, sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401
export_dir, out = sys.argv[1:3]
spec = json.loads(sys.stdin.read())
loaded = tf.saved_model.load(export_dir)
sig = loaded.signatures
text = sig["embed_text"](text=tf.constant(spec["texts"]))["embedding"].numpy()
png = tf.io.encode_png(tf.cast(tf.fill([20, 20, 3], 128), tf.uint8))
classes = sig["classify_classes"](image_bytes=tf.stack([png, png]))
scores = sig["classify"](image_bytes=tf.stack([png, png]), labels=tf.constant(spec["labels"]))
try:
    sig["embed_text"](text=tf.constant(["ok", "  "]))
    error = "no error"
except tf.errors.InvalidArgumentError as e:
    error = e.message
np.savez(out, text=text, scores=scores["scores"].numpy(),
         stored=classes["scores"].numpy())
print(json.dumps({"error": error, "keras_mm": any(m.startswith("keras_mm") for m in sys.modules),
                  "signatures": sorted(sig.keys())}))
'''


@pytest.mark.slow
def test_clippo_export_renders_text_in_graph(tmp_path):
    keras.utils.set_random_seed(0)
    config = datasets.InputConfig(image_size=32, eval_mode="resize", render_text=True)
    renderer = datasets.text_renderer(config)
    model = build_clippo("tiny", "softmax", image_size=32,
                         encoder_overrides=dict(width=32, depth=1, heads=2, mlp_dim=64))
    export_dir = str(tmp_path / "clippo" / "1")
    export_lib.export_clippo(model, renderer, config, TEMPLATES, export_dir, class_names=LABELS)
    info = json.load(open(tmp_path / "clippo" / "1" / "assets.extra" / "keras_mm_export.json"))
    assert info["model"] == "clippo" and info["max_len"] == renderer.max_chars
    assert "vocab_size" not in info and info["renderer"]["lines"] == renderer.lines

    out = tmp_path / "out.npz"
    proc = subprocess.run([sys.executable, "-c", LOADER, export_dir, str(out)],
                          input=json.dumps({"texts": TEXTS, "labels": LABELS}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["keras_mm"]
    assert "text[1] is empty" in result["error"]
    assert "classify_classes" in result["signatures"]
    arrays = np.load(out)
    # Reference: the Keras model on the renderer's images of the same strings.
    expected = keras.ops.convert_to_numpy(model.embed_text(renderer(tf.constant(TEXTS))))
    np.testing.assert_allclose(arrays["text"], expected, atol=1e-4)
    np.testing.assert_allclose(arrays["stored"], arrays["scores"], atol=1e-5)
    np.testing.assert_allclose(arrays["scores"].sum(axis=1), 1.0, atol=1e-5)
    assert isinstance(renderer, TextRenderer)
