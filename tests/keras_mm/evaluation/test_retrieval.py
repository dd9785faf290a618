"""Retrieval Recall@K against a brute-force per-query loop written from the definitions."""

import numpy as np
import pytest

from keras_mm.evaluation import retrieval
from tests.keras_mm.evaluation import fakes

KEYS = ["retrieval_i2t_r1", "retrieval_i2t_r5", "retrieval_i2t_r10",
        "retrieval_t2i_r1", "retrieval_t2i_r5", "retrieval_t2i_r10"]


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _brute_force(images, texts, owner, strings=None, keys=None, ks=(1, 5, 10)):
    """One query at a time: rank every candidate (ties: lower index first), look at the top K,
    and call a candidate a hit when it is a true pair by DESIGN.md's definition."""
    n, m = len(images), len(texts)
    strings = list(range(m)) if strings is None else list(strings)
    keys = list(range(n)) if keys is None else list(keys)

    def true_pair(i, j):
        return any(strings[jj] == strings[j] and keys[owner[jj]] == keys[i] for jj in range(m))

    out = {}
    i2t = {k: 0 for k in ks}
    for i in range(n):
        sims = [_cos(images[i], texts[j]) for j in range(m)]
        order = sorted(range(m), key=lambda j: (-sims[j], j))
        for k in ks:
            i2t[k] += any(true_pair(i, j) for j in order[:k])
    t2i = {k: 0 for k in ks}
    for j in range(m):
        sims = [_cos(texts[j], images[i]) for i in range(n)]
        order = sorted(range(n), key=lambda i: (-sims[i], i))
        for k in ks:
            t2i[k] += any(true_pair(i, j) for i in order[:k])
    for k in ks:
        out[f"retrieval_i2t_r{k}"] = i2t[k] / n
    for k in ks:
        out[f"retrieval_t2i_r{k}"] = t2i[k] / m
    return out


def _coco_like(rng, n=40, dim=6, noise=1.0):
    """n images with 1..5 captions each; captions = owner's vector + noise."""
    images = rng.normal(size=(n, dim))
    counts = rng.integers(1, 6, size=n)
    owner = np.repeat(np.arange(n), counts)
    texts = images[owner] + noise * rng.normal(size=(owner.size, dim))
    return images.astype(np.float32), texts.astype(np.float32), owner


def _assert_matches(got, want):
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_several_captions_per_image_match_brute_force():
    rng = np.random.default_rng(0)
    images, texts, owner = _coco_like(rng)
    got = retrieval.evaluate_retrieval(images, texts, owner)
    want = _brute_force(images, texts, owner)
    _assert_matches(got, want)
    assert got["num_images"] == 40 and got["num_texts"] == owner.size
    assert 0.1 < got["retrieval_i2t_r1"] < 0.9 and 0.1 < got["retrieval_t2i_r1"] < 0.9


def test_identical_captions_and_images_match_brute_force():
    rng = np.random.default_rng(1)
    images, texts, owner = _coco_like(rng, n=30, noise=1.5)
    # A small vocabulary of captions, so that many images share identical captions, and a few
    # duplicated images (same key, e.g. the same photo under two ids).
    strings = [f"caption {v}" for v in rng.integers(0, 12, size=owner.size)]
    keys = [f"img{v}" for v in range(30)]
    for a, b in [(3, 17), (5, 6), (5, 29)]:
        keys[b] = keys[a]
    got = retrieval.evaluate_retrieval(images, texts, owner, caption_strings=strings,
                                       image_keys=keys)
    _assert_matches(got, _brute_force(images, texts, owner, strings, keys))
    plain = retrieval.evaluate_retrieval(images, texts, owner)
    for key in KEYS:                        # more true pairs can only add hits
        assert got[key] >= plain[key]
    assert got["retrieval_i2t_r1"] > plain["retrieval_i2t_r1"]


def test_a_query_retrieving_an_identical_caption_or_image_of_another_item_is_a_hit():
    e = np.eye(4, dtype=np.float32)
    # Images A=0, B=1, C=2. Captions: 0 "a dog" of A (along e0), 1 "a dog" of B (along e1),
    # 2 "a cat" of C (along e2). Image B points along e0: its nearest caption is A's "a dog".
    images = np.stack([e[0], e[0] + 0.1 * e[1], e[2]])
    texts = np.stack([e[0], e[1], e[2]])
    owner = np.array([0, 1, 2])
    plain = retrieval.evaluate_retrieval(images, texts, owner)
    deduped = retrieval.evaluate_retrieval(images, texts, owner,
                                           caption_strings=["a dog", "a dog", "a cat"])
    assert plain["retrieval_i2t_r1"] == pytest.approx(2 / 3)     # B misses
    assert deduped["retrieval_i2t_r1"] == 1.0                    # B's "a dog" found via A's
    # Identical images: image A (along e3) is a duplicate of image C; C's caption 2 (along e3)
    # is nearest to A, which is a hit only when A and C count as the same image. Caption 0 (of A)
    # is nearest to B (a miss either way), caption 1 (of B) to B (a hit either way).
    texts2 = np.stack([e[1] + 0.1 * e[0], e[1], e[3]])
    images2 = np.stack([e[3], e[1], e[2]])
    plain2 = retrieval.evaluate_retrieval(images2, texts2, owner)
    dup = retrieval.evaluate_retrieval(images2, texts2, owner, image_keys=["x", "y", "x"])
    assert plain2["retrieval_t2i_r1"] == pytest.approx(1 / 3)    # caption 1 -> B only
    assert dup["retrieval_t2i_r1"] == pytest.approx(2 / 3)       # + caption 2 -> A (== C)


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(2)
    images, texts, owner = _coco_like(rng, n=57)
    strings = [str(v) for v in rng.integers(0, 40, size=owner.size)]
    whole = retrieval.evaluate_retrieval(images, texts, owner, strings, chunk_size=100_000)
    for chunk in (1, 7, 56):
        assert retrieval.evaluate_retrieval(images, texts, owner, strings,
                                            chunk_size=chunk) == whole


def test_exact_ties_rank_the_lower_index_first():
    # Embeddings built from a few exact vectors (entries 0, +-1, +-0.5), so similarities tie
    # exactly; the brute force breaks ties the same way (lower index first).
    base = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [-0.5, 0.5, -0.5, 0.5]],
                    np.float32)
    rng = np.random.default_rng(3)
    owner = np.repeat(np.arange(12), rng.integers(1, 4, size=12))
    images = base[rng.integers(0, 4, size=12)]
    texts = base[rng.integers(0, 4, size=owner.size)]
    _assert_matches(retrieval.evaluate_retrieval(images, texts, owner),
                    _brute_force(images, texts, owner))
    # A collapsed model: every similarity equal, so only the first candidates are retrieved.
    collapsed = retrieval.evaluate_retrieval(np.ones([12, 4]), np.ones([owner.size, 4]), owner)
    assert collapsed["retrieval_i2t_r1"] == pytest.approx(1 / 12)          # image 0 only
    assert collapsed["retrieval_t2i_r1"] == pytest.approx(np.mean(owner == 0))


def test_k_beyond_the_candidates_and_errors():
    images = np.eye(3, dtype=np.float32)
    got = retrieval.evaluate_retrieval(images, images[::-1], [2, 1, 0])
    assert got["retrieval_i2t_r1"] == 1.0 and got["retrieval_t2i_r10"] == 1.0
    with pytest.raises(ValueError, match="no caption"):
        retrieval.evaluate_retrieval(images, images[:2], [0, 1])
    with pytest.raises(ValueError, match="non-finite"):
        retrieval.evaluate_retrieval(images * np.nan, images, [0, 1, 2])
    with pytest.raises(ValueError, match="index the 3 images"):
        retrieval.evaluate_retrieval(images, images, [0, 1, 3])


def test_dataset_driver_uses_every_present_caption():
    rng = np.random.default_rng(4)
    n, k, length = 11, 3, 4
    num_texts = rng.integers(1, k + 1, size=n).astype(np.int32)
    token_ids = rng.integers(3, 9, size=(n, k, length)).astype(np.int32)
    token_ids[np.arange(k)[None, :] >= num_texts[:, None]] = 0       # missing captions: PAD
    token_ids[2, 0] = token_ids[7, 0]                                  # an identical caption
    vocab = rng.normal(size=(10, 5)).astype(np.float32)

    def embed_text(ids):
        return vocab[np.asarray(ids)].sum(axis=1)                      # [B, L, D] -> [B, D]

    image_vectors = rng.normal(size=(n, 5)).astype(np.float32)
    data = fakes.batches(fakes.images_with_index(n), [str(i) for i in range(n)], 4,
                         texts=token_ids, num_texts=num_texts)
    got = retrieval.evaluate_retrieval_dataset(fakes.index_embedder(image_vectors), embed_text,
                                               data)
    owner = np.array([i for i in range(n) for _ in range(num_texts[i])])
    rows = np.stack([token_ids[i, c] for i in range(n) for c in range(num_texts[i])])
    strings = [tuple(r) for r in rows]
    want = _brute_force(image_vectors, embed_text(rows), owner, strings)
    _assert_matches(got, want)
    assert got["num_texts"] == int(num_texts.sum())
    with pytest.raises(ValueError, match="eval_texts='all'"):
        retrieval.evaluate_retrieval_dataset(fakes.index_embedder(image_vectors), embed_text,
                                             fakes.batches(fakes.images_with_index(2),
                                                           ["a", "b"], 2))


def test_recall_is_scale_free_on_a_larger_chunked_set():
    rng = np.random.default_rng(5)
    images = rng.normal(size=(3000, 32)).astype(np.float32)
    owner = np.repeat(np.arange(3000), 5)
    texts = images[owner] + 2.0 * rng.normal(size=(15000, 32)).astype(np.float32)
    a = retrieval.evaluate_retrieval(images, texts, owner, chunk_size=512)
    b = retrieval.evaluate_retrieval(images / np.linalg.norm(images, axis=1, keepdims=True),
                                     texts * 3.0, owner, chunk_size=4096)
    for key in KEYS:
        assert a[key] == pytest.approx(b[key], abs=2e-4)    # cosine: scale-free (up to near-ties)
        assert 0.0 <= a[key] <= 1.0
    assert a["retrieval_i2t_r1"] <= a["retrieval_i2t_r5"] <= a["retrieval_i2t_r10"]
