"""The dataset drivers on a real label-as-text folder written by the Beam job.

The towers are stand-ins (a fixed random projection of the pixels, a fixed random lookup of the
token ids): this exercises datasets -> embeddings -> metrics, not a trained model.
"""

import json
import os

import numpy as np
import pytest

from keras_mm.evaluation import embeddings as emb
from keras_mm.evaluation import linear_probe as lp
from keras_mm.evaluation import retrieval
from keras_mm.evaluation import zero_shot as zs
from keras_mm.pipelines import datasets

DIM = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from keras_mm.beam_jobs import label_as_text

    out = str(tmp_path_factory.mktemp("eval") / "digits")
    label_as_text.run(["--source", "digits", "--out", out, "--vocab_size", "400",
                       "--limit", "300"])
    return out


@pytest.fixture(scope="module")
def config():
    return datasets.InputConfig(image_size=8, eval_mode="resize", value_range="0_1",
                                batch_size=16, max_text_len=16)


@pytest.fixture(scope="module")
def towers(folder, config):
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(8 * 8 * 3, DIM)).astype(np.float32)
    vocab = datasets.load_tokenizer(folder, config).vocab_size
    table = rng.normal(size=(vocab, DIM)).astype(np.float32)
    table[0] = 0.0                                                  # PAD adds nothing

    def embed_image(images):                                        # [B, 8, 8, 3] -> [B, D]
        x = np.asarray(images).reshape(len(images), -1) @ projection
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def embed_text(ids):                                            # [B, L] -> [B, D]
        x = table[np.asarray(ids)].sum(axis=1)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return embed_image, embed_text


def _in_unit_interval(metrics, keys):
    assert set(keys) <= set(metrics)
    for key in keys:
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, key


def test_zero_shot_and_retrieval_on_a_label_as_text_folder(folder, config, towers):
    embed_image, embed_text = towers
    with open(os.path.join(folder, "stats.json")) as f:
        num_test = json.load(f)["splits"]["test"]
    runs = [zs.evaluate_zero_shot_folder(embed_image, embed_text, folder, "test", config,
                                         return_confusion=True) for _ in range(2)]
    _in_unit_interval(runs[0], ["zero_shot_top1", "zero_shot_top5"])
    assert runs[0]["num_examples"] == num_test
    assert runs[0]["confusion_matrix"].shape == (10, 10)
    assert runs[0]["confusion_matrix"].sum() == num_test
    assert runs[0]["zero_shot_top1"] == runs[1]["zero_shot_top1"]
    assert runs[0]["zero_shot_top5"] == runs[1]["zero_shot_top5"]

    keys = [f"retrieval_{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    first = retrieval.evaluate_retrieval_folder(embed_image, embed_text, folder, "test", config)
    again = retrieval.evaluate_retrieval_folder(embed_image, embed_text, folder, "test", config)
    plain = retrieval.evaluate_retrieval_folder(embed_image, embed_text, folder, "test", config,
                                                dedupe_texts=False, dedupe_images=False)
    _in_unit_interval(first, keys)
    assert first == again
    assert first["num_images"] == num_test
    assert first["num_texts"] == 5 * num_test               # 5 eval templates per image
    for key in keys:                                         # identical captions add true pairs
        assert first[key] >= plain[key]


def test_embeddings_and_probes_on_a_label_as_text_folder(folder, config, towers):
    embed_image, _ = towers

    def split(name):
        return datasets.eval_dataset(folder, name, config)

    a = emb.embed_dataset(embed_image, split("test"))
    b = emb.embed_dataset(embed_image, split("test"))
    np.testing.assert_array_equal(a["image_emb"], b["image_emb"])
    assert list(a["ids"]) == list(b["ids"]) and len(set(a["ids"])) == len(a["ids"])
    assert a["image_emb"].shape == (len(a["ids"]), DIM)
    assert a["labels"].dtype == np.int64 and a["labels"].max() < 10

    probe = lp.evaluate_linear_probe(embed_image, split("train"), split("validation"),
                                     split("test"))
    _in_unit_interval(probe, ["linear_probe_top1", "linear_probe_val_top1"])
    # Pixels of real digits are linearly separable enough: far above chance (0.1) only if each
    # embedding is paired with its own label.
    assert probe["linear_probe_top1"] > 0.6
    few = lp.evaluate_few_shot(embed_image, split("train"), split("test"), split("validation"),
                               shots=(1, 5))
    _in_unit_interval(few, ["few_shot_1shot_top1", "few_shot_5shot_top1"])
