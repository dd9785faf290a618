"""Zero-shot classification against brute-force loops written from the definitions."""

import math

import numpy as np
import pytest

from keras_mm.evaluation import zero_shot as zs
from tests.keras_mm.evaluation import fakes

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "{} in the wild"]


def _unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _brute_force(image_emb, labels, prompt_vectors):
    """prompt_vectors[c][t]: list of floats. Returns (top1, top5, confusion, classifier rows)
    from loops."""
    k = len(prompt_vectors)
    rows = []
    for per_class in prompt_vectors:
        units = [_unit(list(v)) for v in per_class]
        mean = [sum(u[d] for u in units) / len(units) for d in range(len(units[0]))]
        rows.append(_unit(mean))
    top1 = top5 = 0
    confusion = np.zeros([k, k], np.int64)
    for x, y in zip(image_emb, labels):
        x = _unit(list(x))
        scores = [sum(a * b for a, b in zip(x, row)) for row in rows]
        order = sorted(range(k), key=lambda c: (-scores[c], c))
        top1 += order[0] == y
        top5 += y in order[:5]
        confusion[y, order[0]] += 1
    return top1 / len(labels), top5 / len(labels), confusion, rows


def _table(class_vectors, templates, rng, noise):
    vectors, per_class = {}, []
    for c, name in enumerate(CLASSES):
        row = []
        for t in templates:
            v = class_vectors[c] + noise * rng.normal(size=class_vectors.shape[1])
            v = v * rng.uniform(0.1, 10.0)         # prompt norms vary: each votes equally
            vectors[t.replace("{}", name)] = v
            row.append(v)
        per_class.append(row)
    return fakes.PromptTable(vectors), per_class


def test_top1_top5_and_confusion_match_brute_force():
    rng = np.random.default_rng(0)
    class_vectors = rng.normal(size=(len(CLASSES), 12))
    table, per_class = _table(class_vectors, TEMPLATES, rng, noise=0.5)
    classifier = zs.build_zero_shot_classifier(table.embed_text, table, CLASSES, TEMPLATES,
                                               batch_size=4)
    assert classifier.shape == (7, 12)
    np.testing.assert_allclose(np.linalg.norm(classifier, axis=1), 1.0, rtol=1e-6)
    assert table.calls == [4, 4, 4, 4, 4, 1]          # 21 prompts, 4 at a time

    labels = rng.integers(0, len(CLASSES), size=300)
    images = class_vectors[labels] * rng.uniform(0.5, 3.0, size=(300, 1)) \
        + 1.3 * rng.normal(size=(300, 12))             # norms vary: cosine must not care
    got = zs.zero_shot_metrics(images, labels, classifier, return_confusion=True)
    top1, top5, confusion, rows = _brute_force(images, labels, per_class)
    np.testing.assert_allclose(classifier, np.array(rows), atol=1e-6)
    assert got["zero_shot_top1"] == pytest.approx(top1, abs=1e-12)
    assert got["zero_shot_top5"] == pytest.approx(top5, abs=1e-12)
    assert got["num_examples"] == 300
    np.testing.assert_array_equal(got["confusion_matrix"], confusion)
    assert 0.2 < top1 < 0.95 and top5 > top1           # a non-trivial case


def test_bad_template_is_outvoted_by_the_ensemble():
    # Orthonormal class vectors; two good templates give class c's vector, the bad one gives
    # class c+1's. Ensemble row c ~ 2 e_c + e_{c+1}: image e_c scores 2/sqrt(5) with its own
    # class and 1/sqrt(5) with class c-1, so the ensemble is always right.
    k = len(CLASSES)
    eye = np.eye(k)
    good, bad = ["a photo of a {}.", "a good {}."], ["a misleading {}."]
    vectors = {}
    for c, name in enumerate(CLASSES):
        for t in good:
            vectors[t.replace("{}", name)] = eye[c]
        vectors[bad[0].replace("{}", name)] = eye[(c + 1) % k]
    table = fakes.PromptTable(vectors)
    labels = np.arange(k).repeat(3)
    images = eye[labels]
    ensemble = zs.build_zero_shot_classifier(table.embed_text, table, CLASSES, good + bad)
    only_bad = zs.build_zero_shot_classifier(table.embed_text, table, CLASSES, bad)
    np.testing.assert_allclose(ensemble[0], (2 * eye[0] + eye[1]) / math.sqrt(5), atol=1e-6)
    assert zs.zero_shot_metrics(images, labels, ensemble)["zero_shot_top1"] == 1.0
    assert zs.zero_shot_metrics(images, labels, only_bad)["zero_shot_top1"] == 0.0


def test_fewer_than_five_classes_top5_is_one_and_ties_go_to_the_lower_index():
    classifier = np.eye(3, dtype=np.float32)
    images = np.array([[0, 0, 1], [1, 1, 0], [1, 1, 1]], np.float32)
    labels = np.array([2, 1, 2])
    # image 1 ties classes 0 and 1 -> class 0 (miss); image 2 ties all -> class 0 (miss).
    got = zs.zero_shot_metrics(images, labels, classifier, return_confusion=True)
    assert got["zero_shot_top1"] == pytest.approx(1 / 3)
    assert got["zero_shot_top5"] == 1.0
    np.testing.assert_array_equal(got["confusion_matrix"], [[0, 0, 0], [1, 0, 0], [1, 0, 1]])
    # A collapsed model (every score equal) gets the share of class 0, not 1.0.
    labels = np.array([0, 1, 2, 0, 3, 4, 5, 6, 6, 6])
    collapsed = zs.zero_shot_metrics(np.ones([10, 4]), labels, np.ones([7, 4]))
    assert collapsed["zero_shot_top1"] == pytest.approx(0.2)
    assert collapsed["zero_shot_top5"] == pytest.approx(0.6)   # classes 0..4


def test_prompts_fill_the_braces_literally_and_bad_input_is_rejected():
    assert zs.prompts(["a{b}"], ["x {} y", "{}!"]) == ["x a{b} y", "a{b}!"]
    with pytest.raises(ValueError, match="exactly one"):
        zs.prompts(["a"], ["no placeholder"])
    with pytest.raises(ValueError, match="labels must be in"):
        zs.zero_shot_metrics(np.ones([2, 3]), [0, 3], np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        zs.zero_shot_metrics(np.array([[np.nan, 0, 0]]), [0], np.eye(3))


def test_evaluate_zero_shot_on_batches_equals_metrics_on_arrays():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(23, 5)).astype(np.float32)
    labels = rng.integers(0, 4, size=23)
    classifier = rng.normal(size=(4, 5)).astype(np.float32)
    data = fakes.batches(fakes.images_with_index(23), [f"x{i}" for i in range(23)], 5,
                         label=labels)
    got = zs.evaluate_zero_shot(fakes.index_embedder(vectors), classifier, data,
                                return_confusion=True)
    want = zs.zero_shot_metrics(vectors, labels, classifier, return_confusion=True)
    assert got.keys() == want.keys()
    assert got["zero_shot_top1"] == want["zero_shot_top1"]
    np.testing.assert_array_equal(got["confusion_matrix"], want["confusion_matrix"])
    with pytest.raises(ValueError, match="label"):
        zs.evaluate_zero_shot(fakes.index_embedder(vectors), classifier,
                              fakes.batches(fakes.images_with_index(3), ["a", "b", "c"], 2))
