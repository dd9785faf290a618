"""Sparse video tubes (TubeViT, Piergiovanni et al. 2023, "Rethinking Video ViTs: Sparse Video
Tubes for Joint Image and Video Learning", Sec. 3.2-3.4).

A video ``V [T, H, W, C]`` is tokenised by a few *tubes*: 3-D convolutions with a kernel
``(t, h, w)``, a large stride ``(s_t, s_h, s_w)`` and a start offset ``(o_t, o_h, o_w)``, each
with its own weights ``[t, h, w, C, width]`` and bias. Along one axis of length ``L`` a tube
with kernel ``k``, stride ``s`` and offset ``o`` has (``valid`` convolution of the video sliced
from its offset)::

    n = (L - o - k) // s + 1     (0 when L - o < k: the tube does not fit and gives no token)

positions, and its ``i``-th position covers the frames / pixels ``o + i*s .. o + i*s + k - 1``,
so its centre is::

    c_i = o + i * s + (k - 1) / 2     (frame / pixel indices, pixel 0 at coordinate 0)

The tokens of every tube, each tube's ``n_t x n_h x n_w`` grid in row-major (t, y, x) order,
are concatenated along the token axis in the order of the tube list. The token counts depend
only on the (static) video shape.

The paper's main configuration (Sec. 4.1, order (t, h, w)) is ``PAPER_TUBES``:

====  ===========  ============  ============
tube  kernel       stride        offset
====  ===========  ============  ============
1     8 x 8 x 8    16 x 32 x 32  0
2     16 x 4 x 4   6 x 32 x 32   (4, 8, 8)
3     4 x 12 x 12  16 x 32 x 32  (0, 16, 16)
4     1 x 16 x 16  32 x 16 x 16  0  (2-D image patches at a sparse temporal stride)
====  ===========  ============  ============

For a ``32 x 224 x 224`` clip these valid convolutions give 98 + 147 + 98 + 196 = 539 tokens;
the paper writes "only 559 tokens" for the same setting, which we could not reproduce from the
listed tubes (see ``token_counts``). An image is a one-frame video: only tubes with a temporal
kernel of 1 fit, so it gets the 2-D patch tokens of a ViT (joint image / video training).

Position embeddings (Sec. 3.3) are fixed 3-D sin-cos values computed at each token's centre
``(t, y, x)``, so that overlapping, strided and offset tubes get their true spatio-temporal
location (``sincos3d``).

Implementations (``impl``): ``"einsum"`` (the default) cuts each tube's windows out of the
video with static slices and reshapes (a strided gather along an axis where windows overlap,
stride < kernel) and contracts them with the kernel in one einsum; ``"conv"`` is
``keras.ops.conv`` (a strided, valid 3-D convolution). Both give the same tokens. The einsum
form is the faster one: forward + backward of the tiny tubes on 64 clips of 8 x 32 x 32 took
15 ms against 54-59 ms for the convolution (2 CPU cores, JAX and TensorFlow, XLA); see the
README's benchmark table for the GPU.

Tube kernels can be initialised from a 2-D ViT patch embedding (``inflate_patch_kernel``, I3D's
inflation: resized spatially, repeated over the frames and divided by their number).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_mm.layers.pi_resize import bilinear_resize_matrix, pi_resize_matrix

# ((kernel t, h, w), (stride t, h, w), (offset t, h, w)), Sec. 4.1 of the paper.
PAPER_TUBES = (
    ((8, 8, 8), (16, 32, 32), (0, 0, 0)),
    ((16, 4, 4), (6, 32, 32), (4, 8, 8)),
    ((4, 12, 12), (16, 32, 32), (0, 16, 16)),
    ((1, 16, 16), (32, 16, 16), (0, 0, 0)),
)
KERNEL_RESIZES = ("bilinear", "pi")
TUBE_IMPLS = ("einsum", "conv")


def sincos3d(centres, width, temperature=10_000.0):
    """Fixed 3-D sin-cos position embeddings ``[N, width]`` (float32 NumPy) at ``centres [N, 3]``
    (``(t, y, x)`` in frames / pixels, any floats).

    The width is split into six equal blocks of ``k = width // 6`` channels, one sine and one
    cosine block per coordinate, in the order (t, y, x)::

        omega_j = 1 / temperature ** (j / (k - 1)),   j = 0 .. k - 1
        pe[n] = [sin(t_n omega), cos(t_n omega), sin(y_n omega), cos(y_n omega),
                 sin(x_n omega), cos(x_n omega)]

    the 3-D analogue of ``sincos2d`` (big_vision's frequency normalisation by ``k - 1``; the
    paper's Eq. 3 prints ``omega_j = 1 / tau^j`` with j up to d // 6, read here as the usual
    normalised exponent). The paper's Eq. 7 interleaves the six values of each frequency
    (``z[6j : 6(j+1)]``); the blocks here are a fixed permutation of the same channels. When
    ``width`` is not a multiple of 6 the last ``width % 6`` channels are zero (no position
    signal). ``width < 6`` is an error.
    """
    centres = np.asarray(centres, np.float64)
    if centres.ndim != 2 or centres.shape[1] != 3:
        raise ValueError(f"centres must be [N, 3] (t, y, x), got shape {centres.shape}")
    k = int(width) // 6
    if k < 1:
        raise ValueError(f"3-D sin-cos position embeddings need width >= 6, got {width}")
    omega = 1.0 / float(temperature) ** (np.arange(k, dtype=np.float64) / max(k - 1, 1))
    blocks = []
    for axis in range(3):                                     # t, y, x
        angles = centres[:, axis:axis + 1] * omega[None]      # [N, k]
        blocks += [np.sin(angles), np.cos(angles)]
    table = np.concatenate(blocks, axis=1)                    # [N, 6k]
    if int(width) > 6 * k:
        table = np.pad(table, ((0, 0), (0, int(width) - 6 * k)))
    return table.astype(np.float32)


def inflate_patch_kernel(kernel_2d, tube_kernel_shape, resize="bilinear"):
    """A tube kernel ``[t, h, w, C, D]`` (float32 NumPy) from a 2-D patch kernel ``[p_h, p_w, C,
    D]`` (I3D-style inflation)::

        w_tube[f] = resize(w_2d, (h, w)) / t      for every frame f = 0 .. t - 1

    so a static video (one frame repeated) gives every tube position the token of the image
    patch embedding at that frame: exactly when ``(h, w) == (p_h, p_w)``.

    ``resize`` (used only when ``(h, w) != (p_h, p_w)``): ``"bilinear"`` resizes the kernel
    like an image (``keras.ops.image.resize`` bilinear, half-pixel centres, no antialiasing;
    values are not rescaled, so a patch upsampled by ``r`` gives about ``r**2`` times its
    token); ``"pi"`` is FlexiViT's PI-resize (``keras_mm.layers.pi_resize``): a patch resized
    bilinearly to ``h x w`` gives the original token (exactly when upsampling, least squares
    when downsampling).
    """
    if resize not in KERNEL_RESIZES:
        raise ValueError(f"resize must be one of {KERNEL_RESIZES}, got {resize!r}")
    kernel = np.asarray(ops.convert_to_numpy(kernel_2d), np.float64)
    if kernel.ndim != 4:
        raise ValueError(f"kernel_2d must be [p_h, p_w, C, D], got shape {kernel.shape}")
    t, h, w = _triple(tube_kernel_shape, "tube_kernel_shape")
    ph, pw, c, d = kernel.shape
    if (h, w) != (ph, pw):
        matrix = (bilinear_resize_matrix if resize == "bilinear" else pi_resize_matrix)(
            (ph, pw), (h, w))                                  # [h * w, p_h * p_w]
        kernel = (matrix @ kernel.reshape(ph * pw, c * d)).reshape(h, w, c, d)
    return (np.repeat(kernel[None], t, axis=0) / t).astype(np.float32)


@keras.saving.register_keras_serializable(package="keras_mm")
class SparseTubeEmbedding(keras.layers.Layer):
    """``[batch, T, H, W, C]`` -> ``[batch, N_tokens, width]``: the tokens of every tube,
    concatenated in the order of ``tubes`` (see the module docstring).

    Each tube ``i`` has a kernel ``kernel_i [t, h, w, C, width]`` and a bias ``bias_i [width]``
    and computes ``keras.ops.conv`` (5-D, channels_last, ``valid``) of the video sliced from its
    offset; a tube that does not fit in the video gives no tokens (at least one must fit).

    Args:
        width: embedding width.
        tubes: a sequence of ``(kernel, stride, offset)`` triples of ``(t, h, w)`` ints, or of
            dicts with those keys (``offset`` optional, default 0); default ``PAPER_TUBES``.
        position_embedding: add ``sincos3d`` at every token's centre (``tube_centres``).
        temperature: of the sin-cos frequencies.
        impl: ``"einsum"`` (windows cut out and contracted with the kernel) or ``"conv"``
            (``keras.ops.conv``); the same tokens (see the module docstring).
        kernel_initializer, bias_initializer.
    """

    def __init__(self, width, tubes=None, position_embedding=True, temperature=10_000.0,
                 impl="einsum", kernel_initializer="lecun_normal", bias_initializer="zeros",
                 **kwargs):
        super().__init__(**kwargs)
        if impl not in TUBE_IMPLS:
            raise ValueError(f"impl must be one of {TUBE_IMPLS}, got {impl!r}")
        self.impl = impl
        self.width = int(width)
        self.tubes = normalize_tubes(PAPER_TUBES if tubes is None else tubes)
        self.position_embedding = bool(position_embedding)
        self.temperature = float(temperature)
        if self.position_embedding and self.width < 6:
            raise ValueError(f"sin-cos position embeddings need width >= 6, got {self.width}")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.kernels, self.biases = [], []
        for i, (kernel, _, _) in enumerate(self.tubes):
            self.kernels.append(self.add_weight(
                name=f"kernel_{i}", shape=kernel + (channels, self.width),
                initializer=self.kernel_initializer))
            self.biases.append(self.add_weight(
                name=f"bias_{i}", shape=(self.width,), initializer=self.bias_initializer))

    # -- static geometry ------------------------------------------------------------------------
    def tube_grids(self, video_shape):
        """``[(n_t, n_h, n_w)]`` per tube (static ints; zeros where a tube does not fit) for a
        video shape ``[batch, T, H, W, C]`` or ``(T, H, W)``."""
        size = _video_size(video_shape)
        return [tuple(_positions(length, k, s, o) for length, k, s, o
                      in zip(size, kernel, stride, offset))
                for kernel, stride, offset in self.tubes]

    def token_counts(self, video_shape):
        """Tokens per tube, ``[n_t * n_h * n_w]`` (e.g. ``[98, 147, 98, 196]`` for the paper's
        tubes on ``32 x 224 x 224``)."""
        return [nt * nh * nw for nt, nh, nw in self.tube_grids(video_shape)]

    def token_slices(self, video_shape):
        """``[(start, stop)]`` of each tube's tokens in the concatenated sequence."""
        starts = np.cumsum([0] + self.token_counts(video_shape))
        return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]

    def tube_centres(self, video_shape):
        """``[N_tokens, 3]`` float64 NumPy: the ``(t, y, x)`` centre of every token in frames /
        pixels, ``o + i * s + (k - 1) / 2`` per axis, in token order."""
        rows = []
        for (kernel, stride, offset), grid in zip(self.tubes, self.tube_grids(video_shape)):
            axes = [o + np.arange(n) * s + (k - 1) / 2.0
                    for n, k, s, o in zip(grid, kernel, stride, offset)]
            t, y, x = np.meshgrid(*axes, indexing="ij")
            rows.append(np.stack([t.ravel(), y.ravel(), x.ravel()], axis=1))
        return np.concatenate(rows, axis=0).astype(np.float64)

    def position_table(self, video_shape):
        """``sincos3d(tube_centres(video_shape), width)``: ``[N_tokens, width]`` float32."""
        return sincos3d(self.tube_centres(video_shape), self.width, self.temperature)

    # -- forward --------------------------------------------------------------------------------
    def call(self, video):
        shape = tuple(video.shape)
        if len(shape) != 5:
            raise ValueError(f"SparseTubeEmbedding takes videos [batch, T, H, W, C], got {shape}")
        grids = self.tube_grids(shape)
        if not any(nt * nh * nw for nt, nh, nw in grids):
            raise ValueError(f"no tube fits in a video of shape {shape}; tubes: {self.tubes}")
        tokens = []
        for (kernel, stride, offset), grid, w, b in zip(self.tubes, grids, self.kernels,
                                                         self.biases):
            n = grid[0] * grid[1] * grid[2]
            if n == 0:
                continue
            if self.impl == "conv":
                # Only the frames / pixels the tube covers: [o, o + (n - 1) * s + k) per axis.
                stop = [o + (g - 1) * s + k for g, k, s, o in zip(grid, kernel, stride, offset)]
                x = video[:, offset[0]:stop[0], offset[1]:stop[1], offset[2]:stop[2]]
                x = ops.conv(x, w, strides=stride, padding="valid",
                             data_format="channels_last")              # [b, n_t, n_h, n_w, d]
            else:
                x = video
                for axis in range(3):                # [b, n_t, k_t, n_h, k_h, n_w, k_w, C]
                    x = _windows(x, 1 + 2 * axis, grid[axis], kernel[axis], stride[axis],
                                 offset[axis])
                x = ops.einsum("bTtHhWwc,thwcd->bTHWd", x, w)
            tokens.append(ops.reshape(x, (-1, n, self.width)) + b)
        x = tokens[0] if len(tokens) == 1 else ops.concatenate(tokens, axis=1)
        if self.position_embedding:
            x = x + ops.cast(self.position_table(shape), x.dtype)
        return x

    def compute_output_shape(self, input_shape):
        return (input_shape[0], sum(self.token_counts(tuple(input_shape))), self.width)

    # -- initialisation from an image model -----------------------------------------------------
    def initialize_from_patch_embedding(self, kernel_2d, bias=None, resize="bilinear"):
        """Sets every tube's kernel to ``inflate_patch_kernel(kernel_2d, tube kernel, resize)``
        and, when given, every bias to ``bias [width]`` (e.g. a ViT's ``PatchEmbedding.kernel``
        / ``.bias``). The layer must be built, with the kernel's channel count."""
        if not self.built:
            raise ValueError("build the layer (call it on a video) before initialising it")
        for (kernel, _, _), variable, bias_variable in zip(self.tubes, self.kernels,
                                                           self.biases):
            inflated = inflate_patch_kernel(kernel_2d, kernel, resize)
            if inflated.shape != tuple(variable.shape):
                raise ValueError(f"inflated kernel {inflated.shape} does not match the tube "
                                 f"kernel {tuple(variable.shape)} (channels / width)")
            variable.assign(inflated)
            if bias is not None:
                bias_variable.assign(np.asarray(ops.convert_to_numpy(bias), np.float32))

    def get_config(self):
        config = super().get_config()
        config.update(
            width=self.width, tubes=[[list(k), list(s), list(o)] for k, s, o in self.tubes],
            position_embedding=self.position_embedding, temperature=self.temperature,
            impl=self.impl,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer))
        return config


def normalize_tubes(tubes):
    """``((kernel, stride, offset), ...)`` of int triples from triples / lists / dicts;
    checks kernel >= 1, stride >= 1, offset >= 0."""
    result = []
    for spec in tubes:
        if isinstance(spec, dict):
            spec = (spec["kernel"], spec["stride"], spec.get("offset", (0, 0, 0)))
        spec = tuple(spec)
        if len(spec) == 2:
            spec = spec + ((0, 0, 0),)
        if len(spec) != 3:
            raise ValueError(f"a tube is (kernel, stride, offset), got {spec}")
        kernel, stride, offset = (_triple(v, name) for v, name
                                  in zip(spec, ("kernel", "stride", "offset")))
        if min(kernel) < 1 or min(stride) < 1 or min(offset) < 0:
            raise ValueError(f"tube kernel and stride must be >= 1 and offset >= 0, got "
                             f"kernel={kernel} stride={stride} offset={offset}")
        result.append((kernel, stride, offset))
    if not result:
        raise ValueError("at least one tube is needed")
    return tuple(result)


def _triple(value, name):
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must be (t, h, w), got {value}")
    return value


def _video_size(video_shape):
    shape = tuple(video_shape)
    if len(shape) == 5:
        shape = shape[1:4]
    if len(shape) != 3 or any(s is None for s in shape):
        raise ValueError(f"need a static video shape [batch, T, H, W, C] or (T, H, W), "
                         f"got {tuple(video_shape)}")
    return tuple(int(s) for s in shape)


def _windows(x, axis, n, kernel, stride, offset):
    """``x`` with its (static) ``axis`` replaced by ``[n, kernel]``: window ``i`` holds the
    elements ``offset + i * stride + j``, ``j < kernel``. Non-overlapping windows (stride >=
    kernel) are a slice, a zero pad past the end when the last stride runs over it (the pad is
    never inside a window), a reshape and a slice; overlapping ones a gather."""
    shape = list(x.shape)

    def split(size):
        return [-1] + shape[1:axis] + [n, size] + shape[axis + 1:]

    if stride < kernel:
        index = offset + stride * np.arange(n)[:, None] + np.arange(kernel)[None, :]
        return ops.reshape(ops.take(x, index.reshape(-1).astype("int32"), axis=axis),
                           split(kernel))
    end = offset + n * stride
    cut = [slice(None)] * len(shape)
    cut[axis] = slice(offset, min(end, shape[axis]))
    x = x[tuple(cut)]
    if end > shape[axis]:
        pad = [(0, 0)] * len(shape)
        pad[axis] = (0, end - shape[axis])
        x = ops.pad(x, pad)
    x = ops.reshape(x, split(stride))
    if stride > kernel:
        cut = [slice(None)] * (len(shape) + 1)
        cut[axis + 1] = slice(0, kernel)
        x = x[tuple(cut)]
    return x


def _positions(length, kernel, stride, offset):
    """Output positions of a valid strided convolution along one axis from ``offset``."""
    return 0 if length - offset < kernel else (length - offset - kernel) // stride + 1
