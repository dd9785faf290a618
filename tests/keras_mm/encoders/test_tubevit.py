import keras
import numpy as np
import pytest

from keras_mm.encoders import presets
from keras_mm.encoders.tubevit import TubeViTEncoder
from keras_mm.layers.tube_embedding import SparseTubeEmbedding
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.layers.gradients import outputs_and_gradients
from tests.keras_mm.layers.test_tube_embedding import TUBES, _hand_centres
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)
# 8 x 32 x 32 videos; tube 2 (1 x 8 x 8 every 4th frame) is the image tube: 2 frames x 4 x 4.
SMALL = dict(video_size=(8, 32, 32), tubes=TUBES, width=12, depth=1, heads=2, mlp_dim=24)


def _video(batch=2, frames=8, size=32):
    return RNG.normal(size=(batch, frames, size, size, 3)).astype("float32")


def _randomize(model, gate=None):
    """Non-trivial biases (and gate) so that every term of the forward pass shows."""
    for v in model.weights:
        if "bias" in v.path:
            v.assign(RNG.normal(size=v.shape).astype("float32") * 0.1)
    if gate is not None:
        model.position_gate.assign(gate)


def _numpy_tubevit(model, video):
    """The whole forward pass from the formulas (float64): tube convolutions (loops), position
    embeddings at the hand-computed centres, transformer, pooling, head."""
    x = np.concatenate([ref.tube_conv(video.astype(np.float64), ref.w(k), ref.w(b), s, o)
                        for (_, s, o), k, b in zip(TUBES, model.tube_embedding.kernels,
                                                   model.tube_embedding.biases)], axis=1)
    fixed = ref.sincos3d(_hand_centres(), model.width)
    if model.image_position_embedding:
        learned = ref.w(model.position_embedding.embeddings).reshape(16, -1)   # 4 x 4 grid
        x[:, 16:32] += learned                                  # image tube, frame 0
        x[:, 32:48] += learned                                  # image tube, frame 4
        x = x + np.tanh(ref.w(model.position_gate)) * fixed
    else:
        x = x + fixed
    tokens = ref.encoder(model.encoder, x)
    pooled = tokens.mean(1) if model.pool == "gap" else ref.map_head(model.map_head, tokens)
    if model.head is not None:
        pooled = ref.dense(model.head.projection, pooled)
    return pooled, tokens


@pytest.mark.parametrize("pool,mammut,head", [("gap", False, None), ("map", True, 8)])
def test_forward_matches_numpy(pool, mammut, head):
    model = TubeViTEncoder(pool=pool, image_position_embedding=mammut, output_dim=head, **SMALL)
    video = _video()
    model(video)
    _randomize(model, gate=0.7 if mammut else None)
    emb, tokens = model(video, return_tokens=True)
    assert emb.shape == (2, head or 12) and tokens.shape == (2, 48, 12)
    assert keras.backend.standardize_dtype(emb.dtype) == "float32"
    expected_emb, expected_tokens = _numpy_tubevit(model, video)
    np.testing.assert_allclose(np.asarray(tokens), expected_tokens, atol=1e-4)
    np.testing.assert_allclose(np.asarray(emb), expected_emb, atol=1e-4)


def test_gate_at_zero_hides_the_fixed_embeddings_and_gets_gradients():
    """MaMMUT variant: with the gate at its initial 0 the fixed embeddings (here: two different
    temperatures) change nothing; with a non-zero gate they do; the gate gets a gradient."""
    a = TubeViTEncoder(image_position_embedding=True, **SMALL)
    b = TubeViTEncoder(image_position_embedding=True, temperature=7.0, **SMALL)
    video = _video()
    a(video), b(video)
    assert float(a.position_gate.numpy()) == 0.0
    b.set_weights(a.get_weights())
    np.testing.assert_allclose(np.asarray(b(video)), np.asarray(a(video)), atol=1e-6, rtol=0)
    _, grads = outputs_and_gradients(a, video, training=True)
    index = 1 + [v.path for v in a.trainable_variables].index(a.position_gate.path)
    assert np.ndim(grads[index]) == 0 and abs(float(grads[index])) > 1e-6
    a.position_gate.assign(0.5)
    b.position_gate.assign(0.5)
    assert np.abs(np.asarray(b(video)) - np.asarray(a(video))).max() > 1e-3
    # position_gate_init starts the gate there: the same model as a gate assigned afterwards
    c = TubeViTEncoder(image_position_embedding=True, position_gate_init=0.5, **SMALL)
    c(video)
    assert float(c.position_gate.numpy()) == 0.5 and c.get_config()["position_gate_init"] == 0.5
    c.set_weights(a.get_weights())
    np.testing.assert_allclose(np.asarray(c(video)), np.asarray(a(video)), atol=1e-6, rtol=0)


def test_output_shapes_other_sizes_and_images():
    for pool in ("gap", "map"):
        model = TubeViTEncoder(pool=pool, output_dim=8, **SMALL)
        emb, tokens = model(_video(), return_tokens=True)
        assert emb.shape == (2, 8) and tokens.shape == (2, 48, 12)
    mammut = TubeViTEncoder(image_position_embedding=True, **SMALL)
    assert mammut.image_tube == 2 and mammut.position_embedding.grid_size == (4, 4)
    # 4 x 48 x 48: 1 x 3 x 3 + 0 + 1 x 6 x 6 tokens; the learned 4 x 4 table is resized to 6 x 6.
    emb, tokens = mammut(_video(frames=4, size=48), return_tokens=True)
    assert emb.shape == (2, 12) and tokens.shape == (2, 9 + 36, 12)
    # An image [b, H, W, C] is a one-frame video: only the 4 x 4 image patches.
    emb, tokens = mammut(RNG.normal(size=(2, 32, 32, 3)).astype("float32"), return_tokens=True)
    assert emb.shape == (2, 12) and tokens.shape == (2, 16, 12)


@pytest.mark.parametrize("mammut", [False, True])
def test_round_trip(mammut):
    model = TubeViTEncoder(pool="map", output_dim=8, head_hidden_dim=10, qk_norm=True,
                           dropout=0.1, drop_path=0.1, image_position_embedding=mammut, **SMALL)
    model(_video())
    if mammut:
        model.position_gate.assign(0.3)
    assert_serialization_round_trip(model, _video())


def test_runs_compiled_with_jit():
    model = TubeViTEncoder(image_position_embedding=True, **SMALL)
    video = _video(4)
    model(video)
    model.position_gate.assign(0.4)
    model.compile(jit_compile=True)
    np.testing.assert_allclose(model.predict(video, batch_size=2, verbose=0),
                               np.asarray(model(video)), atol=1e-5)


def test_mixed_precision(mixed_bfloat16):
    # No blocks: ViTEncoder's tests cover the transformer under mixed precision.
    model = TubeViTEncoder(image_position_embedding=True, output_dim=8, **dict(SMALL, depth=0))
    emb, tokens = model(_video(), return_tokens=True)
    assert keras.backend.standardize_dtype(emb.dtype) == "float32"
    assert keras.backend.standardize_dtype(tokens.dtype) == "bfloat16"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert np.isfinite(np.asarray(emb)).all()


def test_presets():
    assert presets.names("tubevit") == ["b16", "l16", "tiny"]
    b16 = presets.tubevit_config("b16")
    assert b16["video_size"] == [32, 224, 224]
    assert (b16["width"], b16["depth"], b16["heads"], b16["mlp_dim"]) == (768, 12, 12, 3072)
    assert b16["tubes"] == [[[8, 8, 8], [16, 32, 32], [0, 0, 0]],
                            [[16, 4, 4], [6, 32, 32], [4, 8, 8]],
                            [[4, 12, 12], [16, 32, 32], [0, 16, 16]],
                            [[1, 16, 16], [32, 16, 16], [0, 0, 0]]]
    tiny = presets.tubevit_config("tiny", image_position_embedding=True)
    assert tiny["image_position_embedding"] and tiny["video_size"] == [16, 64, 64]
    assert (tiny["width"], tiny["depth"], tiny["heads"], tiny["mlp_dim"]) == (192, 4, 3, 768)
    tiny["tubes"][0][0][0] = 99
    assert presets.tubevit_config("tiny")["tubes"][0][0] == [4, 8, 8]        # a fresh copy
    # Tokens: 2*4*4 + 3*4*4 + 2*4*4 + 1*8*8 = 176 (tiny); 98 + 147 + 98 + 196 = 539 (b16).
    tiny_tubes = presets.tubevit_config("tiny")["tubes"]
    counts = SparseTubeEmbedding(192, tubes=tiny_tubes).token_counts((16, 64, 64))
    assert counts == [32, 48, 32, 64]
    assert sum(SparseTubeEmbedding(768, tubes=b16["tubes"]).token_counts((32, 224, 224))) == 539
    model = TubeViTEncoder(**presets.tubevit_config("tiny", image_position_embedding=True))
    assert model.image_tube == 3 and model.position_embedding.grid_size == (8, 8)
    assert TubeViTEncoder(**presets.tubevit_config("b16")).get_config()["tubes"] == b16["tubes"]
    with pytest.raises(ValueError, match="valid names"):
        presets.tubevit_config("h14")


def test_bad_options():
    with pytest.raises(ValueError, match="pool"):
        TubeViTEncoder(pool="cls", **SMALL)
    with pytest.raises(ValueError, match="needs image_position_embedding"):
        TubeViTEncoder(image_tube=2, **SMALL)
    with pytest.raises(ValueError, match="position_gate_init needs image_position_embedding"):
        TubeViTEncoder(position_gate_init=1.0, **SMALL)
    with pytest.raises(ValueError, match="temporal kernel 1"):
        TubeViTEncoder(image_position_embedding=True, **dict(SMALL, tubes=TUBES[:2]))
    with pytest.raises(ValueError, match="not a tube index"):
        TubeViTEncoder(image_position_embedding=True, image_tube=3, **SMALL)
    with pytest.raises(ValueError, match=r"\(T, H, W\)"):
        TubeViTEncoder(**dict(SMALL, video_size=(32, 32)))
