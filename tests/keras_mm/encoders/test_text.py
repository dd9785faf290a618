import keras
import numpy as np
import pytest

from keras_mm.encoders.text import TextEncoder
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.layers.gradients import outputs_and_gradients
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)
SMALL = dict(vocab_size=50, max_len=10, width=16, depth=2, heads=2, mlp_dim=32)
# PAD = 0, BOS = 1, EOS = 2
IDS = np.array([[1, 5, 6, 7, 2, 0, 0, 0],
                [1, 9, 2, 0, 0, 0, 0, 0],
                [1, 8, 8, 8, 8, 8, 8, 8]], "int32")      # truncated, no EOS
EOS = np.array([4, 2, 7])


def _pad(ids, length):
    return np.pad(ids, ((0, 0), (0, length - ids.shape[1])))


def _numpy_text(model, ids):
    x = ref.w(model.token_embedding.embeddings)[ids]
    x = x + ref.w(model.position_embedding.embeddings)[: ids.shape[1]]
    return ref.encoder(model.encoder, x, mask=ids != 0, causal=model.causal)


@pytest.mark.parametrize("causal,pool", [(True, "eos"), (False, "last")])
def test_forward_matches_numpy_and_pools_at_eos(causal, pool):
    model = TextEncoder(causal=causal, pool=pool, **SMALL)
    emb, tokens = model(IDS, return_tokens=True)
    expected = _numpy_text(model, IDS)
    np.testing.assert_allclose(np.asarray(tokens), expected, atol=1e-4)
    # "eos": the first EOS (or the last token of the truncated text); "last": the last
    # non-pad token - the same positions here.
    np.testing.assert_allclose(np.asarray(emb), expected[np.arange(3), EOS], atol=1e-4)
    assert keras.backend.standardize_dtype(emb.dtype) == "float32"


def test_causal_mask_blocks_the_future():
    model = TextEncoder(causal=True, pool="eos", **SMALL)
    emb, tokens = model(IDS, return_tokens=True)
    changed = IDS.copy()
    changed[0, 5:] = [11, 12, 13]                 # after the EOS of text 0
    changed[2, 6:] = [3, 4]                       # the last two tokens of text 2
    emb2, tokens2 = model(changed, return_tokens=True)
    np.testing.assert_allclose(np.asarray(tokens2)[0, :5], np.asarray(tokens)[0, :5], atol=1e-5)
    np.testing.assert_allclose(np.asarray(tokens2)[2, :6], np.asarray(tokens)[2, :6], atol=1e-5)
    np.testing.assert_allclose(np.asarray(emb2)[:2], np.asarray(emb)[:2], atol=1e-5)
    assert np.abs(np.asarray(tokens2)[2, 6:] - np.asarray(tokens)[2, 6:]).max() > 1e-3


@pytest.mark.parametrize("pool", ["last", "eos", "map", "gap", "first"])
def test_bidirectional_embedding_ignores_padding(pool):
    model = TextEncoder(causal=False, pool=pool, output_dim=8, **SMALL)
    short, long = IDS[:2, :5], _pad(IDS[:2, :5], 10)     # 0 vs 5 extra pads
    np.testing.assert_allclose(np.asarray(model(long)), np.asarray(model(short)), atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(causal=True, pool="eos", output_dim=8),
                                    dict(pool="map", head_hidden_dim=12, qk_norm=True,
                                         remat=True, dropout=0.1)])
def test_round_trip(kwargs):
    assert_serialization_round_trip(TextEncoder(**SMALL, **kwargs), IDS)


def test_remat_identical_outputs_and_gradients():
    plain = TextEncoder(causal=True, pool="eos", output_dim=8, **SMALL)
    remat = TextEncoder(causal=True, pool="eos", output_dim=8, remat=True, **SMALL)
    plain(IDS), remat(IDS)
    remat.set_weights(plain.get_weights())
    y_plain, g_plain = outputs_and_gradients(plain, IDS, training=True)
    y_remat, g_remat = outputs_and_gradients(remat, IDS, training=True)
    np.testing.assert_allclose(y_remat, y_plain, atol=1e-6, rtol=1e-6)
    assert len(g_plain) == len(g_remat) == len(plain.trainable_variables)
    for a, b in zip(g_remat, g_plain):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_mixed_precision(mixed_bfloat16):
    emb = TextEncoder(pool="map", output_dim=8, **SMALL)(IDS)
    assert keras.backend.standardize_dtype(emb.dtype) == "float32"
    assert np.isfinite(np.asarray(emb)).all()


def test_bad_pool():
    with pytest.raises(ValueError, match="pool"):
        TextEncoder(pool="mean", **SMALL)
