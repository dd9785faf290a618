import numpy as np
import pytest

from keras_mm.layers.transformer_encoder import TransformerEncoder
from tests.keras_mm.layers import numpy_reference as ref
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)


def test_stack_with_final_norm_matches_numpy():
    x = RNG.normal(size=(2, 5, 8)).astype("float32")
    enc = TransformerEncoder(3, 2, 16)
    enc(x)
    for v in enc.weights:
        if "beta" in v.path or "bias" in v.path:
            v.assign(RNG.normal(size=v.shape).astype("float32") * 0.1)
    keep = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_allclose(np.asarray(enc(x, attention_mask=keep, use_causal_mask=True)),
                               ref.encoder(enc, x.astype(np.float64), keep, causal=True),
                               atol=5e-5)
    no_norm = TransformerEncoder(1, 2, 16, final_norm=False)
    assert no_norm.norm is None
    np.testing.assert_allclose(np.asarray(no_norm(x)), ref.encoder(no_norm, x.astype(np.float64)),
                               atol=5e-5)


def test_drop_path_rises_linearly():
    enc = TransformerEncoder(5, 2, 8, drop_path=0.2)
    np.testing.assert_allclose([b.drop_path for b in enc.blocks], [0, 0.05, 0.1, 0.15, 0.2])


def test_round_trip():
    enc = TransformerEncoder(2, 2, 16, dropout=0.1, drop_path=0.1, qk_norm=True, remat=True,
                             attention_impl="dot_product")
    assert_serialization_round_trip(enc, RNG.normal(size=(2, 4, 8)).astype("float32"),
                                    {"attention_mask": np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool),
                                     "use_causal_mask": True})
