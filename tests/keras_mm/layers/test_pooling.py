import numpy as np
import pytest

from keras_mm.layers import pooling

pytestmark = pytest.mark.both_backends

IDS = np.array([[1, 5, 6, 2, 0, 0],     # BOS a b EOS PAD PAD
                [1, 7, 8, 9, 4, 3],     # truncated: no EOS, no padding
                [1, 2, 0, 0, 0, 0],     # empty text
                [1, 5, 2, 2, 0, 0],     # two EOS: the first one counts
                [0, 0, 0, 0, 0, 0]])    # all padding


def test_eos_and_last_non_pad_positions():
    np.testing.assert_array_equal(np.asarray(pooling.eos_positions(IDS, eos_id=2, pad_id=0)),
                                  [3, 5, 1, 2, 0])
    np.testing.assert_array_equal(np.asarray(pooling.last_non_pad_positions(IDS, pad_id=0)),
                                  [3, 5, 1, 3, 0])


def test_gather_picks_the_positions():
    x = np.random.default_rng(0).normal(size=(5, 6, 4)).astype("float32")
    pos = np.array([3, 5, 1, 2, 0])
    np.testing.assert_allclose(np.asarray(pooling.gather_tokens(x, pos)), x[np.arange(5), pos],
                               atol=1e-6)


def test_first_last_and_masked_mean():
    x = np.random.default_rng(1).normal(size=(2, 4, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(pooling.first_token(x)), x[:, 0])
    np.testing.assert_allclose(np.asarray(pooling.last_token(x)), x[:, -1])
    np.testing.assert_allclose(np.asarray(pooling.global_average(x)), x.mean(1), atol=1e-6)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
    np.testing.assert_allclose(np.asarray(pooling.global_average(x, mask)),
                               [x[0, :2].mean(0), x[1].mean(0)], atol=1e-6)
