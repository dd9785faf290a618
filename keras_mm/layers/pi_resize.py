"""PI-resize of patch-embedding kernels (FlexiViT, Beyer et al. 2023, Sec. 3.4).

A patch embedding computes ``<x, w>`` for a patch ``x`` of ``p x p`` pixels. To run it on patches
of another size ``q``, FlexiViT resizes the weights so that the token does not change when the
*patch* is resized by the same operator as the images::

    <x, w> = <B x, w_hat>   for every x          (B: bilinear resize, p x p -> q x q)
    w_hat  = argmin_w_hat  E_x[(<x, w> - <B x, w_hat>)^2]  =  pinv(B^T) w        (x ~ N(0, I))

``B`` is a ``[q*q, p*p]`` matrix (row-major pixels, one column per resized basis image). When
``q >= p`` (upsampling), ``B^T`` has full row rank, ``B^T pinv(B^T) = I`` and the equality holds
exactly for every patch. When ``q < p`` (downsampling) no ``w_hat`` can satisfy it for every ``x``;
``pinv(B^T) w`` is then the least-squares solution ``argmin ||B^T w_hat - w||`` (the best one in
expectation over white-noise patches), as in the paper.

The resize operator ``B`` is the bilinear resize the rest of the pipeline uses for images:
``tf.image.resize(..., "bilinear", antialias=False)`` = ``keras.ops.image.resize(...,
interpolation="bilinear", antialias=False)`` (half-pixel centres, edge pixels repeated; on JAX
``jax.image.resize(..., "bilinear", antialias=False)`` is the same operator). It is separable, so
``B = kron(R_h, R_w)`` with ``R`` the 1-D resize matrix, built here in NumPy (float64) by resizing
1-D basis vectors; the tests check ``B`` against ``tf.image.resize`` / ``keras.ops.image.resize`` of
every basis image. ``pinv(kron(A, C)) = kron(pinv(A), pinv(C))``, so the kernel is resized with
two small matrices, one per spatial axis.

The matrices depend only on the (static) sizes: they are NumPy constants computed once per pair
of sizes (cached) at trace time; the kernel itself is resized with ``keras.ops`` on the forward
path, so gradients reach the underlying kernel on every backend.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from keras import ops


def _pair(size):
    if isinstance(size, (int, np.integer)):
        return (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"expected an int or a pair, got {size}")
    return size


@functools.lru_cache(maxsize=None)
def _bilinear_1d(old: int, new: int) -> np.ndarray:
    """``[new, old]``: row ``i`` holds the weights of output pixel ``i`` of a 1-D bilinear resize
    ``old -> new`` (half-pixel centres, no antialiasing, coordinates clamped to the edges)."""
    if old < 1 or new < 1:
        raise ValueError(f"sizes must be positive, got {old} -> {new}")
    matrix = np.zeros((new, old))
    for i in range(new):
        src = (i + 0.5) * old / new - 0.5           # output pixel centre in input coordinates
        lo = math.floor(src)
        frac = src - lo
        for index, weight in ((lo, 1.0 - frac), (lo + 1, frac)):
            matrix[i, min(max(index, 0), old - 1)] += weight
    matrix.setflags(write=False)
    return matrix


def bilinear_resize_matrix(old_size, new_size) -> np.ndarray:
    """``B [new_h * new_w, old_h * old_w]`` (float64): ``vec(resize(x)) = B vec(x)`` for a
    single-channel ``old_h x old_w`` image ``x`` (row-major ``vec``), the bilinear resize without
    antialiasing of ``tf.image.resize`` / ``keras.ops.image.resize``. Column ``k`` is the resized
    ``k``-th basis image."""
    (oh, ow), (nh, nw) = _pair(old_size), _pair(new_size)
    return np.kron(_bilinear_1d(oh, nh), _bilinear_1d(ow, nw))


@functools.lru_cache(maxsize=None)
def _pi_1d(old: int, new: int) -> np.ndarray:
    """``pinv(R^T) [new, old]`` for the 1-D resize ``R = _bilinear_1d(old, new)``."""
    if old == new:
        return np.eye(old)
    matrix = np.linalg.pinv(_bilinear_1d(old, new).T)
    matrix.setflags(write=False)
    return matrix


def pi_resize_matrix(old_size, new_size) -> np.ndarray:
    """``P = pinv(B^T) [new_h * new_w, old_h * old_w]`` (float64), ``B =
    bilinear_resize_matrix(old_size, new_size)``: the PI-resized weights of one output channel
    are ``P @ vec(w)``. Exact (``B^T P = I``) when upsampling, least squares when downsampling."""
    (oh, ow), (nh, nw) = _pair(old_size), _pair(new_size)
    return np.kron(_pi_1d(oh, nh), _pi_1d(ow, nw))


def pi_resize_kernel(kernel, new_patch):
    """PI-resizes a patch-embedding kernel ``[p_h, p_w, C, D] -> [q_h, q_w, C, D]``.

    ``new_patch``: ``q`` (int) or ``(q_h, q_w)``; static. Equivalent to reshaping the kernel to
    ``[p_h * p_w, C * D]`` and multiplying by ``pi_resize_matrix``, computed as two small
    matmuls (one per spatial axis) in float32 and returned in the kernel's dtype.
    """
    old = (int(kernel.shape[0]), int(kernel.shape[1]))
    new = _pair(new_patch)
    if old == new:
        return kernel
    dtype = kernel.dtype
    k = ops.cast(kernel, "float32")
    rows = ops.convert_to_tensor(_pi_1d(old[0], new[0]).astype(np.float32))   # [q_h, p_h]
    cols = ops.convert_to_tensor(_pi_1d(old[1], new[1]).astype(np.float32))   # [q_w, p_w]
    k = ops.einsum("ip,pwcd->iwcd", rows, k)                                   # [q_h, p_w, C, D]
    k = ops.einsum("jw,iwcd->ijcd", cols, k)                                   # [q_h, q_w, C, D]
    return ops.cast(k, dtype)
