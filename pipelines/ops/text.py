"""Caption normalisation, the same in Python (Beam jobs) and in TensorFlow (tf.data, exports).

normalise(s) = NFKC, then every run of whitespace -> one space, then strip. Case is kept;
lower-casing, when a recipe wants it, is the tokenizer's job (:func:`lowercase`,
:func:`lowercase_py`).
Also the caption ops of the input pipelines: :func:`choose_caption`, :func:`tokenize`.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Optional

# Whitespace that survives NFKC (NFKC already maps NBSP, the U+2000 spaces, U+202F, U+205F and
# U+3000 to a plain space). Spelled once per regex engine: Python's re and RE2.
_WS_CHARS = "\t\n\x0b\x0c\r \x1c\x1d\x1e\x1f\x85\u1680\u2028\u2029"
_PY_WS = re.compile("[" + re.escape(_WS_CHARS) + "]+")
_RE2_WS = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in _WS_CHARS) + "]+"


def normalize_text_py(text: str) -> str:
    """Normalise one caption in Python (used by the Beam jobs)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    text = unicodedata.normalize("NFKC", text)
    return _PY_WS.sub(" ", text).strip(" ")


def normalize_text(text):
    """Normalise a string tensor of any shape in-graph; equals :func:`normalize_text_py`."""
    import tensorflow as tf
    import tensorflow_text as tf_text

    text = tf_text.normalize_utf8(text, "NFKC")
    text = tf.strings.regex_replace(text, _RE2_WS, " ")
    return tf.strings.regex_replace(text, "^ +| +$", "")


def lowercase_py(text: str) -> str:
    """Lower-case in Python exactly as :func:`lowercase` does in-graph (Unicode full case mapping,
    e.g. final sigma, U+0130 -> "i" + U+0307)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return text.lower()


def lowercase(text):
    """Lower-case a UTF-8 string tensor of any shape; equals :func:`lowercase_py`."""
    import tensorflow as tf

    return tf.strings.lower(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# dict -> dict ops (big_vision style: a function of the config returning ``op(features)``).
# ---------------------------------------------------------------------------------------------

CAPTION_MODES = ("random", "first", "all")


def choose_caption(mode: str = "random", *, key: str = "texts", out_key: str = "text",
                   seed_key: str = "_seed", max_texts: int = 0):
    """Picks captions from ``features[key]`` (string ``[K]``, K >= 1).

    mode "random": one caption, uniformly at random (stateless, from ``features[seed_key]``,
    int ``[2]``) -> string ``[]``; "first": the first -> string ``[]``; "all": every caption ->
    string ``[K]``, or exactly ``[max_texts]`` when ``max_texts > 0`` (cut, or padded with "").
    """
    if mode not in CAPTION_MODES:
        raise ValueError(f"caption mode must be one of {CAPTION_MODES}, got {mode!r}")

    def op(features):
        import tensorflow as tf

        features = dict(features)
        texts = features[key]
        if mode == "first":
            features[out_key] = texts[0]
        elif mode == "random":
            seed = tf.random.experimental.stateless_fold_in(
                tf.cast(features[seed_key], tf.int64), _CHOOSE_CAPTION_SALT)
            index = tf.random.stateless_uniform(
                [], seed, minval=0, maxval=tf.shape(texts, out_type=tf.int64)[0], dtype=tf.int64)
            features[out_key] = tf.gather(texts, index)
        else:
            if max_texts > 0:
                texts = texts[:max_texts]
                texts = tf.pad(texts, [[0, max_texts - tf.shape(texts)[0]]])
                texts = tf.ensure_shape(texts, [max_texts])
            features[out_key] = texts
        return features

    return op


_CHOOSE_CAPTION_SALT = 0x7e47


def tokenize(tokenizer, max_len: int, *, key: str = "text", out_key: Optional[str] = None,
             add_bos: Optional[bool] = None, add_eos: Optional[bool] = None):
    """Tokenizes ``features[key]`` (string ``[]`` -> int32 ``[L]``; ``[K]`` -> ``[K, L]``) with a
    :class:`keras_mm.pipelines.tokenizer.Tokenizer`; writes ``features[out_key or key]``.
    """

    def op(features):
        features = dict(features)
        features[out_key or key] = tokenizer.tokenize(features[key], max_len, add_bos=add_bos,
                                                      add_eos=add_eos)
        return features

    return op
