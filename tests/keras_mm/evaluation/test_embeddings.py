"""Batched embedding: order, labels, ids, caption owners, keys; tf.data input and tensor outputs."""

import numpy as np
import pytest
import tensorflow as tf

from keras_mm.evaluation import embeddings as emb
from tests.keras_mm.evaluation import fakes


def _data(n=10, k=3, length=4, seed=0):
    rng = np.random.default_rng(seed)
    num_texts = rng.integers(1, k + 1, size=n).astype(np.int32)
    texts = rng.integers(3, 50, size=(n, k, length)).astype(np.int32)
    texts[np.arange(k)[None, :] >= num_texts[:, None]] = 0
    return {"image": fakes.images_with_index(n),
            "id": np.array([f"r{i}".encode() for i in range(n)]),
            "label": rng.integers(0, 5, size=n), "texts": texts, "num_texts": num_texts,
            "text": texts[:, 0]}


def _embed_text(ids):
    ids = np.asarray(ids, np.float32)
    return np.stack([ids.sum(axis=1), ids[:, 0]], axis=1)          # [B, 2]


def test_embed_dataset_keeps_order_labels_ids_and_caption_owners():
    d = _data()
    vectors = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    batches = fakes.batches(d["image"], [f"r{i}" for i in range(10)], 4, label=d["label"],
                            texts=d["texts"], num_texts=d["num_texts"])
    out = emb.embed_dataset(fakes.index_embedder(vectors), batches, embed_text=_embed_text)
    np.testing.assert_array_equal(out["image_emb"], vectors)
    assert list(out["ids"]) == [f"r{i}" for i in range(10)]
    np.testing.assert_array_equal(out["labels"], d["label"])
    owners = [i for i in range(10) for _ in range(d["num_texts"][i])]
    rows = np.stack([d["texts"][i, c] for i in range(10) for c in range(d["num_texts"][i])])
    np.testing.assert_array_equal(out["text_to_image"], owners)
    np.testing.assert_array_equal(out["text_emb"], _embed_text(rows))
    assert list(out["text_keys"]) == [r.astype(np.int32).tobytes() for r in rows]
    assert len(set(out["image_keys"])) == 10                  # distinct images, distinct keys

    cut = emb.embed_dataset(fakes.index_embedder(vectors), batches, embed_text=_embed_text,
                            max_examples=6)
    np.testing.assert_array_equal(cut["image_emb"], vectors[:6])
    np.testing.assert_array_equal(cut["text_to_image"], [o for o in owners if o < 6])


def test_embed_dataset_reads_tf_data_and_tensor_outputs_with_one_caption():
    d = _data(n=9)
    ds = tf.data.Dataset.from_tensor_slices({k: d[k] for k in ("image", "id", "text")}).batch(4)
    vectors = np.arange(27, dtype=np.float32).reshape(9, 3)

    def embed_image(images):                                    # returns a tf.Tensor
        return tf.gather(vectors, tf.cast(images[:, 0, 0, 0], tf.int32))

    out = emb.embed_dataset(embed_image, ds, embed_text=lambda ids: tf.constant(_embed_text(ids)))
    np.testing.assert_array_equal(out["image_emb"], vectors)
    assert out["labels"] is None
    np.testing.assert_array_equal(out["text_to_image"], np.arange(9))
    np.testing.assert_array_equal(out["text_emb"], _embed_text(d["text"]))
    # Two identical images get the same key.
    same = np.zeros([2, 2, 2, 3], np.float32)
    assert emb.image_key(same[0]) == emb.image_key(same[1])


def test_embed_texts_batches_in_order_and_errors_are_clear():
    table = fakes.PromptTable({f"s{i}": [i, -i] for i in range(7)})
    got = emb.embed_texts(table.embed_text, table, [f"s{i}" for i in range(7)], batch_size=3)
    np.testing.assert_array_equal(got, [[i, -i] for i in range(7)])
    assert table.calls == [3, 3, 1]
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        emb.embed_texts(lambda ids: np.ones([1, 2]), table, ["s1", "s2"])
    with pytest.raises(ValueError, match="no example"):
        emb.embed_dataset(lambda x: x, [])
    with pytest.raises(ValueError, match="at least one"):
        emb.embed_texts(table.embed_text, table, [])
