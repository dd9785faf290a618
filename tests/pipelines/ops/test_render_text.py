"""keras_mm.pipelines.ops.render_text: glyph table, layout, value ranges, tf.data / SavedModel.

Reference pixels come from PIL drawing the same font (matplotlib's DejaVu Sans Mono) directly,
with the layout the module documents (font size, cell size, glyph offset) written out here.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from keras_mm.pipelines.ops import render_text as rt


def _font_path():
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSansMono.ttf")


def _font(size):
    from PIL import ImageFont

    return ImageFont.truetype(_font_path(), size)


def _offset(font, cell_h, cell_w):
    """The documented glyph offset: ASCII ink rows centred, the advance centred."""
    boxes = [font.getbbox(chr(c)) for c in range(0x21, 0x7F)]
    top, bottom = min(b[1] for b in boxes), max(b[3] for b in boxes)
    return (cell_w - round(font.getlength("M"))) // 2, (cell_h - (bottom - top)) // 2 - top


def _pil_cell(char, size, cell_h, cell_w):
    """One character drawn alone into its cell: coverage uint8 [cell_h, cell_w]."""
    from PIL import Image, ImageDraw

    font = _font(size)
    cell = Image.new("L", (cell_w, cell_h), 0)
    ImageDraw.Draw(cell).text(_offset(font, cell_h, cell_w), char, font=font, fill=255)
    return np.asarray(cell)


def _pil_page(text, image_size, size, cell_h, cell_w):
    """PIL's rendering of ``text``: black on a white page, character i drawn at the documented
    grid position (row, col) = divmod(i, W // cell_w), lines = H // cell_h. uint8 [H, W]."""
    from PIL import Image, ImageDraw

    font = _font(size)
    x0, y0 = _offset(font, cell_h, cell_w)
    page = Image.new("L", (image_size, image_size), 255)
    draw = ImageDraw.Draw(page)
    per_line, lines = image_size // cell_w, image_size // cell_h
    for i, char in enumerate(text[:per_line * lines]):
        row, col = divmod(i, per_line)
        draw.text((col * cell_w + x0, row * cell_h + y0), char, font=font, fill=0)
    return np.asarray(page)


@pytest.fixture(scope="module")
def r64():
    return rt.TextRenderer(64, value_range=None)


@pytest.fixture(scope="module")
def r224():
    return rt.TextRenderer(224, value_range=None)


def test_documented_default_layouts(r64, r224):
    assert (r64.font_size, r64.cell_size, r64.lines, r64.chars_per_line, r64.max_chars) == \
        (7.0, (8, 4), 8, 16, 128)
    assert (r224.font_size, r224.cell_size, r224.lines, r224.chars_per_line, r224.max_chars) == \
        (13.0, (16, 8), 14, 28, 392)
    assert len("a low resolution drawing of the number seven.") <= r64.max_chars


@pytest.mark.parametrize("chars", ["AgMy", "é@ÿ€"])
def test_glyph_table_rows_are_the_pil_glyphs(r64, r224, chars):
    for renderer, (size, cell) in ((r64, (7, (8, 4))), (r224, (13, (16, 8)))):
        for char in chars:
            row = renderer.glyphs[renderer.glyph_index(char)]
            np.testing.assert_array_equal(row, _pil_cell(char, size, *cell), err_msg=char)
            assert row.max() > 100, f"{char!r} has no ink"


def test_known_string_renders_its_glyphs_at_the_expected_cells(r64):
    text = "Hello, World! 0123456789"        # 24 characters: wraps after 16
    image = r64(text).numpy()
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    expected = np.full((64, 64), 255, np.uint8)
    for i, char in enumerate(text):
        row, col = divmod(i, 16)
        cell = 255 - _pil_cell(char, 7, 8, 4)
        expected[row * 8:(row + 1) * 8, col * 4:(col + 1) * 4] = cell
        # The glyph table row, directly.
        np.testing.assert_array_equal(
            image[row * 8:(row + 1) * 8, col * 4:(col + 1) * 4, 0],
            255 - r64.glyphs[r64.glyph_index(char)], err_msg=f"{char!r} at {i}")
    np.testing.assert_array_equal(image[..., 0], expected)
    assert (image[24:, :, 0] == 255).all()                # lines 3..7 are blank paper
    # "1" (position 17) is on line 1, column 1.
    assert image[8:16, 4:8, 0].min() < 100


@pytest.mark.parametrize("image_size,size,cell", [(64, 7, (8, 4)), (224, 13, (16, 8))])
def test_matches_a_pil_rendering_of_the_string(image_size, size, cell):
    renderer = rt.TextRenderer(image_size, value_range=None)
    text = "a low resolution drawing of the number seven. Quick brown fox: 42 jumps!" * 2
    ours = renderer(text).numpy()[..., 0].astype(np.int32)
    pil = _pil_page(text, image_size, size, *cell).astype(np.int32)
    diff = np.abs(ours - pil)
    # Antialiased ink that PIL lets spill into the neighbour cell is cut from our cells.
    assert diff.mean() < 2.0, diff.mean()
    assert np.mean(diff <= 16) > 0.97
    assert (pil < 128).sum() > 200                         # the page really has text on it


def test_eager_equals_tf_data_and_tf_function(r64, eager_and_tfdata):
    features = {"text": tf.constant("a photo of the number seven."), "id": tf.constant("x")}
    eager, graph = eager_and_tfdata(rt.render_caption(r64), features)
    assert eager["text_images"].shape == (64, 64, 3)
    np.testing.assert_array_equal(eager["text_images"], graph["text_images"])
    assert graph["id"] == b"x"

    texts = tf.constant(["a photo of the number seven.", "", "zwölf"])
    fn = tf.function(r64.__call__, input_signature=[tf.TensorSpec([None], tf.string)])
    np.testing.assert_array_equal(fn(texts).numpy(), r64(texts).numpy())
    batched = tf.data.Dataset.from_tensor_slices(texts).map(r64).batch(3)
    np.testing.assert_array_equal(next(iter(batched)).numpy(), r64(texts).numpy())


def test_batched_equals_per_item_and_keeps_leading_shape(r64):
    texts = ["first", "", "the third one is longer than one line of text", "é 東"]
    batch = r64(tf.constant(texts)).numpy()
    assert batch.shape == (4, 64, 64, 3)
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(batch[i], r64(text).numpy())
    assert r64(tf.constant([["a", "b"], ["c", "d"]])).shape == (2, 2, 64, 64, 3)
    np.testing.assert_array_equal(r64(tf.constant([["a", "b"]])).numpy()[0, 1], r64("b").numpy())


def test_non_ascii_and_invalid_utf8_render_the_replacement_glyph(r64):
    image = r64("東京é").numpy()[..., 0]
    replacement = 255 - r64.glyphs[rt.REPLACEMENT_GLYPH]
    np.testing.assert_array_equal(r64.glyphs[rt.REPLACEMENT_GLYPH],
                                  _pil_cell("\ufffd", 7, 8, 4))
    np.testing.assert_array_equal(image[0:8, 0:4], replacement)
    np.testing.assert_array_equal(image[0:8, 4:8], replacement)
    # Latin-1 has its own glyph, not the replacement.
    np.testing.assert_array_equal(image[0:8, 8:12], 255 - _pil_cell("é", 7, 8, 4))
    assert not np.array_equal(image[0:8, 8:12], replacement)
    invalid = r64(tf.constant(b"a\xffb")).numpy()[..., 0]
    np.testing.assert_array_equal(invalid[0:8, 4:8], replacement)
    np.testing.assert_array_equal(invalid[0:8, 8:12], 255 - _pil_cell("b", 7, 8, 4))
    # A custom charset without digits renders digits as the replacement too.
    no_digits = rt.TextRenderer(64, value_range=None, charset="abc ")
    np.testing.assert_array_equal(no_digits("7").numpy()[0:8, 0:4, 0], replacement)


def test_empty_string_is_blank_in_every_value_range():
    white = {"-1_1": 1.0, "0_1": 1.0, None: 255}
    for value_range, value in white.items():
        image = rt.TextRenderer(64, value_range=value_range)("").numpy()
        assert image.shape == (64, 64, 3)
        assert (image == value).all()
    imagenet = rt.TextRenderer(64, value_range="imagenet")("").numpy()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(imagenet[0, 0], (1.0 - mean) / std, rtol=1e-6)


def test_value_ranges_are_the_image_ops_ranges(r64):
    text = "Ink 123"
    pixels = r64(text).numpy().astype(np.float64)                  # uint8 0..255
    for value_range, expected in (("-1_1", pixels / 127.5 - 1.0), ("0_1", pixels / 255.0)):
        out = rt.TextRenderer(64, value_range=value_range)(text).numpy()
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, expected, atol=1e-6)
    grey = rt.TextRenderer(64, value_range=None, background=127, foreground=0)(text).numpy()
    ink = (255 - pixels) / 255.0
    np.testing.assert_allclose(grey, np.round(127 * (1 - ink)), atol=1)


def test_long_strings_are_cut_after_the_last_cell(r64):
    text = "".join(chr(ord("a") + i % 26) for i in range(300))
    np.testing.assert_array_equal(r64(text).numpy(), r64(text[:128]).numpy())
    assert not np.array_equal(r64(text[:127]).numpy(), r64(text[:128]).numpy())
    last = r64(text).numpy()[56:64, 60:64, 0]                      # cell 127: line 7, col 15
    np.testing.assert_array_equal(last, 255 - _pil_cell(text[127], 7, 8, 4))


def test_tokenize_gives_code_points_and_render_codepoints_agrees(r64):
    ids = r64.tokenize("héllo", 8).numpy()
    assert ids.tolist() == [104, 233, 108, 108, 111, 0, 0, 0]
    batch = r64.tokenize(["ab", "東"]).numpy()
    assert batch.shape == (2, 128) and batch[1, 0] == 0x6771
    assert batch[0, :3].tolist() == [97, 98, 0]
    np.testing.assert_array_equal(r64.render_codepoints(r64.tokenize(["ab", "東"], 5)).numpy(),
                                  r64(["ab", "東"]).numpy())
    with pytest.raises(ValueError, match="BOS"):
        r64.tokenize("a", add_bos=True)


def test_cell_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        rt.TextRenderer(8, font_size=13, cell_size=(16, 8))
    with pytest.raises(ValueError, match="value_range"):
        rt.TextRenderer(64, value_range="0_255")


def test_saved_model_round_trip(tmp_path, r64):
    class Export(tf.Module):
        def __init__(self, renderer):
            super().__init__()
            self.renderer = renderer

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def render(self, text):
            return {"images": self.renderer(text)}

    texts = tf.constant(["a scan of the digit 3.", "", "naïve 東"])
    expected = r64(texts).numpy()
    path = str(tmp_path / "renderer")
    tf.saved_model.save(Export(r64), path)
    loaded = tf.saved_model.load(path)
    np.testing.assert_array_equal(loaded.render(texts)["images"].numpy(), expected)


# ----------------------------------------------------------------- datasets with render_text
def _digits_config(**kw):
    from keras_mm.pipelines.datasets import InputConfig

    values = dict(image_size=64, augment="none", eval_mode="resize", batch_size=6,
                  shuffle_buffer=8, render_text=True, train_caption="first", deterministic=True)
    values.update(kw)
    return InputConfig(**values)


def test_train_dataset_renders_the_chosen_caption(label_as_text_folder):
    from keras_mm.pipelines import datasets
    from tests.pipelines.conftest import DIGIT_NAMES, TEMPLATES

    folder = label_as_text_folder(tokenizer=False)      # no tokenizer.model: none needed
    batch = next(iter(datasets.train_dataset(folder, _digits_config())))
    assert set(batch) == {"image", "text_images", "id", "label"}
    assert batch["text_images"].shape == (6, 64, 64, 3)
    renderer = rt.TextRenderer(64)                     # the config's layout and value range
    for image, label in zip(batch["text_images"].numpy(), batch["label"].numpy()):
        expected = renderer(TEMPLATES[0].format(DIGIT_NAMES[label])).numpy()
        np.testing.assert_array_equal(image, expected)


def test_eval_dataset_gives_code_points_and_rendered_first_caption(label_as_text_folder):
    from keras_mm.pipelines import datasets
    from keras_mm.pipelines.tokenizer import Tokenizer
    from tests.pipelines.conftest import DIGIT_NAMES, TEMPLATES

    folder = label_as_text_folder(tokenizer=True)
    batch = next(iter(datasets.eval_dataset(folder, "validation", _digits_config())))
    assert set(batch) == {"image", "text", "text_images", "id", "label"}
    assert batch["text"].shape == (6, 128) and batch["text"].dtype == tf.int32
    first = TEMPLATES[0].format(DIGIT_NAMES[int(batch["label"][0])])
    codes = batch["text"][0].numpy()
    assert codes[:len(first)].tolist() == [ord(c) for c in first]
    assert (codes[len(first):] == 0).all()
    np.testing.assert_array_equal(batch["text_images"][0].numpy(), rt.TextRenderer(64)(first))

    every = next(iter(datasets.eval_dataset(folder, "validation",
                                            _digits_config(eval_texts="all", eval_max_texts=3))))
    assert every["texts"].shape == (6, 3, 128)
    np.testing.assert_array_equal(every["texts"][:, 0].numpy(), every["text"].numpy())
    num = every["num_texts"].numpy()
    assert (every["texts"].numpy()[num < 3, 2] == 0).all()
    with pytest.raises(TypeError, match="TextRenderer"):
        datasets.eval_dataset(folder, "validation", _digits_config(),
                              tokenizer=Tokenizer.from_file(folder + "/tokenizer.model"))


def test_render_background_of_the_input_config(label_as_text_folder):
    from keras_mm.pipelines import datasets

    folder = label_as_text_folder(tokenizer=False)
    batch = next(iter(datasets.eval_dataset(folder, "validation",
                                            _digits_config(render_background=127))))
    paper = batch["text_images"].numpy()[:, -8:]                   # the last line is blank
    np.testing.assert_allclose(paper, 127 / 127.5 - 1.0, atol=1e-6)
    assert batch["text_images"].numpy().min() == pytest.approx(-1.0)   # black ink
    with pytest.raises(ValueError, match="render_background"):
        _digits_config(render_background=300)
