"""keras_mm.pipelines.tokenizer: SentencePiece training and the in-graph Tokenizer."""

import unicodedata

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from keras_mm.pipelines import tokenizer as T

ROUND_TRIP = ["a photo of the number seven.", "A Blurry Photo of a THREE.",
              "café naïve", "  an old\u00a0café   with a naïve painting ", "東京の写真",
              "the handwritten digit nine"]


def reference_normalize(text, lowercase=True):
    """Independent normalisation: NFKC, split on whitespace, join with one space, lower."""
    text = " ".join(unicodedata.normalize("NFKC", text).split())
    return text.lower() if lowercase else text


@pytest.fixture(scope="module")
def tok(sp_model):
    return T.Tokenizer(sp_model, max_len=24)


def test_special_ids_are_fixed(sp_model, tok):
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    assert (T.PAD_ID, T.BOS_ID, T.EOS_ID, T.UNK_ID) == (0, 1, 2, 3)
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == sp.get_piece_size()
    assert sp.is_byte(sp.piece_to_id("<0xE2>"))  # byte fallback pieces exist
    assert tok.lowercase


def test_model_is_small_and_deterministic(corpus, sp_model):
    # identity normalisation: no ~240 KB precompiled charsmap
    assert len(sp_model) < 30_000
    shuffled = list(reversed(corpus))
    assert T.train_sentencepiece(shuffled, 1000) == sp_model


def test_round_trip(tok):
    ids = tok.tokenize(tf.constant(ROUND_TRIP))
    assert ids.shape == (len(ROUND_TRIP), 24) and ids.dtype == tf.int32
    back = [t.decode("utf-8") for t in tok.detokenize(ids).numpy()]
    assert back == [reference_normalize(t) for t in ROUND_TRIP]


def test_round_trip_cased(corpus):
    model = T.train_sentencepiece(corpus + ["Café Naïve IN CAPS"], 1000, lowercase=False)
    tok = T.Tokenizer(model, max_len=24)
    assert not tok.lowercase
    text = ["Café Naïve IN CAPS", "a photo of the number seven."]
    back = [t.decode() for t in tok.detokenize(tok.tokenize(text)).numpy()]
    assert back == [reference_normalize(t, lowercase=False) for t in text]


def test_cjk_in_corpus_uses_learned_pieces_not_bytes(sp_model, tok):
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    ids = [int(i) for i in tok.tokenize("東京の写真").numpy() if i > T.EOS_ID]
    assert not any(sp.is_byte(i) for i in ids)
    # agrees with the Python SentencePiece encoder
    assert ids == sp.encode("東京の写真")


def test_byte_fallback_for_unseen_characters(sp_model, tok):
    text = "zebra ☃ Ωμέγα 🙂"
    ids = tok.tokenize(text, 64).numpy()
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    assert any(sp.is_byte(int(i)) for i in ids)
    assert T.UNK_ID not in ids
    assert tok.detokenize(ids).numpy().decode() == reference_normalize(text)


def test_padding_eos_and_bos(tok):
    sp = spm.SentencePieceProcessor(model_proto=tok.model_bytes)
    pieces = sp.encode("the handwritten digit nine")
    n = len(pieces)
    ids = tok.tokenize(["the handwritten digit nine"], 24).numpy()[0]
    np.testing.assert_array_equal(ids[:n], pieces)
    assert ids[n] == T.EOS_ID
    assert (ids[n + 1:] == T.PAD_ID).all()

    with_bos = tok.tokenize("the handwritten digit nine", 24, add_bos=True).numpy()
    assert with_bos[0] == T.BOS_ID
    np.testing.assert_array_equal(with_bos[1:n + 1], pieces)
    assert with_bos[n + 1] == T.EOS_ID and (with_bos[n + 2:] == 0).all()

    no_eos = tok.tokenize("the handwritten digit nine", 24, add_eos=False).numpy()
    np.testing.assert_array_equal(no_eos[:n], pieces)
    assert (no_eos[n:] == T.PAD_ID).all()

    assert tok.lengths(ids).numpy() == n + 1
    np.testing.assert_array_equal(tok.mask(ids).numpy(), np.arange(24) < n + 1)


def test_truncation_keeps_eos(tok):
    sp = spm.SentencePieceProcessor(model_proto=tok.model_bytes)
    text = "a blurry photo of a three and a drawing of the digit eight written by hand"
    pieces = sp.encode(text)
    assert len(pieces) > 6
    ids = tok.tokenize([text], 6).numpy()[0]
    np.testing.assert_array_equal(ids, pieces[:5] + [T.EOS_ID])
    ids = tok.tokenize([text], 6, add_bos=True).numpy()[0]
    np.testing.assert_array_equal(ids, [T.BOS_ID] + pieces[:4] + [T.EOS_ID])
    ids = tok.tokenize([text], 6, add_eos=False).numpy()[0]
    np.testing.assert_array_equal(ids, pieces[:6])


def test_detokenize_stops_at_eos_and_drops_specials(tok):
    sp = spm.SentencePieceProcessor(model_proto=tok.model_bytes)
    seven, nine = sp.encode("seven"), sp.encode("nine")
    ids = [[T.BOS_ID] + seven + [T.EOS_ID] + nine + [T.PAD_ID],
           [T.PAD_ID] * (len(seven) + len(nine) + 3)]
    assert tok.detokenize(tf.constant(ids)).numpy().tolist() == [b"seven", b""]


def test_same_result_eagerly_and_in_tf_data(tok):
    eager = tok.tokenize(tf.constant(ROUND_TRIP), 12, add_bos=True).numpy()
    ds = tf.data.Dataset.from_tensor_slices(ROUND_TRIP).map(
        lambda s: tok.tokenize(s, 12, add_bos=True))
    graph = np.stack([x.numpy() for x in ds])
    np.testing.assert_array_equal(eager, graph)
    batched = next(iter(tf.data.Dataset.from_tensors(ROUND_TRIP).map(
        lambda s: tok.detokenize(tok.tokenize(s)))))
    assert [t.decode() for t in batched.numpy()] == [reference_normalize(t) for t in ROUND_TRIP]


def test_scalar_input(tok):
    ids = tok.tokenize(tf.constant("café naïve"))
    assert ids.shape == (24,)
    assert tok.detokenize(ids).numpy().decode() == "café naïve"


def test_saved_model_round_trip(tok, tmp_path):
    module = tf.Module()
    module.tok = tok
    module.encode = tf.function(lambda s: tok.tokenize(s, 16),
                                input_signature=[tf.TensorSpec([None], tf.string)])
    module.decode = tf.function(tok.detokenize,
                                input_signature=[tf.TensorSpec([None, None], tf.int32)])
    path = str(tmp_path / "sm")
    tf.saved_model.save(module, path)
    loaded = tf.saved_model.load(path)
    text = tf.constant(["A Photo of CAFÉ", "東京の写真"])
    ids = loaded.encode(text)
    np.testing.assert_array_equal(ids.numpy(), tok.tokenize(text, 16).numpy())
    assert loaded.decode(ids).numpy().tolist() == [b"a photo of caf\xc3\xa9",
                                                   "東京の写真".encode()]


def test_from_file_and_errors(sp_model, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(sp_model)
    tok = T.Tokenizer.from_file(str(path), max_len=8)
    assert tok.tokenize("seven").shape == (8,)
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        T.Tokenizer.from_file(str(tmp_path / "nothing.model"))
    with pytest.raises(ValueError, match="SentencePiece"):
        T.Tokenizer(b"not a model")
    with pytest.raises(ValueError, match="empty corpus"):
        T.train_sentencepiece([], 100)
    with pytest.raises(ValueError, match="empty corpus"):
        T.train_sentencepiece(["", "  \u3000 "], 100)
    with pytest.raises(ValueError, match="vocab_size=50"):
        T.train_sentencepiece(["a tiny corpus"], 50)


def test_tiny_corpus_with_large_vocab_size():
    names = ["cat", "dog", "bird", "fish", "horse", "sheep", "cow", "frog", "deer", "truck"]
    templates = [f"a photo of a {{}} number {i}." for i in range(20)]
    model = T.train_sentencepiece([t.format(n) for n in names for t in templates], 8000,
                                  model_type="bpe")
    tok = T.Tokenizer(model)
    assert 260 < tok.vocab_size < 8000
    assert tok.detokenize(tok.tokenize("a photo of a frog number 7.")).numpy() == \
        b"a photo of a frog number 7."
