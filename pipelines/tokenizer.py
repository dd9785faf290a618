"""SentencePiece tokenizer: training (Python) and in-graph tokenization (tensorflow-text).

The same :class:`Tokenizer` runs inside ``tf.data`` maps and inside exported SavedModels (it is a
``tf.Module``; the SentencePiece model bytes live in a trackable resource, so a SavedModel carries
them). Text is normalised here, not by SentencePiece: models are trained with the ``identity``
normalisation rule (a tiny model, see FACTS.md) on text passed through
:func:`~keras_mm.pipelines.ops.text.normalize_text_py` and, when ``lowercase``, through
:func:`~keras_mm.pipelines.ops.text.lowercase_py`; :meth:`Tokenizer.tokenize` applies the same two
steps in-graph before encoding.

Fixed ids (decoders rely on them): ``PAD_ID = 0``, ``BOS_ID = 1``, ``EOS_ID = 2``, ``UNK_ID = 3``.
A model trained with ``lowercase=True`` also holds the control piece ``<lowercase>`` (never produced
from text); :class:`Tokenizer` reads it to know that it must lower-case its input.
"""

from __future__ import annotations

import io
from typing import Iterable, Optional

import tensorflow as tf

from keras_mm.pipelines.ops import text as text_ops

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
LOWERCASE_PIECE = "<lowercase>"

# Ids 0..3 are the specials, then (lowercase models) the <lowercase> control piece, then 256 byte
# pieces for byte fallback, then the learned pieces.
_NUM_BYTE_PIECES = 256


def train_sentencepiece(sentences: Iterable[str],
                        vocab_size: int,
                        *,
                        model_type: str = "unigram",
                        lowercase: bool = True,
                        character_coverage: float = 0.9995,
                        max_sentence_length: int = 4192,
                        num_threads: int = 1,
                        seed: int = 0) -> bytes:
    """Trains a SentencePiece model in memory and returns its serialized ``ModelProto``.

    Args:
      sentences: captions (str or UTF-8 bytes). Each is normalised with ``normalize_text_py``
        (and lower-cased when ``lowercase``); empty ones are dropped. The sentences are sorted
        before training, so the model depends only on the multiset of sentences, not on their
        order.
      vocab_size: the wanted vocabulary size. ``hard_vocab_limit=False``: a small corpus may
        give fewer pieces (read the actual size from :attr:`Tokenizer.vocab_size`). It must cover
        the 4 special ids, the 256 byte-fallback pieces and every kept character.
      model_type: "unigram", "bpe", "char" or "word".
      lowercase: lower-case the corpus; the model records it (control piece ``<lowercase>``) so
        that :class:`Tokenizer` lower-cases its input too.
      character_coverage: fraction of characters covered by character pieces; the rest are
        encoded as UTF-8 bytes (byte fallback), so any text tokenizes.
      max_sentence_length: longer sentences (in bytes) are skipped by SentencePiece.
      num_threads: training threads (1 keeps training reproducible).
      seed: SentencePiece's random generator seed.

    Returns:
      The serialized model (bytes), ready for ``Tokenizer(model_bytes)``.

    Raises:
      ValueError: empty corpus, unknown model type, or a vocab_size too small for the corpus.
    """
    import sentencepiece as spm

    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ValueError(f"model_type must be unigram, bpe, char or word, got {model_type!r}")
    corpus = []
    for sentence in sentences:
        sentence = text_ops.normalize_text_py(sentence)
        if lowercase:
            sentence = text_ops.lowercase_py(sentence)
        if sentence:
            corpus.append(sentence)
    if not corpus:
        raise ValueError("cannot train a tokenizer on an empty corpus (no non-empty sentence)")
    corpus.sort()

    control_symbols = [LOWERCASE_PIECE] if lowercase else []
    writer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=writer,
            vocab_size=int(vocab_size),
            model_type=model_type,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>", unk_piece="<unk>",
            control_symbols=control_symbols,
            normalization_rule_name="identity",
            byte_fallback=True,
            hard_vocab_limit=False,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            input_sentence_size=0,          # use every sentence given (sampling is the caller's)
            shuffle_input_sentence=False,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        minimum = 4 + len(control_symbols) + _NUM_BYTE_PIECES
        raise ValueError(
            f"SentencePiece training failed for vocab_size={vocab_size} on {len(corpus)} "
            f"sentences (the vocabulary must hold at least {minimum} special and byte pieces "
            f"plus the corpus characters): {e}") from e
    return writer.getvalue()


class Tokenizer(tf.Module):
    """In-graph SentencePiece tokenizer (tensorflow-text), trackable for SavedModels.

    Args:
      model_bytes: a serialized SentencePiece model (from :func:`train_sentencepiece`).
      max_len: default sequence length of :meth:`tokenize`.
      add_bos: default for :meth:`tokenize`: start every sequence with BOS.
      add_eos: default for :meth:`tokenize`: end every (possibly truncated) sequence with EOS.
      lowercase: lower-case the input before encoding; None reads it from the model (True iff the
        model holds the ``<lowercase>`` control piece, as models trained with
        ``train_sentencepiece(lowercase=True)`` do).
    """

    def __init__(self, model_bytes: bytes, *, max_len: int = 64, add_bos: bool = False,
                 add_eos: bool = True, lowercase: Optional[bool] = None, name: str = "tokenizer"):
        super().__init__(name=name)
        import sentencepiece as spm
        import tensorflow_text as tf_text

        if not isinstance(model_bytes, (bytes, bytearray)) or not model_bytes:
            raise ValueError("Tokenizer needs the serialized SentencePiece model as "
                             "non-empty bytes")
        model_bytes = bytes(model_bytes)
        # Validate and read metadata in Python (cheap, and gives a clear error on bad bytes).
        try:
            processor = spm.SentencePieceProcessor(model_proto=model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError depending on version
            raise ValueError(f"not a valid SentencePiece model: {e}") from e
        ids = (processor.pad_id(), processor.bos_id(), processor.eos_id(), processor.unk_id())
        if ids != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise ValueError(f"SentencePiece model has (pad, bos, eos, unk) ids {ids}; keras-mm "
                             f"needs {(PAD_ID, BOS_ID, EOS_ID, UNK_ID)} (train it with "
                             "train_sentencepiece)")
        model_lowercase = processor.piece_to_id(LOWERCASE_PIECE) != processor.unk_id()
        if max_len < 1 + int(add_bos) + int(add_eos):
            raise ValueError(f"max_len={max_len} leaves no room for a token")
        self._model_bytes = model_bytes
        self._vocab_size = processor.get_piece_size()
        self.lowercase = model_lowercase if lowercase is None else bool(lowercase)
        self.max_len = int(max_len)
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        # The resource holds the model bytes as a constant of its creation function, so
        # SavedModels that use this tokenizer carry the model.
        self._sp = tf_text.SentencepieceTokenizer(model=model_bytes, out_type=tf.int32)

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "Tokenizer":
        """Loads ``path`` (local or any tf.io.gfile filesystem, e.g. gs://)."""
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"no SentencePiece model at {path}")
        with tf.io.gfile.GFile(path, "rb") as f:
            return cls(f.read(), **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def model_bytes(self) -> bytes:
        """The serialized SentencePiece model."""
        return self._model_bytes

    @property
    def vocab_size(self) -> int:
        """Number of ids (all ids are in ``[0, vocab_size)``)."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    # ------------------------------------------------------------------ graph ops
    def normalize(self, text):
        """The text exactly as it is encoded: normalised, lower-cased if ``lowercase``.

        Args:
          text: string tensor of any shape.
        Returns:
          string tensor of the same shape.
        """
        text = text_ops.normalize_text(text)
        if self.lowercase:
            text = text_ops.lowercase(text)
        return text

    def tokenize(self, text, max_len: Optional[int] = None, *, add_bos: Optional[bool] = None,
                 add_eos: Optional[bool] = None):
        """Strings -> padded token ids.

        Args:
          text: string tensor ``[N]`` or scalar ``[]``.
          max_len: sequence length L (default: the constructor's).
          add_bos, add_eos: override the constructor's defaults.
        Returns:
          int32 ``[N, L]`` (or ``[L]`` for a scalar): ``[BOS] pieces [EOS] PAD...``. A sequence
          longer than L is cut so that it still ends with EOS (when ``add_eos``).
        """
        max_len = self.max_len if max_len is None else int(max_len)
        add_bos = self.add_bos if add_bos is None else bool(add_bos)
        add_eos = self.add_eos if add_eos is None else bool(add_eos)
        room = max_len - int(add_bos) - int(add_eos)
        if room < 1:
            raise ValueError(f"max_len={max_len} leaves no room for a token")

        text = tf.convert_to_tensor(text, dtype=tf.string)
        rank = text.shape.rank
        if rank not in (0, 1):
            raise ValueError(f"tokenize takes a string scalar or vector, got shape {text.shape}")
        batch = text if rank == 1 else text[tf.newaxis]           # [N]
        ids = self._sp.tokenize(self.normalize(batch))             # ragged int32 [N, (pieces)]
        ids = ids[:, :room]
        n = tf.shape(batch, out_type=tf.int64)[0]
        parts = []
        if add_bos:
            parts.append(tf.fill([n, 1], tf.constant(BOS_ID, tf.int32)))
        parts.append(ids)
        if add_eos:
            parts.append(tf.fill([n, 1], tf.constant(EOS_ID, tf.int32)))
        if len(parts) > 1:
            ids = tf.concat(parts, axis=1)
        dense = ids.to_tensor(default_value=PAD_ID, shape=[None, max_len])  # [N, L]
        return dense if rank == 1 else dense[0]

    def detokenize(self, ids):
        """Token ids -> text.

        Everything from the first EOS on is ignored (decoder outputs), PAD and BOS are dropped,
        byte-fallback pieces are merged back into UTF-8.

        Args:
          ids: int tensor ``[N, L]`` or ``[L]`` (or a ragged ``[N, None]``).
        Returns:
          string ``[N]`` (or a scalar for ``[L]``).
        """
        if isinstance(ids, tf.RaggedTensor):
            ids = ids.to_tensor(default_value=PAD_ID)
        ids = tf.cast(tf.convert_to_tensor(ids), tf.int32)
        rank = ids.shape.rank
        if rank not in (1, 2):
            raise ValueError(f"detokenize takes ids [N, L] or [L], got shape {ids.shape}")
        batch = ids if rank == 2 else ids[tf.newaxis]                      # [N, L]
        before_eos = tf.math.cumsum(tf.cast(batch == EOS_ID, tf.int32), axis=1) == 0
        keep = before_eos & (batch != PAD_ID) & (batch != BOS_ID)
        text = self._sp.detokenize(tf.ragged.boolean_mask(batch, keep))  # [N]
        return text if rank == 2 else text[0]

    def lengths(self, ids):
        """Number of non-PAD tokens (BOS/EOS included) of ids ``[..., L]`` -> int32 ``[...]``."""
        return tf.reduce_sum(tf.cast(self.mask(ids), tf.int32), axis=-1)

    def mask(self, ids):
        """True where ids ``[..., L]`` are not PAD -> bool ``[..., L]``."""
        return tf.not_equal(ids, PAD_ID)
