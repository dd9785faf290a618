"""keras_mm.pipelines.datasets: train / eval pipelines over dataset folders written here."""

import os

import numpy as np
import pytest
import tensorflow as tf

from keras_mm.pipelines import datasets as D
from keras_mm.pipelines.tokenizer import EOS_ID, PAD_ID, Tokenizer

SMALL = dict(image_size=24, max_text_len=48, batch_size=4, shuffle_buffer=8, cycle_length=2)

def config(**kwargs):
    return D.InputConfig(**{**SMALL, **kwargs})

def detok(folder, ids):
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.model"))
    return [t.decode() for t in tok.detokenize(ids).numpy()]

def test_label_as_text_train_batches(label_as_text_folder):
    folder = label_as_text_folder()
    ds = D.train_dataset(folder, config(augment="crop_flip"))
    batches = list(ds.take(8))   # 24 examples, repeated: more batches than one epoch
    batch = batches[0]
    assert set(batch) == {"image", "text", "id", "label"}
    assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == tf.float32
    assert batch["text"].shape == (4, 48) and batch["text"].dtype == tf.int32
    assert batch["id"].shape == (4,) and batch["id"].dtype == tf.string
    assert batch["label"].shape == (4,) and batch["label"].dtype == tf.int64
    images = np.concatenate([b["image"].numpy() for b in batches])
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.max() > 0.5
    # each caption names the example's label (records were written that way)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for b in batches:
        for text, label in zip(detok(folder, b["text"]), b["label"].numpy()):
            assert names[label] in text.replace(".", "").split()
        ids = b["text"].numpy()
        assert ((ids == EOS_ID).sum(axis=1) == 1).all()

def test_train_none_augment_is_the_resized_digit(label_as_text_folder, digits):
    """augment="none" only resizes: the batch equals the source digit, resized independently."""
    folder = label_as_text_folder({"train": 6}, shards=1)
    ds = D.train_dataset(folder, config(augment="none", value_range="0_1", batch_size=6,
                                        repeat=False))
    batch = next(iter(ds))
    images, _ = digits
    for image, ident in zip(batch["image"].numpy(), batch["id"].numpy()):
        index = int(ident.decode().split("-")[1])
        expected = tf.image.resize(images[index].astype(np.float32), [24, 24]).numpy()
        expected = np.clip(np.round(expected), 0, 255) / 255.0
        np.testing.assert_allclose(image, expected, atol=1e-6)

def test_train_random_caption_varies(label_as_text_folder):
    folder = label_as_text_folder({"train": 12}, shards=1)
    ds = D.train_dataset(folder, config(batch_size=12, augment="none"))
    seen = {}
    for batch in ds.take(12):
        for ident, text in zip(batch["id"].numpy(), detok(folder, batch["text"])):
            seen.setdefault(ident, set()).add(text)
    # records with i % 3 == 2 have 3 captions: several of them get picked
    assert len(seen[b"train-2"]) >= 2 and len(seen[b"train-5"]) >= 2
    assert len(seen[b"train-0"]) == 1

def test_image_text_eval_batches_and_order(image_text_folder):
    folder = image_text_folder({"train": 8, "validation": 5})
    cfg = config(batch_size=2, eval_texts="all", eval_max_texts=2)
    ds = D.eval_dataset(folder, "validation", cfg)
    first = list(ds)
    second = list(ds)
    assert [b["image"].shape[0] for b in first] == [2, 2, 1]       # remainder kept
    batch = first[0]
    assert set(batch) == {"image", "text", "texts", "num_texts", "id"}
    assert batch["image"].shape == (2, 24, 24, 3)
    assert batch["texts"].shape == (2, 2, 48) and batch["texts"].dtype == tf.int32
    ids = [i for b in first for i in b["id"].numpy().tolist()]
    # shards written round-robin (2 shards), read in sorted shard order, records in file order
    assert ids == [b"validation-0", b"validation-2", b"validation-4", b"validation-1",
                   b"validation-3"]
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    # record validation-0 has 3 captions (2 kept), validation-1 has 1 (second row all PAD)
    num = np.concatenate([b["num_texts"].numpy() for b in first])
    np.testing.assert_array_equal(num, [2, 2, 2, 1, 1])
    texts = first[1]["texts"].numpy()                               # validation-4, validation-1
    assert detok(folder, texts[0]) == ["a photo of a chinese temple",
                                       "an old café with a naïve painting"]
    assert (texts[1, 1] == PAD_ID).all()
    np.testing.assert_array_equal(first[1]["text"].numpy(), texts[:, 0])

def test_eval_center_crop_of_a_photo(image_text_folder, photos):
    folder = image_text_folder({"validation": 2}, shards=1)
    cfg = config(image_size=40, eval_mode="center_crop", eval_resize_ratio=1.0,
                 value_range="0_1")
    batch = next(iter(D.eval_dataset(folder, "validation", cfg)))
    assert batch["image"].shape == (2, 40, 40, 3)
    assert "label" not in batch
    # independent reference: central 107 x 107 square of the JPEG-decoded photo, resized
    decoded = tf.io.decode_jpeg(tf.io.encode_jpeg(photos[0], quality=95)).numpy()
    left = (160 - 107) // 2
    square = decoded[:, left:left + 107].astype(np.float32)
    expected = tf.image.resize(square, [40, 40]).numpy() / 255.0
    # short side 107 -> 40 first, then crop: a different resampling of the same window
    assert np.abs(batch["image"][0].numpy() - expected).mean() < 0.03
    assert detok(folder, batch["text"]) == ["a photo of a chinese temple",
                                            "a red flower with leaves"]

def test_input_context_gives_disjoint_files(label_as_text_folder):
    folder = label_as_text_folder({"train": 24}, shards=4)
    cfg = config(batch_size=4, repeat=False, drop_remainder=False)
    ids = []
    for pipeline in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline,
                                         num_replicas_in_sync=2)
        ds = D.train_dataset(folder, cfg, input_context=ctx)
        assert (ds.options().experimental_distribute.auto_shard_policy
                == tf.data.experimental.AutoShardPolicy.OFF)
        batches = list(ds)
        assert max(b["id"].shape[0] for b in batches) == 2          # per-replica batch 4 / 2
        ids.append({i for b in batches for i in b["id"].numpy().tolist()})
    # round-robin into 4 shards: shards 0, 2 hold records 0, 2, 4, ...; shards 1, 3 the odd ones
    assert ids[0] == {f"train-{i}".encode() for i in range(0, 24, 2)}
    assert ids[1] == {f"train-{i}".encode() for i in range(1, 24, 2)}

def test_input_context_with_fewer_files_than_pipelines(label_as_text_folder):
    folder = label_as_text_folder({"train": 10}, shards=1)
    cfg = config(batch_size=2, repeat=False, drop_remainder=False)
    ids = []
    for pipeline in range(2):
        ctx = tf.distribute.InputContext(2, pipeline, 2)
        ids.append({i for b in D.train_dataset(folder, cfg, input_context=ctx)
                    for i in b["id"].numpy().tolist()})
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 10

def test_randaugment_pipeline_and_imagenet_range(label_as_text_folder):
    folder = label_as_text_folder({"train": 8}, shards=1)
    cfg = config(augment="randaugment", randaugment_layers=1, value_range="imagenet")
    batch = next(iter(D.train_dataset(folder, cfg)))
    assert batch["image"].shape == (4, 24, 24, 3)
    low = (0 - 0.485) / 0.229
    assert batch["image"].numpy().min() >= low - 1e-5

def test_clear_errors(label_as_text_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        D.train_dataset(str(tmp_path / "nowhere"), config())
    folder = label_as_text_folder({"train": 4}, shards=1, tokenizer=False, name="no_tok")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        D.train_dataset(folder, config())
    folder = label_as_text_folder({"train": 4}, shards=1, name="ok")
    with pytest.raises(ValueError, match=r"'test'.*|test"):
        D.eval_dataset(folder, "test", config())
    with pytest.raises(ValueError, match="augment"):
        config(augment="mixup")
    with pytest.raises(ValueError, match="crop_scale"):
        config(crop_scale=(0.5, 0.2))

def test_benchmark_dataset(label_as_text_folder):
    folder = label_as_text_folder({"train": 8}, shards=1)
    result = D.benchmark_dataset(D.train_dataset(folder, config()), num_batches=5, warmup=2)
    assert result["batches"] == 5 and result["examples"] == 20
    assert result["examples_per_second"] > 0
    assert result["examples_per_second"] == pytest.approx(20 / result["seconds"])
    finite = D.eval_dataset(folder, "train", config(batch_size=3))      # 3 + 3 + 2
    result = D.benchmark_dataset(finite, num_batches=10, warmup=1)
    assert result["batches"] == 2 and result["examples"] == 5

def test_hard_negative_batches(label_as_text_folder):
    """``hard_negatives``: each ``text_negative`` is its ``text`` with one grouped word swapped;
    captions without a grouped word are marked invalid and left as they are."""
    folder = label_as_text_folder({"train": 12}, shards=1)
    groups = "zero one two three four five six seven eight nine|photo drawing"
    ds = D.train_dataset(folder, config(batch_size=12, augment="none", hard_negatives=groups))
    group_of = {w: g for g, ws in enumerate(groups.split("|")) for w in ws.split()}
    seen_valid = seen_invalid = 0
    for batch in ds.take(4):
        assert batch["text_negative"].shape == batch["text"].shape
        assert batch["text_negative"].dtype == tf.int32 and batch["negative_valid"].dtype == tf.bool
        for text, negative, valid in zip(detok(folder, batch["text"]),
                                         detok(folder, batch["text_negative"]),
                                         batch["negative_valid"].numpy()):
            words, swapped = text.split(" "), negative.split(" ")
            changed = [(a, b) for a, b in zip(words, swapped) if a != b]
            if valid:
                seen_valid += 1
                assert len(words) == len(swapped) and len(changed) == 1, (text, negative)
                (old, new), = changed
                assert group_of[old] == group_of[new]
            else:
                seen_invalid += 1
                assert negative == text and not any(w in group_of for w in words)
    assert seen_valid > 0


def test_hard_negative_config_errors():
    with pytest.raises(ValueError, match="hard_negatives"):
        config(hard_negatives="a b|b c")
    with pytest.raises(ValueError, match="hard_negatives"):
        config(hard_negatives="small", render_text=True)
    assert config().negative_groups() == ()


def test_contrastive_caption_is_a_second_independent_draw(label_as_text_folder):
    """``contrastive_caption="random"``: ``text_contrastive`` is one of the example's captions,
    drawn apart from ``text`` (here the first caption, always the same)."""
    folder = label_as_text_folder({"train": 12}, shards=1)
    ds = D.train_dataset(folder, config(batch_size=12, augment="none", train_caption="first",
                                        contrastive_caption="random"))
    first, contrastive = {}, {}
    for batch in ds.take(12):
        assert set(batch) == {"image", "text", "text_contrastive", "id", "label"}
        assert batch["text_contrastive"].shape == batch["text"].shape
        assert batch["text_contrastive"].dtype == tf.int32
        for ident, text, other in zip(batch["id"].numpy(), detok(folder, batch["text"]),
                                      detok(folder, batch["text_contrastive"])):
            first.setdefault(ident, set()).add(text)
            contrastive.setdefault(ident, set()).add(other)
    assert all(len(texts) == 1 for texts in first.values())
    # records with i % 3 == 2 have 3 captions, the others one
    assert len(contrastive[b"train-2"]) >= 2 and contrastive[b"train-0"] == first[b"train-0"]
    assert first[b"train-2"] < contrastive[b"train-2"]
    # both random: two draws, not one caption twice
    ds = D.train_dataset(folder, config(batch_size=12, augment="none",
                                        contrastive_caption="random"))
    differ = sum(a != b for batch in ds.take(6)
                 for a, b in zip(detok(folder, batch["text"]),
                                 detok(folder, batch["text_contrastive"])))
    assert differ > 0


def test_contrastive_caption_config_errors():
    with pytest.raises(ValueError, match="contrastive_caption"):
        config(contrastive_caption="all")
    with pytest.raises(ValueError, match="contrastive_caption"):
        config(contrastive_caption="random", render_text=True)
