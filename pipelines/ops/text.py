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


# ---------------------------------------------------------------------------------------------
# Hard negative captions (NegCLIP, Yuksekgonul et al. 2023, "When and why vision-language models
# behave like bags-of-words"): the caption with one word swapped for another of its group.
# ---------------------------------------------------------------------------------------------

def parse_word_groups(groups) -> tuple:
    """``("0 1 2", "small large")`` -> ``(("0", "1", "2"), ("small", "large"))`` (a group is a
    string of space-separated words or a sequence of words, so parsed groups parse to
    themselves); checks that every group has >= 2 distinct words and that no word is in two
    groups (ValueError)."""
    parsed, seen = [], {}
    for group in groups:
        words = tuple(group.split() if isinstance(group, str) else (str(w) for w in group))
        if len(set(words)) < 2 or len(set(words)) != len(words):
            raise ValueError(f"a hard-negative word group needs >= 2 distinct words, got "
                             f"{group!r}")
        for word in words:
            if word in seen:
                raise ValueError(f"word {word!r} is in two hard-negative groups ({seen[word]!r} "
                                 f"and {group!r})")
            seen[word] = group
        parsed.append(words)
    return tuple(parsed)


def hard_negative_py(caption: str, groups, position_draw: float, word_draw: float):
    """Python twin of :func:`hard_negative` for one caption and two uniform draws in [0, 1):
    ``(negative, valid)``."""
    groups = parse_word_groups(groups)
    where = {w: (g, i) for g, words in enumerate(groups) for i, w in enumerate(words)}
    words = caption.split(" ")
    slots = [p for p, w in enumerate(words) if w in where]
    if not slots:
        return caption, False
    position = slots[min(int(position_draw * len(slots)), len(slots) - 1)]
    group, own = where[words[position]]
    size = len(groups[group])
    other = min(int(word_draw * (size - 1)), size - 2)
    words[position] = groups[group][other + (other >= own)]
    return " ".join(words), True


def hard_negative(groups, *, key: str = "text", out_key: str = "text_negative",
                  valid_key: str = "negative_valid", seed_key: str = "_seed"):
    """A hard negative of the caption ``features[key]`` (string ``[]``, words separated by
    single spaces as :func:`normalize_text` leaves them): one of its words that belong to a
    group of ``groups`` (e.g. ``"0 1 2 3 4 5 6 7 8 9"``, ``"small large"``, ``"left right"``),
    chosen uniformly, is replaced by another word of its group, chosen uniformly (stateless,
    from ``features[seed_key]``). A caption with no such word gets itself and
    ``features[valid_key] = False`` (the loss must skip it). Equals :func:`hard_negative_py`
    with the op's two draws."""
    import tensorflow as tf

    groups = parse_word_groups(groups)
    words_flat = [w for words in groups for w in words]
    group_of = [g for g, words in enumerate(groups) for _ in words]
    index_in = [i for words in groups for i in range(len(words))]
    starts = [sum(len(w) for w in groups[:g]) for g in range(len(groups))]
    sizes = [len(words) for words in groups]

    # Built once, outside the traced map function (which then only looks it up), rather than
    # again on every trace of ``op``.
    with tf.init_scope():
        table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(words_flat), tf.range(len(words_flat), dtype=tf.int64)), -1)

    def op(features):
        features = dict(features)
        caption = tf.convert_to_tensor(features[key])
        words = tf.strings.split(caption, " ")
        entry = table.lookup(words)                                  # [n], -1: no group
        slots = tf.where(entry >= 0)[:, 0]
        count = tf.shape(slots, out_type=tf.int64)[0]
        position_draw, word_draw = tf.unstack(_hard_negative_draws(features[seed_key]))
        pick = tf.minimum(tf.cast(position_draw * tf.cast(count, tf.float32), tf.int64),
                          tf.maximum(count - 1, 0))
        valid = count > 0
        position = tf.gather(tf.concat([slots, [0]], 0), pick)
        flat = tf.maximum(tf.gather(tf.concat([entry, [0]], 0), position), 0)
        group = tf.gather(tf.constant(group_of, tf.int64), flat)
        own = tf.gather(tf.constant(index_in, tf.int64), flat)
        size = tf.gather(tf.constant(sizes, tf.int64), group)
        other = tf.minimum(tf.cast(word_draw * tf.cast(size - 1, tf.float32), tf.int64),
                           size - 2)
        other = other + tf.cast(other >= own, tf.int64)
        replacement = tf.gather(tf.constant(words_flat),
                                tf.gather(tf.constant(starts, tf.int64), group) + other)
        features[out_key] = tf.cond(valid, lambda: tf.strings.reduce_join(
            tf.tensor_scatter_nd_update(words, [[position]], [replacement]), separator=" "),
            lambda: caption)
        features[valid_key] = valid
        return features

    return op


_HARD_NEGATIVE_SALT = 0x4e67


def _hard_negative_draws(seed):
    """Two uniform draws in [0, 1) (float32 ``[2]``) from an example's seed."""
    import tensorflow as tf

    seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64),
                                                    _HARD_NEGATIVE_SALT)
    return tf.random.stateless_uniform([2], seed)
