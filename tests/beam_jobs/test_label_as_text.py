"""label-as-text job: digits round trip through tfds, runner portability, sources, templates."""

import glob
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from keras_mm.beam_jobs import dataset_writer, job_flags, label_as_text
from keras_mm.pipelines import features


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    summary = label_as_text.run(["--source", "digits", "--out", out, "--records_per_shard", "500"])
    return out, summary


def _read_records(out, split="*"):
    import tensorflow as tf

    records = []
    for path in sorted(glob.glob(os.path.join(out, f"{split}.tfrecord-*"))):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            records.append((os.path.basename(path).split(".")[0],
                            features.deserialize(raw, features.LABEL_AS_TEXT)))
    return records


def test_digits_counts_add_up(digits_dir):
    out, summary = digits_dir
    stats = dataset_writer.read_stats(out)
    assert stats["inputs"] == 1797
    dead = stats["dead_letters"]["total"]
    assert stats["inputs"] == stats["written"] + dead + stats["duplicates"]
    assert sum(stats["splits"].values()) == stats["written"]
    # Sanity of the deterministic 80/10/10 split on 1797 ids.
    assert 0.75 < stats["splits"]["train"] / stats["written"] < 0.85
    assert stats["shards"]["train"] == 3  # ceil(~1440 / 500)
    assert summary["records_per_second"] > 0


def test_digits_round_trip_through_tfds(digits_dir):
    import tensorflow_datasets as tfds

    out, _ = digits_dir
    images, targets = _digits()
    builder = tfds.builder_from_directory(out)
    assert builder.info.features["label"].names == list(label_as_text.DIGIT_NAMES)
    seen = 0
    for split in builder.info.splits:
        for ex in builder.as_dataset(split=split).as_numpy_iterator():
            index = int(ex["id"].decode().split("-")[1])
            expected = np.round(images[index] * 255.0 / 16.0).astype(np.uint8)
            got = ex["image"]["encoded"]
            assert got.shape == (8, 8, 3)
            for c in range(3):  # PNG is lossless: exact pixels
                np.testing.assert_array_equal(got[..., c], expected)
            assert ex["label"] == targets[index]
            assert ex["label/name"].decode() == label_as_text.DIGIT_NAMES[targets[index]]
            assert ex["image"]["height"] == 8 and ex["image"]["width"] == 8
            seen += 1
    assert seen == dataset_writer.read_stats(out)["written"]


def test_captions_use_train_templates_only_in_train(digits_dir):
    out, _ = digits_dir
    train_t = [l for l in open(os.path.join(out, "templates_train.txt")).read().splitlines() if l]
    eval_t = [l for l in open(os.path.join(out, "templates_eval.txt")).read().splitlines() if l]
    assert train_t and eval_t and not set(train_t) & set(eval_t)
    assert open(os.path.join(out, "classnames.txt")).read().split() == list(
        label_as_text.DIGIT_NAMES)
    used = set()
    for split, r in _read_records(out):
        name = r[features.LABEL_NAME]
        templates = train_t if split == "train" else eval_t
        filled = [t.format(name) for t in templates]
        texts = r[features.TEXTS]
        # At most 16 captions: a window of consecutive templates (cyclic) chosen by the id.
        assert len(texts) == min(16, len(templates)), r[features.ID]
        start = filled.index(texts[0])
        assert texts == [filled[(start + i) % len(filled)] for i in range(len(texts))]
        if split == "train":
            used.update(train_t[filled.index(t)] for t in texts)
    assert used == set(train_t)  # every training template is used somewhere


def test_split_is_deterministic_by_id(digits_dir):
    out, _ = digits_dir
    for split, r in _read_records(out):
        assert split == dataset_writer.assign_split(r[features.ID], (0.8, 0.1, 0.1))


def test_multi_processing_runner_writes_the_same_records(digits_dir, tmp_path):
    out, _ = digits_dir
    other = str(tmp_path / "mp")
    label_as_text.run(["--source", "digits", "--out", other, "--records_per_shard", "500",
                       "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.tfrecord-*")))
    assert names == sorted(
        os.path.basename(p) for p in glob.glob(os.path.join(other, "*.tfrecord-*")))
    for name in names:  # byte-identical shards: same records, same order
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(other, name), "rb") as b:
            assert a.read() == b.read(), name
    assert dataset_writer.read_stats(out) == dataset_writer.read_stats(other)


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_manifest_source_with_bad_lines(tmp_path):
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(4)]
    for i, pic in enumerate(pics):
        (tmp_path / f"{i}.png").write_bytes(_png(pic))
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    lines = [
        json.dumps({"image": "0.png", "label": 0}),
        json.dumps({"image": "1.png", "label": "dog"}),
        json.dumps({"image": "2.png", "label": 7}),        # no class 7
        "{not json",
        json.dumps({"image": "missing.png", "label": 1}),
        json.dumps({"image": str(tmp_path / "3.png"), "label": "cat", "split": "test"}),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    summary = label_as_text.run(["--source", "manifest", "--input", str(tmp_path / "m.jsonl"),
                                 "--classnames", str(tmp_path / "names.txt"), "--out", out,
                                 "--min_side", "4"])
    assert summary["written"] == 3 and summary["inputs"] == 6
    assert summary["dead_letters"]["by_reason"] == {"bad_label": 1, "bad_source_line": 1,
                                                    "missing_file": 1}
    by_id = {r[features.ID]: (s, r) for s, r in _read_records(out)}
    assert by_id[str(tmp_path / "3.png")][0] == "test"
    for name, index, label in (("0.png", 0, 0), ("1.png", 1, 1)):
        _, r = by_id[name]
        assert r[features.LABEL] == label and r[features.LABEL_NAME] == ["cat", "dog"][label]
        decoded = np.asarray(Image.open(io.BytesIO(r[features.IMAGE_ENCODED])))
        np.testing.assert_array_equal(decoded, pics[index])


def test_tfds_folder_source_keeps_its_splits(digits_dir, tmp_path):
    out, _ = digits_dir
    again = str(tmp_path / "again")
    summary = label_as_text.run(["--source", "tfds", "--input", out, "--out", again,
                                 "--templates_eval", "clip_imagenet_80"])
    stats = dataset_writer.read_stats(out)
    assert summary["splits"] == stats["splits"]  # source splits kept, not re-drawn
    eval_t = open(os.path.join(again, "templates_eval.txt")).read().splitlines()
    assert len(eval_t) == 80 and "a photo of a {}." in eval_t
    train_t = open(os.path.join(again, "templates_train.txt")).read().splitlines()
    assert train_t and not set(train_t) & set(eval_t)  # overlap removed from training


def test_bad_templates_and_flags(tmp_path):
    bad = tmp_path / "t.txt"
    bad.write_text("no placeholder here\n")
    with pytest.raises(job_flags.FlagError, match="exactly one"):
        label_as_text.run(["--out", str(tmp_path / "o"), "--templates_train", str(bad)])
    with pytest.raises(job_flags.FlagError, match="split_fractions"):
        label_as_text.run(["--out", str(tmp_path / "o"), "--split_fractions", "0.5,0.5,0.5"])
    with pytest.raises(job_flags.FlagError, match="unrecognised"):
        label_as_text.run(["--out", str(tmp_path / "o"), "--no_such_flag=1"])
    with pytest.raises(job_flags.FlagError, match="needs --classnames"):
        (tmp_path / "m.jsonl").write_text("{}\n")
        label_as_text.run(["--out", str(tmp_path / "o"), "--source", "manifest",
                           "--input", str(tmp_path / "m.jsonl")])
