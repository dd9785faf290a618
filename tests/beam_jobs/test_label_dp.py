"""LabelDP (randomized response with prior): the mechanism's distribution and the job option."""

import glob
import json
import math
import os

import numpy as np
import pytest

from keras_mm.beam_jobs import label_as_text, label_dp
from keras_mm.pipelines import features


def _reference_distribution(y, prior, eps):
    """RR-with-prior written out from the paper, brute force over every k."""
    prior = np.asarray(prior, float) / np.sum(prior)
    order = sorted(range(len(prior)), key=lambda c: (-prior[c], c))
    best, best_k = -1.0, None
    for k in range(1, len(prior) + 1):
        score = sum(prior[c] for c in order[:k]) * math.exp(eps) / (math.exp(eps) + k - 1)
        if score > best + 1e-15:
            best, best_k = score, k
    chosen = order[:best_k]
    dist = np.zeros(len(prior))
    for c in chosen:
        if y in chosen:
            dist[c] = (math.exp(eps) if c == y else 1.0) / (math.exp(eps) + best_k - 1)
        else:
            dist[c] = 1.0 / best_k
    return dist


@pytest.mark.parametrize("eps", [0.1, 1.0, 2.0, 8.0])
def test_distribution_matches_the_paper_and_is_eps_private(eps):
    rng = np.random.default_rng(int(eps * 10))
    for _ in range(20):
        prior = rng.dirichlet(np.full(10, 0.3))
        dists = np.stack([label_dp.output_distribution(y, prior, eps) for y in range(10)])
        for y in range(10):
            np.testing.assert_allclose(dists[y], _reference_distribution(y, prior, eps),
                                       atol=1e-12)
        np.testing.assert_allclose(dists.sum(1), 1.0, atol=1e-12)
        # eps-LabelDP: for each output, P(o|y) <= e^eps P(o|y') for all y, y'.
        for o in range(10):
            col = dists[:, o]
            if col.max() > 0:
                assert col.min() > 0 and col.max() / col.min() <= math.exp(eps) * (1 + 1e-9)


def test_uniform_prior_is_classical_randomized_response():
    eps, k = 1.5, 7
    d = label_dp.output_distribution(3, np.ones(k), eps)
    expected = np.full(k, 1 / (math.exp(eps) + k - 1))
    expected[3] = math.exp(eps) / (math.exp(eps) + k - 1)
    np.testing.assert_allclose(d, expected, atol=1e-12)


def test_draws_are_deterministic_and_follow_the_distribution():
    prior = [0.5, 0.3, 0.1, 0.1]
    draws = [label_dp.randomize_label(0, 4, 1.0, f"id{i}", seed=3, prior=prior)
             for i in range(4000)]
    assert draws == [label_dp.randomize_label(0, 4, 1.0, f"id{i}", seed=3, prior=prior)
                     for i in range(4000)]
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, _reference_distribution(0, prior, 1.0), atol=0.03)
    with pytest.raises(ValueError):
        label_dp.randomize_label(5, 4, 1.0, "x", 0)


def _records(out):
    import tensorflow as tf

    for path in sorted(glob.glob(os.path.join(out, "*.tfrecord-*"))):
        split = os.path.basename(path).split(".")[0]
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            yield split, features.deserialize(raw, features.LABEL_AS_TEXT)


def test_job_releases_noisy_training_labels_only(tmp_path):
    from sklearn.datasets import load_digits

    truth = load_digits().target
    # A prior that puts half its mass on the true class and half on the next one: k* = 2.
    priors = tmp_path / "priors.jsonl"
    with open(priors, "w") as f:
        for i, y in enumerate(truth):
            p = [0.0] * 10
            p[y], p[(y + 1) % 10] = 0.5, 0.5
            f.write(json.dumps({"id": f"digits-{i:04d}", "prior": p}) + "\n")
    results = {}
    for name, extra in (("rr", []), ("prior", ["--label_dp_prior", str(priors)])):
        out = str(tmp_path / name)
        label_as_text.run(["--out", out, "--label_dp_epsilon", "1.0"] + extra)
        kept, total, moved_outside = 0, 0, 0
        train_t = open(os.path.join(out, "templates_train.txt")).read().splitlines()
        for split, r in _records(out):
            y = truth[int(r[features.ID].split("-")[1])]
            released = r[features.LABEL]
            assert r[features.LABEL_NAME] == label_as_text.DIGIT_NAMES[released]
            if split != "train":
                assert released == y  # evaluation labels stay true
                continue
            filled = {t.format(r[features.LABEL_NAME]) for t in train_t}
            assert set(r[features.TEXTS]) <= filled and len(r[features.TEXTS]) == 16
            total += 1
            kept += released == y
            moved_outside += released not in (y, (y + 1) % 10)
        results[name] = (kept / total, moved_outside)
        assert json.load(open(os.path.join(out, "label_dp.json")))["epsilon"] == 1.0
    e = math.e
    assert abs(results["rr"][0] - e / (e + 9)) < 0.05      # classical RR keeps 23%
    assert abs(results["prior"][0] - e / (e + 1)) < 0.05   # with the prior: 73%
    assert results["prior"][1] == 0                         # never outside the prior's support
