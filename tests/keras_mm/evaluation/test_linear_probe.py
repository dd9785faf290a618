"""Linear probe and closed-form few-shot on constructed data with known answers."""

import numpy as np
import pytest

from keras_mm.evaluation import linear_probe as lp
from tests.keras_mm.evaluation import fakes


def _clusters(rng, n_per_class, num_classes=3, dim=10, spread=0.3):
    centers = 4.0 * np.eye(num_classes, dim)
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centers[y] + spread * rng.normal(size=(y.size, dim))
    perm = rng.permutation(y.size)
    return x[perm], y[perm]


def test_linear_probe_separates_linearly_separable_data():
    rng = np.random.default_rng(0)
    train, val, test = (_clusters(rng, n) for n in (50, 20, 20))
    got = lp.linear_probe(*train, *val, *test)
    assert got["linear_probe_top1"] == 1.0
    assert got["linear_probe_val_top1"] == 1.0
    assert got["linear_probe_c"] in lp.DEFAULT_C_VALUES
    assert got["num_train"] == 150 and got["num_test"] == 60
    refit = lp.linear_probe(*train, *val, *test, refit_on_train_and_val=True, prefix="motion_probe")
    assert refit["motion_probe_top1"] == 1.0


def test_linear_probe_is_at_chance_on_random_labels():
    rng = np.random.default_rng(1)

    def noise(n):
        return rng.normal(size=(n, 16)), rng.integers(0, 4, size=n)

    got = lp.linear_probe(*noise(400), *noise(200), *noise(2000), c_values=(0.01, 1.0, 100.0))
    assert abs(got["linear_probe_top1"] - 0.25) < 0.05          # 5 sigma at n = 2000


def test_ridge_weights_equal_numpy_lstsq_on_the_augmented_system():
    # min ||Z W - T||^2 + l2 ||W||^2  ==  lstsq([Z; sqrt(l2) I], [T; 0]).
    rng = np.random.default_rng(2)
    for n, d in [(40, 6), (5, 12)]:                  # N >= D and N < D branches
        z = rng.normal(size=(n, d))
        t = rng.normal(size=(n, 3))
        l2s = [1e-2, 1.0, 37.0]
        got = lp.ridge_weights(z, t, l2s)
        assert got.shape == (3, d, 3)
        for w, l2 in zip(got, l2s):
            a = np.concatenate([z, np.sqrt(l2) * np.eye(d)])
            b = np.concatenate([t, np.zeros([d, 3])])
            np.testing.assert_allclose(w, np.linalg.lstsq(a, b, rcond=None)[0], rtol=1e-7,
                                       atol=1e-9)


def _reference_fewshot_accuracy(train_x, train_y, test_x, test_y, num_classes, l2):
    """big_vision's recipe written out with numpy.linalg.lstsq."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    z = np.concatenate([(train_x - mean) / std, np.full([len(train_x), 1], 100.0)], axis=1)
    t = 2.0 * (train_y[:, None] == np.arange(num_classes)[None, :]) - 1.0
    d = z.shape[1]
    w = np.linalg.lstsq(np.concatenate([z, np.sqrt(l2) * np.eye(d)]),
                        np.concatenate([t, np.zeros([d, num_classes])]), rcond=None)[0]
    zt = np.concatenate([(test_x - mean) / std, np.full([len(test_x), 1], 100.0)], axis=1)
    return float(np.mean(np.argmax(zt @ w, axis=1) == test_y))


def test_few_shot_closed_form_matches_lstsq_reference():
    rng = np.random.default_rng(3)
    # Exactly k examples per class, so the k-shot sample is the whole training set.
    for k, dim in [(2, 8), (10, 5)]:
        train_x, train_y = _clusters(rng, k, num_classes=4, dim=dim, spread=3.0)
        test_x, test_y = _clusters(rng, 50, num_classes=4, dim=dim, spread=3.0)
        for l2 in (0.5, 64.0):
            got = lp.few_shot(train_x, train_y, test_x, test_y, shots=(k,), l2_regs=(l2,))
            want = _reference_fewshot_accuracy(train_x, train_y, test_x, test_y, 4, l2)
            assert got[f"few_shot_{k}shot_top1"] == pytest.approx(want, abs=1e-12)
            assert got[f"few_shot_{k}shot_l2"] == l2
            assert 0.3 < want < 1.0                       # not a trivial case


def test_few_shot_on_separable_data_and_l2_selection():
    rng = np.random.default_rng(4)
    # No pure-noise dimensions: standardising by a 1-shot sample's std would blow them up.
    train, val, test = (_clusters(rng, n, num_classes=5, dim=5) for n in (30, 10, 20))
    got = lp.few_shot(*train, *test, shots=(1, 5), val_x=val[0], val_y=val[1])
    assert set(got) == {"few_shot_1shot_top1", "few_shot_1shot_l2", "few_shot_5shot_top1",
                        "few_shot_5shot_l2"}
    assert got["few_shot_1shot_top1"] == 1.0 and got["few_shot_5shot_top1"] == 1.0
    # Without a validation split, l2 is chosen on the training examples left out; same seed,
    # same result.
    a = lp.few_shot(*train, *test, shots=(3,), repeats=3, seed=7)
    assert a == lp.few_shot(*train, *test, shots=(3,), repeats=3, seed=7)
    assert a["few_shot_3shot_top1"] == 1.0
    with pytest.raises(ValueError, match="fewer than"):
        lp.few_shot(*train, *test, shots=(31,))


def test_dataset_drivers_pair_labels_with_their_images():
    rng = np.random.default_rng(5)
    x, y = _clusters(rng, 40, num_classes=3, dim=3)
    images = fakes.images_with_index(len(y))
    embed = fakes.index_embedder(x.astype(np.float32))
    parts = [slice(0, 60), slice(60, 90), slice(90, 120)]
    datasets = [fakes.batches(images[p], [str(i) for i in range(len(y))][p], 7, label=y[p])
                for p in parts]
    got = lp.evaluate_linear_probe(embed, *datasets)
    assert got["linear_probe_top1"] == 1.0
    few = lp.evaluate_few_shot(embed, datasets[0], datasets[2], datasets[1], shots=(2,))
    assert few["few_shot_2shot_top1"] == 1.0
