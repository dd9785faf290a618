"""keras_mm.beam_jobs.tokenizer: ReadCaptions, TrainTokenizer and run(argv) on small folders."""

import os
import pickle

import apache_beam as beam
import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from keras_mm.beam_jobs import job_flags
from keras_mm.beam_jobs import tokenizer as job
from keras_mm.pipelines import features as F
from keras_mm.pipelines.tokenizer import Tokenizer

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the number {}.", "a drawing of the digit {}.", "{} written by hand"]


def _png():
    return tf.io.encode_png(np.full([4, 4, 3], 9, np.uint8)).numpy()


def write_folder(folder, kind=F.LABEL_AS_TEXT, n=20, shards=3, split="train"):
    """n records, record i: digit i % 10, captions = all templates for label-as-text, one
    caption for image-text. Returns every caption written."""
    os.makedirs(folder, exist_ok=True)
    writers = [tf.io.TFRecordWriter(os.path.join(
        folder, f"{split}.tfrecord-{s:05d}-of-{shards:05d}")) for s in range(shards)]
    captions = []
    for i in range(n):
        name = NAMES[i % 10]
        record = {F.IMAGE_ENCODED: _png(), F.IMAGE_HEIGHT: 4, F.IMAGE_WIDTH: 4, F.ID: f"r{i}"}
        if kind == F.LABEL_AS_TEXT:
            record.update({F.TEXTS: [t.format(name) for t in TEMPLATES], F.LABEL: i % 10,
                           F.LABEL_NAME: name})
        else:
            record[F.TEXTS] = [f"Image {i} shows a {name}"]
        captions += record[F.TEXTS]
        writers[i % shards].write(F.serialize(record, kind))
    for w in writers:
        w.close()
    if kind == F.LABEL_AS_TEXT:
        with open(os.path.join(folder, "classnames.txt"), "w") as f:
            f.write("\n".join(NAMES) + "\n")
    return captions


@pytest.mark.parametrize("kind", [F.LABEL_AS_TEXT, F.IMAGE_TEXT])
def test_read_captions(tmp_path, kind):
    folder = str(tmp_path / kind)
    captions = write_folder(folder, kind)
    write_folder(folder, kind, n=5, split="validation")   # must not be read
    assert job.detect_kind(folder) == kind
    with BeamTestPipeline() as p:
        assert_that(p | job.ReadCaptions(folder), equal_to(captions))


def test_train_tokenizer(tmp_path):
    folder = str(tmp_path)
    captions = [t.format(n) for n in NAMES for t in TEMPLATES] + ["Café Naïve", "東京の写真"]
    with BeamTestPipeline() as p:
        paths = (p | beam.Create(captions)
                 | job.TrainTokenizer(folder, vocab_size=400, model_type="bpe"))
        assert_that(paths, equal_to([os.path.join(folder, "tokenizer.model")]))
    with open(os.path.join(folder, "tokenizer.model"), "rb") as f:
        model = f.read()
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert sp.get_piece_size() <= 400 and (sp.pad_id(), sp.eos_id()) == (0, 2)
    tok = Tokenizer(model)
    assert tok.lowercase
    for text in ["a drawing of the digit SEVEN.", "Café Naïve", "東京の写真"]:
        assert tok.detokenize(tok.tokenize(text)).numpy().decode() == text.lower()


def test_dofns_pickle():
    for fn in [job._ExtractTexts(F.IMAGE_TEXT), job._TrainAndWrite("/x/tokenizer.model", 300,
                                                                   "unigram", True)]:
        assert isinstance(pickle.loads(pickle.dumps(fn)), type(fn))


def test_run_end_to_end(tmp_path):
    folder = str(tmp_path / "digits")
    captions = write_folder(folder, n=30)
    summary = job.run(["--dataset", folder, "--vocab_size", "320", "--model_type", "bpe",
                       "--runner=DirectRunner", "--direct_num_workers=1"])
    path = os.path.join(folder, "tokenizer.model")
    assert summary["tokenizer"] == path and os.path.exists(path)
    assert summary["sentences"] == len(captions) == 90
    tok = Tokenizer.from_file(path)
    assert summary["vocab_size"] == tok.vocab_size <= 320
    assert summary["seconds"] > 0
    assert tok.detokenize(tok.tokenize("Eight Written By Hand")).numpy() == b"eight written by hand"


def test_run_samples_max_sentences_and_keeps_case(tmp_path):
    folder = str(tmp_path / "photos")
    write_folder(folder, F.IMAGE_TEXT, n=40)
    summary = job.run(["--dataset", folder, "--vocab_size", "300", "--max_sentences", "7",
                       "--no_lowercase", "--model_type", "char"])
    assert summary["sentences"] == 7
    assert not Tokenizer.from_file(summary["tokenizer"]).lowercase


def test_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        job.run(["--dataset", str(tmp_path / "missing")])
    with pytest.raises(job_flags.FlagError, match="--dataset"):
        job.run([])                                   # --dataset is required
    with pytest.raises(job_flags.FlagError, match="vocab_size"):
        job.run(["--dataset", str(tmp_path), "--vocab_size", "0"])
    with pytest.raises(job_flags.FlagError, match="--no_such_flag"):
        job.run(["--dataset", str(tmp_path), "--no_such_flag=1"])


def test_run_on_a_video_folder_learns_captions_and_transcripts(tmp_path):
    """A moving-digits folder is detected as video (its tfds features.json) and the tokenizer
    learns the transcripts too: every word of the grammar becomes one piece."""
    from keras_mm.beam_jobs import video_tubes

    folder = str(tmp_path / "clips")
    video_tubes.run(["--source", "moving-digits", "--out", folder, "--num_train", "60",
                     "--num_validation", "0", "--num_test", "0"])
    assert job.detect_kind(folder) == F.VIDEO_TUBES
    os.remove(os.path.join(folder, "tokenizer.model"))
    summary = job.run(["--dataset", folder, "--vocab_size", "400", "--model_type", "bpe"])
    records = [F.deserialize(r.numpy(), F.VIDEO_TUBES)
               for r in tf.data.TFRecordDataset(tf.io.gfile.glob(folder + "/train.*"))]
    assert summary["sentences"] == sum(len(r[F.TEXTS]) + 2 for r in records)
    sp = spm.SentencePieceProcessor(model_proto=open(os.path.join(folder, "tokenizer.model"),
                                                     "rb").read())
    assert len(sp.encode("here")) == 1         # a transcript-only word ("here is a large 4")
