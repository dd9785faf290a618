import itertools

import keras
import numpy as np
import pytest

from keras_mm.layers.tube_embedding import (
    PAPER_TUBES, SparseTubeEmbedding, inflate_patch_kernel, sincos3d)
from tests.keras_mm.layers import gradients
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)

# Three tubes on an 8 x 32 x 32 video: a 3-D tube; a temporally long, spatially small tube with an
# offset (overlapping the first); 2-D 8 x 8 patches every 4th frame.
TUBES = [((2, 8, 8), (4, 16, 16), (0, 0, 0)),
         ((4, 4, 4), (3, 16, 16), (1, 4, 4)),
         ((1, 8, 8), (4, 8, 8), (0, 0, 0))]


def _hand_centres():
    """Token centres of TUBES on 8 x 32 x 32, worked out by hand: along an axis position i of a
    tube (kernel k, stride s, offset o) covers o + i*s .. o + i*s + k - 1, its centre is the
    middle of that range, and positions run while o + i*s + k <= length.

    tube 0: t in {0..1, 4..5} -> 0.5, 4.5; y, x in {0..7, 16..23} -> 3.5, 19.5      (2*2*2 = 8)
    tube 1: t in {1..4, 4..7} -> 2.5, 5.5; y, x in {4..7, 20..23} -> 5.5, 21.5      (2*2*2 = 8)
    tube 2: t in {0, 4};              y, x in {0..7, 8..15, ...} -> 3.5, 11.5, 19.5, 27.5 (32)
    """
    grids = [([0.5, 4.5], [3.5, 19.5], [3.5, 19.5]),
             ([2.5, 5.5], [5.5, 21.5], [5.5, 21.5]),
             ([0.0, 4.0], [3.5, 11.5, 19.5, 27.5], [3.5, 11.5, 19.5, 27.5])]
    return np.array([c for t, y, x in grids for c in itertools.product(t, y, x)])


def _video(batch=2, frames=8, size=32):
    return RNG.normal(size=(batch, frames, size, size, 3)).astype("float32")


def _tube_layer(video, **kwargs):
    """A built layer with random kernels (fan-in scaled) and biases, assigned from NumPy: zeros
    as the initializer spares JAX one random-op compilation per kernel shape."""
    layer = SparseTubeEmbedding(12, tubes=TUBES, kernel_initializer="zeros", **kwargs)
    layer(video)
    for kernel, bias in zip(layer.kernels, layer.biases):
        fan_in = np.prod(kernel.shape[:4])
        kernel.assign(RNG.normal(size=kernel.shape).astype("float32") / np.sqrt(fan_in))
        bias.assign(RNG.normal(size=bias.shape).astype("float32"))
    return layer


@pytest.mark.parametrize("impl", ["einsum", "conv"])
def test_each_tube_equals_a_numpy_strided_conv_loop(impl):
    video = _video()
    layer = _tube_layer(video, position_embedding=False, impl=impl)
    out = np.asarray(layer(video))
    assert out.shape == (2, 8 + 8 + 32, 12)
    start = 0
    for (_, stride, offset), kernel, bias in zip(TUBES, layer.kernels, layer.biases):
        expected = ref.tube_conv(video.astype(np.float64), ref.w(kernel), ref.w(bias), stride,
                                 offset)
        n = expected.shape[1]
        np.testing.assert_allclose(out[:, start:start + n], expected, atol=1e-5, rtol=0)
        start += n
    assert start == out.shape[1]


def test_einsum_and_conv_agree_on_the_paper_tubes_and_in_gradients():
    """PAPER_TUBES on 32 x 64 x 64 take every branch of the windowing: overlapping windows
    (tube 2 in time: kernel 16, stride 6), a last stride past the end (tube 2 in space: windows
    at 4 and 36, the next stride ends at 68), strides above and equal to the kernel; the
    kernels' gradients agree too (the train step's path). (64 px rather than the paper's 224:
    the same branches at 1/12 of the work.)"""
    video = RNG.uniform(-1, 1, (1, 32, 64, 64, 3)).astype("float32")
    assert SparseTubeEmbedding(6).token_counts(video.shape) == [8, 12, 8, 16]
    einsum = SparseTubeEmbedding(6, kernel_initializer="glorot_uniform")
    conv = SparseTubeEmbedding(6, impl="conv")
    einsum(video), conv(video)
    conv.set_weights(einsum.get_weights())
    np.testing.assert_allclose(np.asarray(einsum(video)), np.asarray(conv(video)), atol=1e-5)
    (_, grads_einsum), (_, grads_conv) = (gradients.outputs_and_gradients(layer, video)
                                          for layer in (einsum, conv))
    assert len(grads_einsum) == 1 + 8                     # the video, 4 kernels, 4 biases
    for a, b in zip(grads_einsum, grads_conv):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3 * np.abs(b).max())
    with pytest.raises(ValueError, match="impl must be one of"):
        SparseTubeEmbedding(6, impl="fft")


def test_token_counts_and_centres_by_hand():
    layer = SparseTubeEmbedding(12, tubes=TUBES)
    shape = (None, 8, 32, 32, 3)
    assert layer.tube_grids(shape) == [(2, 2, 2), (2, 2, 2), (2, 4, 4)]
    assert layer.token_counts(shape) == [8, 8, 32]
    assert layer.token_counts((8, 32, 32)) == [8, 8, 32]
    assert layer.token_slices(shape) == [(0, 8), (8, 16), (16, 48)]
    np.testing.assert_array_equal(layer.tube_centres(shape), _hand_centres())
    # One frame: only the 2-D tube fits (an image).
    assert layer.token_counts((None, 1, 32, 32, 3)) == [0, 0, 16]
    # The paper's tubes on 32 x 224 x 224: (32-8)//16+1=2 x (224-8)//32+1=7 x 7 = 98;
    # (28-16)//6+1=3 x (216-4)//32+1=7 x 7 = 147; 2 x (208-12)//32+1=7 x 7 = 98; 1 x 14 x 14.
    paper = SparseTubeEmbedding(12)
    assert paper.tubes == PAPER_TUBES
    assert paper.token_counts((None, 32, 224, 224, 3)) == [98, 147, 98, 196]
    assert paper.token_counts((None, 16, 224, 224, 3)) == [49, 0, 49, 196]
    centres = paper.tube_centres((32, 224, 224))
    assert centres.shape == (539, 3)
    np.testing.assert_array_equal(centres[98], [4 + 7.5, 8 + 1.5, 8 + 1.5])  # tube 2's first
    np.testing.assert_array_equal(centres[-1], [0.0, 13 * 16 + 7.5, 13 * 16 + 7.5])


def test_one_frame_video_gives_only_the_image_patches():
    video = _video(frames=1)
    layer = _tube_layer(video, position_embedding=False)
    out = np.asarray(layer(video))
    expected = ref.tube_conv(video.astype(np.float64), ref.w(layer.kernels[2]),
                             ref.w(layer.biases[2]), (4, 8, 8), (0, 0, 0))
    assert out.shape == (2, 16, 12)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    assert layer.compute_output_shape((2, 1, 32, 32, 3)) == (2, 16, 12)
    with pytest.raises(ValueError, match="no tube fits"):
        layer(_video(frames=1, size=4))


def test_sincos3d_matches_the_formula():
    centres = np.array([[0.0, 0.0, 0.0], [0.5, 3.5, 19.5], [31.0, 223.0, 7.25]])
    np.testing.assert_allclose(sincos3d(centres, 12), ref.sincos3d(centres, 12), atol=1e-6)
    np.testing.assert_allclose(sincos3d(centres, 48, temperature=100.0),
                               ref.sincos3d(centres, 48, 100.0), atol=1e-6)
    # At the origin every sine is 0 and every cosine 1: [sin t, cos t, sin y, cos y, sin x, cos x].
    np.testing.assert_array_equal(sincos3d([[0, 0, 0]], 12)[0], [0, 0, 1, 1] * 3)
    # Only the t coordinate moves the first two blocks; frequencies 1 and 1 / temperature.
    np.testing.assert_allclose(sincos3d([[2.0, 0, 0]], 12)[0, :4],
                               [np.sin(2.0), np.sin(2e-4), np.cos(2.0), np.cos(2e-4)], atol=1e-7)
    # 16 = 6 * 2 + 4: the same k = 2 blocks, then 4 zero channels.
    padded = sincos3d(centres, 16)
    np.testing.assert_allclose(padded, ref.sincos3d(centres, 16), atol=1e-6)
    np.testing.assert_allclose(padded[:, :12], sincos3d(centres, 12), atol=0)
    assert not padded[:, 12:].any()
    with pytest.raises(ValueError, match="width >= 6"):
        sincos3d(centres, 5)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        sincos3d([[1.0, 2.0]], 12)


def test_layer_adds_sincos3d_at_the_tube_centres():
    video = _video(1)
    plain = _tube_layer(video, position_embedding=False)
    with_pos = _tube_layer(video, temperature=50.0)
    with_pos.set_weights(plain.get_weights())
    added = np.asarray(with_pos(video))[0] - np.asarray(plain(video))[0]
    np.testing.assert_allclose(added, ref.sincos3d(_hand_centres(), 12, 50.0), atol=1e-5)
    assert len(with_pos.weights) == 2 * len(TUBES)                 # nothing else is trained


@pytest.mark.parametrize("frames", [1, 4])
def test_inflated_tube_on_a_static_video_equals_the_patch_embedding(frames):
    """A 1x16x16 / 4x16x16 tube inflated from a 16 x 16 patch kernel, on a video repeating one
    frame, gives at every temporal position the ViT patch tokens of the frame."""
    frame = RNG.normal(size=(2, 32, 32, 3)).astype("float32")
    video = np.repeat(frame[:, None], 8, axis=1)                     # [2, 8, 32, 32, 3]
    kernel_2d = RNG.normal(size=(16, 16, 3, 12)).astype("float32") / 16
    bias = RNG.normal(size=(12,)).astype("float32")
    layer = SparseTubeEmbedding(12, tubes=[((frames, 16, 16), (frames, 16, 16), (0, 0, 0))],
                                position_embedding=False, kernel_initializer="zeros")
    layer(video)
    layer.initialize_from_patch_embedding(kernel_2d, bias)
    out = np.asarray(layer(video)).reshape(2, 8 // frames, 4, 12)    # [b, n_t, 2 * 2, d]
    patches = ref.patchify(frame.astype(np.float64), 16) @ kernel_2d.reshape(-1, 12) + bias
    for t in range(8 // frames):
        np.testing.assert_allclose(out[:, t], patches, atol=1e-5, rtol=0)


def test_inflation_resizes_bilinearly_repeats_and_divides():
    kernel_2d = RNG.normal(size=(16, 16, 3, 6)).astype("float32")
    layer = SparseTubeEmbedding(6, position_embedding=False,         # the paper's tubes
                                kernel_initializer="zeros")
    layer(_video(1, frames=8, size=32))
    layer.initialize_from_patch_embedding(keras.Variable(kernel_2d), np.ones(6, "float32"))
    image = kernel_2d.reshape(1, 16, 16, 18)                         # channels = C * D
    for (kernel, _, _), variable, bias in zip(layer.tubes, layer.kernels, layer.biases):
        t, h, w = kernel
        resized = ref.bilinear_resize_tf(image, (h, w)).reshape(h, w, 3, 6)
        got = ref.w(variable)
        assert got.shape == (t, h, w, 3, 6)
        for f in range(t):
            np.testing.assert_allclose(got[f], resized / t, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(ref.w(bias), np.ones(6))
    with pytest.raises(ValueError, match="resize"):
        inflate_patch_kernel(kernel_2d, (2, 8, 8), resize="nearest")
    with pytest.raises(ValueError, match="does not match"):
        layer.initialize_from_patch_embedding(kernel_2d[:, :, :2])


def test_pi_inflation_keeps_the_token_of_an_upsampled_patch():
    """resize="pi" (FlexiViT): a static video of a patch bilinearly upsampled 8 -> 12 px through
    the inflated 2 x 12 x 12 tube gives the 8 x 8 patch's token."""
    patch = RNG.normal(size=(2, 8, 8, 3)).astype("float32")
    kernel_2d = RNG.normal(size=(8, 8, 3, 6)).astype("float32") / 8
    upsampled = ref.bilinear_resize_tf(patch, (12, 12)).astype("float32")
    video = np.repeat(upsampled[:, None], 2, axis=1)                 # [2, 2, 12, 12, 3]
    tube = SparseTubeEmbedding(6, tubes=[((2, 12, 12), (2, 12, 12), (0, 0, 0))],
                               position_embedding=False, kernel_initializer="zeros")
    tube(video)
    tube.initialize_from_patch_embedding(kernel_2d, resize="pi")
    np.testing.assert_allclose(ref.w(tube.kernels[0])[0],
                               ref.pi_resize_kernel_tf(kernel_2d, 12) / 2, atol=1e-5)
    expected = np.einsum("bhwc,hwcd->bd", patch.astype(np.float64), kernel_2d)
    np.testing.assert_allclose(np.asarray(tube(video))[:, 0], expected, atol=1e-4, rtol=0)


def test_round_trip():
    tubes = [dict(kernel=(2, 8, 8), stride=(4, 16, 16)),
             dict(kernel=(4, 4, 4), stride=(3, 16, 16), offset=(1, 4, 4)),
             ((1, 8, 8), (4, 8, 8))]
    layer = SparseTubeEmbedding(12, tubes=tubes, temperature=100.0, kernel_initializer="zeros")
    assert layer.tubes == tuple(tuple(map(tuple, spec)) for spec in TUBES)
    assert layer.get_config()["tubes"][1] == [[4, 4, 4], [3, 16, 16], [1, 4, 4]]
    assert_serialization_round_trip(layer, _video())


def test_bad_tubes_and_inputs():
    with pytest.raises(ValueError, match=r"\(t, h, w\)"):
        SparseTubeEmbedding(12, tubes=[((8, 8), (16, 16, 16), (0, 0, 0))])
    with pytest.raises(ValueError, match=">= 1"):
        SparseTubeEmbedding(12, tubes=[((8, 8, 8), (0, 16, 16), (0, 0, 0))])
    with pytest.raises(ValueError, match="offset >= 0"):
        SparseTubeEmbedding(12, tubes=[((8, 8, 8), (8, 16, 16), (0, -1, 0))])
    with pytest.raises(ValueError, match="at least one"):
        SparseTubeEmbedding(12, tubes=[])
    with pytest.raises(ValueError, match="width >= 6"):
        SparseTubeEmbedding(4, tubes=TUBES)
    layer = SparseTubeEmbedding(12, tubes=TUBES, kernel_initializer="zeros")
    with pytest.raises(ValueError, match="static video shape"):
        layer.token_counts((None, None, 32, 32, 3))
    with pytest.raises(ValueError, match="build the layer"):
        layer.initialize_from_patch_embedding(np.zeros((8, 8, 3, 12)))
    with pytest.raises(ValueError, match=r"\[batch, T, H, W, C\]"):
        layer(np.zeros((2, 32, 32, 3), "float32"))
