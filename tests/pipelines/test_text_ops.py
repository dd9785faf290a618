"""keras_mm.pipelines.ops.text: normalisation, lower-casing and the caption ops."""

import numpy as np
import pytest
import tensorflow as tf

from keras_mm.pipelines.ops import text as text_ops
from keras_mm.pipelines.tokenizer import Tokenizer

# (input, expected), expected written by hand.
TRICKY = [
    ("a\u00a0photo", "a photo"),                      # NBSP
    ("東京\u3000の写真", "東京 の写真"),                    # ideographic space
    ("ＡＢＣ ｄｉｇｉｔ １２", "ABC digit 12"),            # fullwidth letters and digits
    ("line\u2028separator\u2029para", "line separator para"),
    ("\ttabs\tand\nnewlines\r\n", "tabs and newlines"),
    ("   leading and trailing   ", "leading and trailing"),
    ("ﬁne ﬂower ﬀ", "fine flower ff"),                # ligatures
    ("x\u2003y\u202fz\u205fw", "x y z w"),            # em space, narrow NBSP, math space
    ("e\u0301 café", "é café"),                       # combining accent -> composed
    ("\u1680ogham\x85nel\x1cfs", "ogham nel fs"),
    ("①②", "12"),
    ("", ""),
    ("   ", ""),
]


def test_normalize_text_equals_python_and_expected():
    inputs = [s for s, _ in TRICKY]
    graph = [t.decode("utf-8") for t in text_ops.normalize_text(tf.constant(inputs)).numpy()]
    python = [text_ops.normalize_text_py(s) for s in inputs]
    assert python == [e for _, e in TRICKY]
    assert graph == python


def test_normalize_text_keeps_shape():
    out = text_ops.normalize_text(tf.constant([["a  b", " c"], ["d\te", "ｆ"]]))
    assert out.shape == (2, 2)
    assert out.numpy().tolist() == [[b"a b", b"c"], [b"d e", b"f"]]


@pytest.mark.parametrize("text,expected", [
    ("ΟΔΟΣ ΣΑ", "οδος σα"),           # final sigma
    ("İstanbul", "i\u0307stanbul"),
    ("ẞ CAFÉ NAÏVE", "ß café naïve"),
    ("ＡＢＣ", "ａｂｃ"),
    ("ǅ Ω Å", "ǆ ω å"),
])
def test_lowercase_equals_python(text, expected):
    assert text_ops.lowercase_py(text) == expected
    assert text_ops.lowercase(tf.constant(text)).numpy().decode("utf-8") == expected


def test_choose_caption_modes(eager_and_tfdata):
    texts = tf.constant(["first caption", "second caption", "third caption"])
    first = text_ops.choose_caption("first")({"texts": texts})
    assert first["text"].numpy() == b"first caption"

    all_ = text_ops.choose_caption("all", max_texts=5)({"texts": texts})["text"].numpy()
    assert all_.tolist() == [b"first caption", b"second caption", b"third caption", b"", b""]
    cut = text_ops.choose_caption("all", max_texts=2)({"texts": texts})["text"].numpy()
    assert cut.tolist() == [b"first caption", b"second caption"]

    op = text_ops.choose_caption("random")
    picks = set()
    for i in range(40):
        features = {"texts": texts, "_seed": tf.constant([i, 7], tf.int64)}
        eager, graph = eager_and_tfdata(op, features)
        assert eager["text"] == graph["text"]
        picks.add(eager["text"].item())
    assert picks == {b"first caption", b"second caption", b"third caption"}
    # a single caption is always picked
    one = op({"texts": tf.constant(["only"]), "_seed": tf.constant([1, 2], tf.int64)})
    assert one["text"].numpy() == b"only"
    with pytest.raises(ValueError, match="caption mode"):
        text_ops.choose_caption("longest")


def test_tokenize_op(sp_model, eager_and_tfdata):
    tok = Tokenizer(sp_model)
    op = text_ops.tokenize(tok, 40, key="text")
    eager, graph = eager_and_tfdata(op, {"text": tf.constant("A photo of the number SEVEN.")})
    assert eager["text"].shape == (40,) and eager["text"].dtype == np.int32
    np.testing.assert_array_equal(eager["text"], graph["text"])
    assert tok.detokenize(eager["text"]).numpy() == b"a photo of the number seven."
    many = text_ops.tokenize(tok, 10, key="texts", out_key="ids")(
        {"texts": tf.constant(["seven", "nine", "three"])})
    assert many["ids"].shape == (3, 10)
    assert "texts" in many  # the input is kept


# ------------------------------------------------------------------------------ hard negatives
GROUPS = ("0 1 2 3 4 5 6 7 8 9", "small large", "left right", "above below")
GROUP_OF = {w: g for g, words in enumerate(GROUPS) for w in words.split()}


def _hard_negative(caption, seed):
    out = text_ops.hard_negative(GROUPS)({"text": tf.constant(caption),
                                          "_seed": tf.constant(seed, tf.int64)})
    draws = text_ops._hard_negative_draws(tf.constant(seed, tf.int64)).numpy()
    return out["text_negative"].numpy().decode(), bool(out["negative_valid"]), draws


@pytest.mark.parametrize("caption", ["a small 3 to the left of a large 7", "a 9",
                                     "one large digit and two small digits"])
def test_hard_negative_swaps_one_grouped_word_for_another_of_its_group(caption):
    words = caption.split()
    for s in range(40):
        negative, valid, draws = _hard_negative(caption, [s, 7])
        assert valid
        assert (negative, valid) == text_ops.hard_negative_py(caption, GROUPS, *draws)
        changed = [i for i, (a, b) in enumerate(zip(words, negative.split())) if a != b]
        assert len(negative.split()) == len(words) and len(changed) == 1, negative
        old, new = words[changed[0]], negative.split()[changed[0]]
        assert old in GROUP_OF and GROUP_OF[new] == GROUP_OF[old] and new != old


def test_hard_negative_draws_every_grouped_position_and_every_other_word():
    caption = "a small 3 to the left of a large 7"
    positions, numerals = set(), set()
    for s in range(300):
        negative, _, _ = _hard_negative(caption, [s, 0])
        diff = [i for i, (a, b) in enumerate(zip(caption.split(), negative.split())) if a != b]
        positions.add(diff[0])
        if diff[0] == 2:
            numerals.add(negative.split()[2])
    assert positions == {1, 2, 5, 8, 9}             # small, 3, left, large, 7
    assert numerals == set("012456789")             # every numeral but the 3


def test_hard_negative_without_grouped_words_is_marked_invalid():
    for caption in ["three digits here", ""]:
        negative, valid, draws = _hard_negative(caption, [1, 2])
        assert (negative, valid) == (caption, False)
        assert text_ops.hard_negative_py(caption, GROUPS, *draws) == (caption, False)


def test_word_groups_are_checked():
    parsed = text_ops.parse_word_groups(["a b", " c  d "])
    assert parsed == (("a", "b"), ("c", "d")) == text_ops.parse_word_groups(parsed)
    for bad, match in [(["a"], ">= 2"), (["a a"], ">= 2"), (["a b", "b c"], "in two")]:
        with pytest.raises(ValueError, match=match):
            text_ops.parse_word_groups(bad)
