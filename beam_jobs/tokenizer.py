"""Beam job: train the SentencePiece tokenizer of a dataset folder on its training captions.

    python -m keras_mm.beam_jobs.tokenizer --dataset DIR [--vocab_size 1000] [--model_type unigram]
        [--no_lowercase] [--max_sentences 1000000] [any Beam pipeline option, e.g. --runner ...]

Reads the ``texts`` of every ``train.tfrecord-*`` record (:class:`ReadCaptions`), samples at most
``max_sentences`` captions, trains with :func:`keras_mm.pipelines.tokenizer.train_sentencepiece`
in one step and writes ``DIR/tokenizer.model`` through Beam's ``FileSystems`` (local, gs://, ...)
(:class:`TrainTokenizer`). Counters (namespace ``kmm``): ``tokenizer_captions_read``,
``tokenizer_records_read``, ``tokenizer_sentences_trained``; distribution
``tokenizer_vocab_size``.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, Iterable, List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from keras_mm.beam_jobs import job_flags
from keras_mm.pipelines import features as F

NAMESPACE = "kmm"
TOKENIZER_FILE = "tokenizer.model"
CLASSNAMES_FILE = "classnames.txt"
FEATURES_FILE = "features.json"      # tfds metadata written by BuildDataset
DEFAULT_MAX_SENTENCES = 1_000_000
_SENTENCES_COUNTER = "tokenizer_sentences_trained"


def _join(folder: str, name: str) -> str:
    return FileSystems.join(folder, name)


def detect_kind(folder: str) -> str:
    """``video_tubes`` if the folder's tfds ``features.json`` describes video records, else
    ``label_as_text`` if the folder holds ``classnames.txt``, else ``image_text``."""
    features_path = _join(folder, FEATURES_FILE)
    if FileSystems.exists(features_path):
        import json

        with FileSystems.open(features_path) as f:
            spec = json.loads(f.read().decode("utf-8"))
        top = spec.get("featuresDict", {}).get("features", {})
        if "video" in top:
            return F.VIDEO_TUBES
    return F.LABEL_AS_TEXT if FileSystems.exists(_join(folder, CLASSNAMES_FILE)) else F.IMAGE_TEXT


class _ExtractTexts(beam.DoFn):
    """Serialized record (bytes) -> its captions (str), one output each."""

    def __init__(self, kind: str):
        self._kind = kind
        self._records = Metrics.counter(NAMESPACE, "tokenizer_records_read")
        self._captions = Metrics.counter(NAMESPACE, "tokenizer_captions_read")

    def process(self, serialized: bytes) -> Iterable[str]:
        record = F.deserialize(serialized, self._kind)
        self._records.inc()
        texts = list(record[F.TEXTS])
        if self._kind == F.VIDEO_TUBES:     # MV-GPT's transcripts are text the model reads too
            texts += [record.get(F.TRANSCRIPT_CURRENT), record.get(F.TRANSCRIPT_FUTURE)]
        for text in texts:
            if text:
                self._captions.inc()
                yield text


class ReadCaptions(beam.PTransform):
    """PBegin -> PCollection[str]: the captions of the ``split`` records of a dataset folder.

    Args:
      dataset_dir: the dataset folder (local or any Beam filesystem).
      kind: record kind; None detects it (``classnames.txt`` -> label_as_text).
      split: which split's shards to read (``{split}.tfrecord-*``).
    """

    def __init__(self, dataset_dir: str, kind: Optional[str] = None, split: str = "train"):
        super().__init__()
        self._dataset_dir = dataset_dir
        self._kind = kind
        self._split = split

    def expand(self, pbegin):
        kind = self._kind or detect_kind(self._dataset_dir)
        if kind not in (F.IMAGE_TEXT, F.LABEL_AS_TEXT, F.VIDEO_TUBES):
            raise ValueError(f"unknown record kind {kind!r}")
        pattern = _join(self._dataset_dir, f"{self._split}.tfrecord-*")
        return (pbegin
                | "ReadRecords" >> beam.io.ReadFromTFRecord(pattern)
                | "ExtractTexts" >> beam.ParDo(_ExtractTexts(kind)))


class _TrainAndWrite(beam.DoFn):
    """The one sample (a list of captions) -> trains, writes the model, outputs its path."""

    def __init__(self, path: str, vocab_size: int, model_type: str, lowercase: bool):
        self._path = path
        self._vocab_size = vocab_size
        self._model_type = model_type
        self._lowercase = lowercase
        self._sentences = Metrics.counter(NAMESPACE, _SENTENCES_COUNTER)
        self._vocab = Metrics.distribution(NAMESPACE, "tokenizer_vocab_size")

    def process(self, sample: List[str]) -> Iterable[str]:
        import sentencepiece as spm

        from keras_mm.pipelines.tokenizer import train_sentencepiece

        # Sample's order depends on the runner; train_sentencepiece sorts, so the model depends
        # only on which sentences were sampled.
        model = train_sentencepiece(sample, self._vocab_size, model_type=self._model_type,
                                    lowercase=self._lowercase)
        self._sentences.inc(len(sample))
        self._vocab.update(spm.SentencePieceProcessor(model_proto=model).get_piece_size())
        with FileSystems.create(self._path) as f:
            f.write(model)
        yield self._path


class TrainTokenizer(beam.PTransform):
    """PCollection[str] of captions -> PCollection[str] holding one path, ``<dataset_dir>/
    tokenizer.model``, written once training is done.

    Args:
      dataset_dir: where ``tokenizer.model`` goes.
      vocab_size, model_type, lowercase: see ``train_sentencepiece``.
      max_sentences: captions sampled uniformly (``Sample.FixedSizeGlobally``) for training.
    """

    def __init__(self, dataset_dir: str, vocab_size: int = 1000, *, model_type: str = "unigram",
                 lowercase: bool = True, max_sentences: int = DEFAULT_MAX_SENTENCES):
        super().__init__()
        if max_sentences < 1:
            raise ValueError(f"max_sentences must be positive, got {max_sentences}")
        self._path = _join(dataset_dir, TOKENIZER_FILE)
        self._vocab_size = int(vocab_size)
        self._model_type = model_type
        self._lowercase = bool(lowercase)
        self._max_sentences = int(max_sentences)

    def expand(self, captions):
        return (captions
                | "Sample" >> beam.combiners.Sample.FixedSizeGlobally(self._max_sentences)
                | "TrainAndWrite" >> beam.ParDo(_TrainAndWrite(
                    self._path, self._vocab_size, self._model_type, self._lowercase)))


def _parse(argv: Optional[List[str]]):
    parser = job_flags.beam_parser(
        "kmm data tokenizer",
        "Train <dataset>/tokenizer.model (SentencePiece) on the training captions.")
    parser.add_argument("--dataset", required=True, help="dataset folder (local or gs://)")
    parser.add_argument("--vocab_size", type=int, default=1000)
    parser.add_argument("--model_type", default="unigram",
                        choices=("unigram", "bpe", "char", "word"))
    parser.add_argument("--no_lowercase", action="store_true",
                        help="keep case (default: lower-case the captions and the tokenizer input)")
    parser.add_argument("--max_sentences", type=int, default=DEFAULT_MAX_SENTENCES)
    args, options = job_flags.parse_job_args(parser, argv)
    if args.vocab_size < 1:
        parser.error(f"--vocab_size must be positive, got {args.vocab_size}")
    if args.max_sentences < 1:
        parser.error(f"--max_sentences must be positive, got {args.max_sentences}")
    return args, options


def run(argv: Optional[List[str]] = None) -> Dict[str, object]:
    """Runs the job; returns ``{"tokenizer": path, "vocab_size": int, "sentences": int,
    "seconds": float}``."""
    args, options = _parse(argv)
    pattern = _join(args.dataset, "train.tfrecord-*")
    if not FileSystems.match([pattern])[0].metadata_list:
        # (Object stores have no folders to test for, so both cases are this one check.)
        raise FileNotFoundError(f"dataset folder {args.dataset!r} does not exist or has no "
                                "train shard (train.tfrecord-*)")
    path = _join(args.dataset, TOKENIZER_FILE)
    start = time.time()
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline
         | "ReadCaptions" >> ReadCaptions(args.dataset)
         | "TrainTokenizer" >> TrainTokenizer(args.dataset, args.vocab_size,
                                              model_type=args.model_type,
                                              lowercase=not args.no_lowercase,
                                              max_sentences=args.max_sentences))
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.time() - start

    sentences = None
    try:
        counters = result.metrics().query(
            MetricsFilter().with_namespace(NAMESPACE).with_name(_SENTENCES_COUNTER))["counters"]
        if counters:
            sentences = int(sum(c.committed if c.committed is not None else c.attempted
                                for c in counters))
    except (NotImplementedError, KeyError):  # runners without metrics
        pass

    import sentencepiece as spm

    with FileSystems.open(path) as f:
        vocab_size = spm.SentencePieceProcessor(model_proto=f.read()).get_piece_size()
    summary = {"tokenizer": path, "vocab_size": vocab_size, "sentences": sentences,
               "seconds": round(seconds, 3)}
    logging.info("tokenizer job: %s", summary)
    return summary


if __name__ == "__main__":
    print(run())
