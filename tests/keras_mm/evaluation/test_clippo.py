"""keras_mm.evaluation.clippo: the renderer as tokenizer, embed functions, zero-shot and retrieval.

The reference folder holds, as its images, PIL's own drawings of the class names (DejaVu Sans
Mono from matplotlib, the documented 64 px layout: 7 px font, 8x4 cells). With an encoder that is
the identity on pixels, an image's nearest rendered prompt ("{}" template) is its own class name
exactly when the text goes through the renderer the way the docs say.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mm.evaluation.clippo import clippo_embed_functions, evaluate_clippo
from keras_mm.pipelines import features as F
from keras_mm.pipelines.datasets import InputConfig
from keras_mm.pipelines.ops.render_text import TextRenderer

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _pil_render(text, size=64, font_size=7, cell=(8, 4)):
    """Black-on-white uint8 [size, size, 3]: character i at cell divmod(i, size // cell_w)."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf",
                                           "DejaVuSansMono.ttf"), font_size)
    boxes = [font.getbbox(chr(c)) for c in range(0x21, 0x7F)]
    top, bottom = min(b[1] for b in boxes), max(b[3] for b in boxes)
    x0 = (cell[1] - round(font.getlength("M"))) // 2
    y0 = (cell[0] - (bottom - top)) // 2 - top
    page = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(page)
    for i, char in enumerate(text):
        row, col = divmod(i, size // cell[1])
        draw.text((col * cell[1] + x0, row * cell[0] + y0), char, font=font, fill=0)
    return np.repeat(np.asarray(page)[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def names_folder(tmp_path_factory):
    """A label-as-text folder whose test images are the class names drawn by PIL."""
    folder = str(tmp_path_factory.mktemp("names"))
    with tf.io.TFRecordWriter(os.path.join(folder, "test.tfrecord-00000-of-00001")) as writer:
        for i, name in enumerate(NAMES * 2):
            png = tf.io.encode_png(_pil_render(name)).numpy()
            writer.write(F.serialize({
                F.IMAGE_ENCODED: png, F.IMAGE_HEIGHT: 64, F.IMAGE_WIDTH: 64, F.TEXTS: [name],
                F.ID: f"test-{i}", F.LABEL: i % 10, F.LABEL_NAME: name}, F.LABEL_AS_TEXT))
    for file, lines in (("classnames.txt", NAMES), ("templates_eval.txt", ["{}"])):
        with open(os.path.join(folder, file), "w") as f:
            f.write("\n".join(lines) + "\n")
    return folder


class PixelModel:
    """A CLIPPO-like model whose one encoder is the identity on (centred) pixels."""

    def _embed(self, x):
        x = keras.ops.reshape(keras.ops.cast(x, "float32"), (keras.ops.shape(x)[0], -1))
        x = x - 1.0                     # white paper (1.0 in "-1_1") -> 0: only ink counts
        return x / keras.ops.sqrt(keras.ops.sum(x * x, axis=-1, keepdims=True) + 1e-12)

    embed_image = embed_text = _embed


CONFIG = InputConfig(image_size=64, eval_mode="resize", batch_size=8, render_text=True)


def test_zero_shot_and_retrieval_find_the_drawn_class_names(names_folder):
    metrics = evaluate_clippo(PixelModel(), names_folder, "test", CONFIG)
    assert metrics["num_examples"] == 20
    assert metrics["zero_shot_top1"] == 1.0
    assert metrics["retrieval_i2t_r1"] == 1.0 and metrics["retrieval_t2i_r1"] == 1.0
    # Control: the class names in another order must break it (the metric is not trivially 1).
    rolled = NAMES[1:] + NAMES[:1]
    assert evaluate_clippo(PixelModel(), names_folder, "test", CONFIG, tasks=("zero_shot",),
                           class_names=rolled)["zero_shot_top1"] == 0.0
    with pytest.raises(ValueError, match="unknown CLIPPO eval tasks"):
        evaluate_clippo(PixelModel(), names_folder, "test", CONFIG, tasks=("captioning",))


@pytest.mark.both_backends
def test_embed_text_of_code_points_is_the_model_on_rendered_text():
    from keras_mm.encoders.vit import ViTEncoder
    from keras_mm.models.clippo import CLIPPOModel

    keras.utils.set_random_seed(0)
    model = CLIPPOModel(ViTEncoder(image_size=64, patch_size=8, width=32, depth=1, heads=2,
                                   mlp_dim=64, pool="map", output_dim=16))
    renderer = TextRenderer(64)
    texts = ["a photo of the number seven.", "", "naïve 東京"]
    embed_image, embed_text = clippo_embed_functions(model, renderer)
    ids = renderer.tokenize(texts).numpy()
    expected = keras.ops.convert_to_numpy(model.embed_text(renderer(texts).numpy()))
    np.testing.assert_allclose(embed_text(ids), expected, atol=1e-5)
    images = renderer(texts).numpy()
    np.testing.assert_allclose(embed_image(images), expected, atol=1e-5)   # one encoder
