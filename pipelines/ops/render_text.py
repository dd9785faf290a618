"""Text rendered as an image, in-graph (CLIPPO, Tschannen et al. 2023, Sec. 3).

CLIPPO feeds captions to the image tower as images: black text on a plain background, one fixed
font size, lines filled character by character (no word wrap), everything past the last line cut.
Here the font is DejaVu Sans Mono, the TrueType file that ships with matplotlib (a dependency), so
nothing is downloaded; being monospace, the layout is a pure tensor op.

Glyph table (built ONCE, in Python with PIL, when a :class:`TextRenderer` is constructed): every
character of ``charset`` is drawn alone into a ``cell_h x cell_w`` cell -> coverage ``uint8
[num_glyphs, cell_h, cell_w]`` (0 = no ink, 255 = full ink). Row 0 is blank (padding, U+0000,
tab, newline, carriage return), row 1 the replacement glyph (U+FFFD as the font draws it) used for
every character outside the charset and for invalid UTF-8, rows 2.. the charset in order. Inside a
cell the glyph is drawn with PIL's default anchor (left, ascender) at offset ``(x0, y0)``:
``x0 = (cell_w - round(advance)) // 2`` (advance: the font's width of "M") and
``y0 = (cell_h - (bottom - top)) // 2 - top`` with ``[top, bottom)`` the rows that printable ASCII
(U+0021..U+007E) inks, so ASCII is vertically centred in its cell; ink outside the cell is cut.

Rendering (TensorFlow ops only, no ``py_function``; works eagerly, in ``tf.data`` and in a
``tf.function`` with an input signature, so a SavedModel carries it):

  strings ``[...]`` -> ``tf.strings.unicode_decode`` -> code points, cut / padded with 0 to
  ``max_chars = lines * chars_per_line`` -> glyph rows (``tf.searchsorted`` in the sorted code
  points of the charset) -> gather coverage ``[..., max_chars, cell_h, cell_w]`` -> character ``i``
  in cell ``(row, col) = divmod(i, chars_per_line)``, the grid at the top-left corner ->
  padded to ``[H, W]`` -> ``background + coverage / 255 * (foreground - background)`` -> 3 equal
  channels -> the image value range of the input pipelines (``InputConfig.value_range``:
  ``"-1_1"``, ``"0_1"``, ``"imagenet"``; ``None`` keeps uint8).

``lines = H // cell_h``, ``chars_per_line = W // cell_w``. Default layouts (by image height):

  ========  ==========  =========  =====  ===============  =========  =========================
  height    font size   cell h x w lines  chars per line   max chars  for
  ========  ==========  =========  =====  ===============  =========  =========================
  < 128     7 px        8 x 4      H / 8  W / 4            128 at 64  ``tiny`` (64 px, patch 8):
                                                                      one line per patch row,
                                                                      two characters per patch
  >= 128    13 px       16 x 8     H / 16 W / 8            392 at 224 ``s16`` / ``b16`` (224 px,
                                                                      patch 16); like CLIPPO's
                                                                      16 px Unifont
  ========  ==========  =========  =====  ===============  =========  =========================

"a low resolution drawing of the number seven." (45 characters, the longest digits prompt) takes
3 of the 8 lines at 64 px. The renderer doubles as a character-level tokenizer for the evaluators:
:meth:`TextRenderer.tokenize` gives the code points ``int32 [..., L]`` that
:meth:`TextRenderer.render_codepoints` draws.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from keras_mm.pipelines.ops import image as image_ops

Features = Dict[str, tf.Tensor]

FONT_FILE = "DejaVuSansMono.ttf"
#: Printable ASCII, printable Latin-1 and the typographic punctuation common in web captions.
DEFAULT_CHARSET = ("".join(chr(c) for c in range(0x20, 0x7F))
                   + "".join(chr(c) for c in range(0xA0, 0x100))
                   + "\u2018\u2019\u201a\u201c\u201d\u201e\u2013\u2014\u2026\u2022\u20ac\u2122")
REPLACEMENT_CHAR = "\ufffd"
BLANK_GLYPH = 0          # glyph row of padding (code point 0) and of BLANK_CODEPOINTS
REPLACEMENT_GLYPH = 1    # glyph row of every character outside the charset
BLANK_CODEPOINTS = (0x00, 0x09, 0x0A, 0x0D)
VALUE_RANGES = ("-1_1", "0_1", "imagenet")
#: (font size in px, (cell height, cell width)) of the default layouts, see the module docstring.
SMALL_LAYOUT = (7, (8, 4))
LARGE_LAYOUT = (13, (16, 8))


def default_font_path() -> str:
    """DejaVu Sans Mono as shipped by matplotlib (``<matplotlib data>/fonts/ttf/``)."""
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", FONT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{FONT_FILE} not found at {path}; pass font_path=")
    return path


def default_layout(image_height: int) -> Tuple[float, Tuple[int, int]]:
    """(font size, (cell height, cell width)) for an image height (module docstring table)."""
    return SMALL_LAYOUT if image_height < 128 else LARGE_LAYOUT


def _load_font(font_path: str, font_size: float):
    from PIL import ImageFont

    return ImageFont.truetype(font_path, font_size)


def glyph_offset(font, cell_size: Tuple[int, int]) -> Tuple[int, int]:
    """``(x0, y0)``: where a glyph is drawn in its cell (PIL anchor "la"), see the module
    docstring."""
    cell_h, cell_w = cell_size
    boxes = [font.getbbox(chr(c)) for c in range(0x21, 0x7F)]
    top = min(b[1] for b in boxes)
    bottom = max(b[3] for b in boxes)
    x0 = (cell_w - int(round(font.getlength("M")))) // 2
    y0 = (cell_h - (bottom - top)) // 2 - top
    return x0, y0


def derived_cell_size(font) -> Tuple[int, int]:
    """A cell that fits the font: (rows inked by printable ASCII, rounded advance width)."""
    boxes = [font.getbbox(chr(c)) for c in range(0x21, 0x7F)]
    height = max(b[3] for b in boxes) - min(b[1] for b in boxes)
    return max(1, height), max(1, int(round(font.getlength("M"))))


def build_glyph_table(font_path: str, font_size: float, cell_size: Tuple[int, int],
                      charset: Sequence[str] = DEFAULT_CHARSET):
    """The glyph table, in Python (PIL). Run once per renderer.

    Returns:
      glyphs: uint8 ``[2 + len(charset), cell_h, cell_w]`` coverage (row 0 blank, row 1 the
        replacement glyph, then the charset in order);
      codes: int32 ``[C]`` sorted code points with a glyph (charset + BLANK_CODEPOINTS);
      code_glyph: int32 ``[C]`` the glyph row of each code point;
      offset: ``(x0, y0)`` of the glyphs in their cells.
    """
    from PIL import Image, ImageDraw

    chars = list(dict.fromkeys(charset))          # unique, in order
    if any(len(c) != 1 for c in chars):
        raise ValueError("charset must be a sequence of single characters")
    font = _load_font(font_path, font_size)
    cell_h, cell_w = cell_size
    x0, y0 = glyph_offset(font, cell_size)

    def draw(char):
        cell = Image.new("L", (cell_w, cell_h), 0)
        ImageDraw.Draw(cell).text((x0, y0), char, font=font, fill=255)
        return np.asarray(cell, dtype=np.uint8)

    glyphs = [np.zeros([cell_h, cell_w], np.uint8), draw(REPLACEMENT_CHAR)]
    mapping = {code: BLANK_GLYPH for code in BLANK_CODEPOINTS}
    for char in chars:
        if ord(char) in mapping:
            continue
        mapping[ord(char)] = len(glyphs)
        glyphs.append(draw(char))
    codes = np.array(sorted(mapping), np.int32)
    code_glyph = np.array([mapping[c] for c in codes], np.int32)
    return np.stack(glyphs), codes, code_glyph, (x0, y0)


class TextRenderer(tf.Module):
    """Strings -> images of the rendered text (module docstring: layout, table, value range).

    Args:
      image_size: output side (int) or ``(H, W)``.
      font_size: font size in pixels; default: the default layout's for H.
      cell_size: ``(cell_h, cell_w)`` of one character; default: the default layout's when
        ``font_size`` is also defaulted, else :func:`derived_cell_size` of the font.
      font_path: a TrueType font (monospace expected); default: matplotlib's DejaVu Sans Mono.
      charset: characters with a glyph; the others render as the replacement glyph.
      value_range: ``"-1_1"``, ``"0_1"``, ``"imagenet"`` (float32, as ``InputConfig``) or None
        (uint8 0..255).
      background, foreground: grey levels (0..255) of the paper and of full ink; default black
        text on white.

    Attributes:
      lines, chars_per_line, max_chars (= lines * chars_per_line), cell_size, font_size,
      image_size ``(H, W)``, glyph_offset ``(x0, y0)``, glyphs (uint8 NumPy ``[G, cell_h,
      cell_w]``).
    """

    def __init__(self, image_size: Union[int, Tuple[int, int]] = 224, *,
                 font_size: Optional[float] = None, cell_size: Optional[Tuple[int, int]] = None,
                 font_path: Optional[str] = None, charset: Sequence[str] = DEFAULT_CHARSET,
                 value_range: Optional[str] = "-1_1", background: int = 255,
                 foreground: int = 0, name: Optional[str] = None):
        super().__init__(name=name)
        height, width = ((int(image_size),) * 2 if isinstance(image_size, (int, np.integer))
                         else tuple(int(s) for s in image_size))
        if value_range is not None and value_range not in VALUE_RANGES:
            raise ValueError(f"value_range must be one of {VALUE_RANGES} or None, "
                             f"got {value_range!r}")
        if not (0 <= background <= 255 and 0 <= foreground <= 255):
            raise ValueError("background and foreground are grey levels in [0, 255]")
        self.font_path = font_path or default_font_path()
        if font_size is None:
            font_size, default_cell = default_layout(height)
            cell_size = cell_size or default_cell
        if cell_size is None:
            cell_size = derived_cell_size(_load_font(self.font_path, font_size))
        cell_h, cell_w = (int(cell_size[0]), int(cell_size[1]))
        self.image_size = (height, width)
        self.font_size = float(font_size)
        self.cell_size = (cell_h, cell_w)
        self.lines, self.chars_per_line = height // cell_h, width // cell_w
        if self.lines < 1 or self.chars_per_line < 1:
            raise ValueError(f"a {cell_h}x{cell_w} character cell does not fit a "
                             f"{height}x{width} image")
        self.max_chars = self.lines * self.chars_per_line
        self.value_range = value_range
        self.background, self.foreground = int(background), int(foreground)
        glyphs, codes, code_glyph, offset = build_glyph_table(
            self.font_path, self.font_size, self.cell_size, charset)
        self.glyphs = glyphs
        self.glyph_offset = offset
        self._char_glyph = {chr(int(c)): int(g) for c, g in zip(codes, code_glyph)}
        self._glyph_table = tf.constant(glyphs)                  # uint8 [G, cell_h, cell_w]
        self._codes = tf.constant(codes)                         # int32 [C], sorted
        self._code_glyph = tf.constant(code_glyph)               # int32 [C]

    # --------------------------------------------------------------------------- Python helpers
    def glyph_index(self, char: str) -> int:
        """The glyph row drawn for ``char`` (REPLACEMENT_GLYPH when it has none)."""
        return self._char_glyph.get(char, REPLACEMENT_GLYPH)

    def cell_origin(self, position: int) -> Tuple[int, int]:
        """Top-left pixel ``(y, x)`` of the cell of character ``position``."""
        row, col = divmod(position, self.chars_per_line)
        return row * self.cell_size[0], col * self.cell_size[1]

    # --------------------------------------------------------------------------- in-graph ops
    def tokenize(self, text, max_len: Optional[int] = None, *, add_bos: Optional[bool] = None,
                 add_eos: Optional[bool] = None) -> tf.Tensor:
        """Strings ``[...]`` -> Unicode code points int32 ``[..., L]`` (``L = max_len``, default
        ``max_chars``), cut at L and padded with 0; invalid UTF-8 becomes U+FFFD.

        The character-level "tokenizer" of a rendering model: the evaluators and the eval
        datasets take it where they take a ``Tokenizer``. ``add_eos`` is accepted for that
        interface and ignored (rendered text has no EOS); ``add_bos=True`` is refused.
        """
        del add_eos
        if add_bos:
            raise ValueError("rendered text has no BOS token (add_bos must be False)")
        length = self.max_chars if max_len is None else int(max_len)
        if length < 1:
            raise ValueError(f"max_len must be >= 1, got {length}")
        text = tf.convert_to_tensor(text, dtype=tf.string)
        flat = tf.reshape(text, [-1])                                          # [N]
        codes = tf.strings.unicode_decode(flat, "UTF-8", errors="replace",
                                          replacement_char=0xFFFD)              # ragged [N, (c)]
        ids = codes[:, :length].to_tensor(default_value=0, shape=[None, length])  # [N, L]
        ids = tf.reshape(ids, tf.concat([tf.shape(text), [length]], axis=0))
        ids.set_shape(text.shape.concatenate([length]))
        return tf.cast(ids, tf.int32)

    def glyph_ids(self, codes) -> tf.Tensor:
        """Code points int ``[...]`` -> glyph rows int32 ``[...]``."""
        codes = tf.cast(codes, tf.int32)
        flat = tf.reshape(codes, [1, -1])                                      # [1, M]
        pos = tf.searchsorted(self._codes[tf.newaxis], flat, side="left")       # [1, M]
        pos = tf.minimum(pos, tf.shape(self._codes)[0] - 1)
        hit = tf.equal(tf.gather(self._codes, pos), flat)
        rows = tf.where(hit, tf.gather(self._code_glyph, pos), REPLACEMENT_GLYPH)
        return tf.reshape(rows, tf.shape(codes))

    def render_codepoints(self, codes) -> tf.Tensor:
        """Code points int ``[..., L]`` (any L; cut / padded with blanks to ``max_chars``) ->
        images ``[..., H, W, 3]`` (float32 in ``value_range``, or uint8)."""
        codes = tf.cast(tf.convert_to_tensor(codes), tf.int32)
        if codes.shape.rank is None or codes.shape.rank < 1:
            raise ValueError(f"render_codepoints takes code points [..., L], got {codes.shape}")
        lead = tf.shape(codes)[:-1]
        flat = tf.reshape(codes, [-1, tf.shape(codes)[-1]])                    # [N, L]
        flat = flat[:, :self.max_chars]
        flat = tf.pad(flat, [[0, 0], [0, self.max_chars - tf.shape(flat)[1]]])
        flat.set_shape([None, self.max_chars])                                  # [N, max_chars]
        coverage = tf.gather(self._glyph_table, self.glyph_ids(flat))          # [N, M, ch, cw]
        cell_h, cell_w = self.cell_size
        height, width = self.image_size
        grid = tf.reshape(coverage, [-1, self.lines, self.chars_per_line, cell_h, cell_w])
        grid = tf.transpose(grid, [0, 1, 3, 2, 4])                      # [N, lines, ch, cpl, cw]
        grid = tf.reshape(grid, [-1, self.lines * cell_h, self.chars_per_line * cell_w])
        grid = tf.pad(grid, [[0, 0], [0, height - self.lines * cell_h],
                             [0, width - self.chars_per_line * cell_w]])         # [N, H, W]
        images = self._to_pixels(grid)                                          # [N, H, W, 3]
        out = tf.reshape(images, tf.concat([lead, [height, width, 3]], axis=0))
        out.set_shape(codes.shape[:-1].concatenate([height, width, 3]))
        return out

    def __call__(self, text) -> tf.Tensor:
        """Strings ``[...]`` (e.g. a scalar or ``[N]``) -> images ``[..., H, W, 3]``."""
        return self.render_codepoints(self.tokenize(text))

    def _to_pixels(self, coverage: tf.Tensor) -> tf.Tensor:
        """Coverage uint8 ``[N, H, W]`` -> pixels ``[N, H, W, 3]`` in the value range."""
        ink = tf.cast(coverage, tf.float32) / 255.0
        grey = self.background + ink * float(self.foreground - self.background)  # 0..255
        rgb = tf.repeat(grey[..., tf.newaxis], 3, axis=-1)
        if self.value_range is None:
            return tf.cast(tf.clip_by_value(tf.round(rgb), 0.0, 255.0), tf.uint8)
        if self.value_range == "imagenet":
            op = image_ops.normalize_imagenet()
        elif self.value_range == "0_1":
            op = image_ops.value_range(0.0, 1.0)
        else:
            op = image_ops.value_range(-1.0, 1.0)
        return op({"image": rgb})["image"]


# ------------------------------------------------------------------------------------- ops


def render_caption(renderer: TextRenderer, *, key: str = "text",
                   out_key: str = "text_images") -> Callable[[Features], Features]:
    """``features[key]`` (string ``[]`` or ``[K]``, e.g. from ``text_ops.choose_caption``) ->
    ``features[out_key]`` ``[H, W, 3]`` (or ``[K, H, W, 3]``), rendered by ``renderer``."""

    def op(features: Features) -> Features:
        features = dict(features)
        features[out_key] = renderer(features[key])
        return features

    return op
