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
