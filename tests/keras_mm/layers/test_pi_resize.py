"""PI-resize (FlexiViT, Beyer et al. 2023): the resize operator is tf.image.resize's bilinear
(checked basis image by basis image), upsampling preserves every token exactly, downsampling is
the least-squares solution. References: tf.image.resize and NumPy's pinv / lstsq."""

import keras
import numpy as np
import pytest

from keras_mm.layers.pi_resize import (bilinear_resize_matrix, pi_resize_kernel,
                                       pi_resize_matrix)
from tests.keras_mm.layers import numpy_reference as ref

RNG = np.random.default_rng(0)


def _tokens(patches, kernel):
    """``<x, w>`` for patches ``[n, p, p, c]`` and a kernel ``[p, p, c, d]`` -> ``[n, d]``."""
    return np.einsum("nijc,ijcd->nd", patches, kernel)


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


@pytest.mark.both_backends
@pytest.mark.parametrize("old,new", [(8, 16), (8, 12), (7, 11), (16, 8), (12, 8), (32, 48)])
def test_resize_matrix_is_the_pipelines_bilinear_resize(old, new):
    """Column k of B = the k-th basis image resized by tf.image.resize and by keras.ops.image.
    resize on this backend (bilinear, antialias off)."""
    expected = ref.bilinear_matrix_tf(old, new)
    np.testing.assert_allclose(bilinear_resize_matrix(old, new), expected, atol=1e-5)
    n = old * old
    basis = np.eye(n, dtype="float32").reshape(n, old, old, 1)
    resized = _np(keras.ops.image.resize(basis, (new, new), interpolation="bilinear",
                                         antialias=False))
    np.testing.assert_allclose(bilinear_resize_matrix(old, new), resized.reshape(n, -1).T,
                               atol=1e-5)


def test_rectangular_matrix():
    b = bilinear_resize_matrix((4, 6), (8, 9))
    n = 4 * 6
    basis = np.eye(n).reshape(n, 4, 6, 1)
    expected = ref.bilinear_resize_tf(basis, (8, 9)).reshape(n, -1).T
    np.testing.assert_allclose(b, expected, atol=1e-6)
    np.testing.assert_allclose(pi_resize_matrix((4, 6), (8, 9)), np.linalg.pinv(expected.T),
                               atol=1e-5)


@pytest.mark.both_backends
def test_upsampling_keeps_every_token_and_plain_resize_does_not():
    """8 -> 16: <x, w> == <resize(x), PI-resize(w)> for every patch x; a bilinear resize of the
    weights (with or without rescaling by the area ratio) is far off."""
    kernel = RNG.normal(size=(8, 8, 3, 5)) / 8
    patches = RNG.normal(size=(64, 8, 8, 3))
    upsampled = ref.bilinear_resize_tf(patches, (16, 16))
    new_kernel = _np(pi_resize_kernel(keras.ops.convert_to_tensor(kernel.astype("float32")), 16))
    assert new_kernel.shape == (16, 16, 3, 5)
    np.testing.assert_allclose(new_kernel, ref.pi_resize_kernel_tf(kernel, 16), atol=1e-5)
    expected = _tokens(patches, kernel)
    np.testing.assert_allclose(_tokens(upsampled, new_kernel), expected, atol=1e-4)

    plain = ref.bilinear_resize_tf(kernel.reshape(8, 8, 15).transpose(2, 0, 1)[..., None],
                                   (16, 16))[..., 0].transpose(1, 2, 0).reshape(16, 16, 3, 5)
    for scale in (1.0, 4.0):       # 4 = (16 / 8)^2: the area-normalised variant
        error = np.abs(_tokens(upsampled, plain / scale) - expected)
        assert error.max() > 0.5 and error.mean() > 0.1 * np.abs(expected).mean()


def _plain_resize(kernel, size):
    """A bilinear resize of the kernel's spatial dims (tf.image.resize): the naive way."""
    p, _, c, d = kernel.shape
    moved = kernel.reshape(p, p, c * d).transpose(2, 0, 1)[..., None]
    return ref.bilinear_resize_tf(moved, (size, size))[..., 0].transpose(1, 2, 0).reshape(
        size, size, c, d)


def test_downsampling_is_least_squares():
    """12 -> 8 cannot be exact; PI-resize gives argmin ||B^T w_new - w|| (NumPy's lstsq), the
    minimum of the expected squared token error over white-noise patches."""
    kernel = RNG.normal(size=(12, 12, 1, 3))
    new_kernel = _np(pi_resize_kernel(kernel.astype("float32"), 8))
    b = ref.bilinear_matrix_tf(12, 8)                               # [64, 144]
    lstsq = np.linalg.lstsq(b.T, kernel.reshape(144, 3), rcond=None)[0]
    np.testing.assert_allclose(new_kernel.reshape(64, 3), lstsq, atol=1e-4)
    residual = b.T @ new_kernel.reshape(64, 3) - kernel.reshape(144, 3)
    np.testing.assert_allclose(b @ residual, 0.0, atol=1e-3)       # normal equations
    assert np.abs(residual).max() > 0.1                             # ... and not exact

    # E_x[(<x, w> - <B x, w_new>)^2] = ||w - B^T w_new||^2 for x ~ N(0, I): PI-resize is the
    # minimum, so any other weights do worse, the plain resize of the weights too (by little
    # for white noise: most of a 12x12 noise patch is lost at 8x8 whatever the weights).
    def expected_error(w_new):
        return np.sum((b.T @ w_new.reshape(64, 3) - kernel.reshape(144, 3)) ** 2)

    best = expected_error(new_kernel)
    plain = _plain_resize(kernel, 8)
    for other in [new_kernel + 0.01 * RNG.normal(size=new_kernel.shape) for _ in range(3)] + [
            plain, plain * (12 / 8) ** 2]:
        assert best < expected_error(other)
    patches = RNG.normal(size=(20000, 12, 12, 1))                   # the formula, sampled
    sampled = np.mean((_tokens(ref.bilinear_resize_tf(patches, (8, 8)), new_kernel)
                       - _tokens(patches, kernel)) ** 2)
    np.testing.assert_allclose(sampled, best / 3, rtol=0.05)


def test_halving_is_four_times_the_bilinear_downsample():
    """For an exact factor 2 the (antialias-off) bilinear downsample averages pixel pairs,
    B B^T = I / 4 in 2-D, so pinv(B^T) = 4 B: PI-resize = 4 x the resized weights."""
    kernel = RNG.normal(size=(16, 16, 2, 3))
    np.testing.assert_allclose(_np(pi_resize_kernel(kernel.astype("float32"), 8)),
                               4.0 * _plain_resize(kernel, 8), atol=1e-4)


def test_same_size_is_identity_and_rectangular_kernels():
    kernel = RNG.normal(size=(6, 4, 2, 3)).astype("float32")
    assert pi_resize_kernel(kernel, (6, 4)) is kernel
    new = _np(pi_resize_kernel(kernel, (9, 6)))
    expected = pi_resize_matrix((6, 4), (9, 6)) @ kernel.reshape(24, 6).astype(np.float64)
    np.testing.assert_allclose(new, expected.reshape(9, 6, 2, 3), atol=1e-5)
    with pytest.raises(ValueError, match="pair"):
        pi_resize_kernel(kernel, (1, 2, 3))
