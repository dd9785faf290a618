"""LIMoE: the one-tower encoder (block-diagonal joint pass), the auxiliary losses it adds (checked
against NumPy formulas on its own gates), routing statistics, training, serialization."""

import math

import keras
import numpy as np
import pytest

from keras_mm.encoders.one_tower import OneTowerEncoder
from keras_mm.models.limoe import LIMoEModel, build_limoe
from tests.keras_mm.serialization import assert_serialization_round_trip


def _encoder(num_experts=4, capacity_factor=1.0, **kw):
    keras.utils.set_random_seed(3)
    values = dict(image_size=16, patch_size=4, vocab_size=60, max_len=8, width=32, depth=2,
                  heads=2, mlp_dim=64, num_experts=num_experts, moe_every=1,
                  capacity_factor=capacity_factor, group_size=32, image_pool="map",
                  output_dim=24)
    values.update(kw)
    return OneTowerEncoder(**values)


def _batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    text = rng.integers(4, 60, size=(n, 8)).astype("int32")
    for i in range(n):                       # right padding of different lengths
        text[i, 3 + i % 5:] = 0
    return {"image": rng.normal(size=(n, 16, 16, 3)).astype("float32"), "text": text}


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.both_backends
@pytest.mark.parametrize("num_experts,capacity_factor", [(0, 1.0), (4, 8.0)])
def test_joint_pass_equals_separate_passes(num_experts, capacity_factor):
    """Block-diagonal attention: one joint sequence == images alone + texts alone, for a dense
    encoder and for an MoE one whose capacity drops nothing (routing is then per token)."""
    encoder = _encoder(num_experts, capacity_factor)
    x = _batch()
    joint = encoder(images=x["image"], token_ids=x["text"])
    image_only = encoder(images=x["image"])
    text_only = encoder(token_ids=x["text"])
    np.testing.assert_allclose(_np(joint["image_emb"]), _np(image_only["image_emb"]), atol=1e-5)
    np.testing.assert_allclose(_np(joint["text_emb"]), _np(text_only["text_emb"]), atol=1e-5)
    assert len(joint["routing"]) == (2 if num_experts else 0)
    # Masks: 16 patches per image, the non-pad tokens of each text, nothing else.
    image_mask, text_mask = _np(joint["image_mask"]), _np(joint["text_mask"])
    np.testing.assert_array_equal(image_mask.sum(axis=1), 16)
    np.testing.assert_array_equal(text_mask.sum(axis=1), (x["text"] != 0).sum(axis=1))
    assert not (image_mask * text_mask).any()


def _entropy(p):
    return -(p * np.log(np.clip(p, 1e-30, None))).sum(-1)


@pytest.mark.both_backends
def test_aux_loss_and_routing_stats_match_numpy_formulas():
    model = LIMoEModel(_encoder(4, 1.0), local_entropy_weight=0.3, global_entropy_weight=0.7,
                       global_entropy_tau=3.5)
    x = _batch()
    out = model.encoder(images=x["image"], token_ids=x["text"])
    terms = model(x)
    expected, success = 0.0, {"image": [], "text": []}
    for routing in out["routing"]:
        gates = _np(routing["gates"]).astype(np.float64)                 # [B, T, E]
        kept = _np(routing["kept"])
        for m in ("image", "text"):
            mask = _np(out[f"{m}_mask"]).astype(bool)
            g = gates[mask]                                              # [tokens, E]
            local = _entropy(g).mean()
            global_term = max(0.0, math.log(3.5) - _entropy(g.mean(axis=0)))
            expected += 0.3 * local + 0.7 * global_term
            success[m].append(kept[mask].mean())
    assert float(terms["aux_loss"]) == pytest.approx(expected / 2, rel=1e-5, abs=1e-6)
    for m in ("image", "text"):
        assert float(terms[f"routing_success_{m}"]) == pytest.approx(np.mean(success[m]),
                                                                     abs=1e-6)
    # Capacity factor 1.0 on 32-token groups: some tokens are dropped, none twice counted.
    assert 0.0 < float(terms["routing_success_image"]) <= 1.0


@pytest.mark.both_backends
def test_serialization_round_trip():
    x = _batch()
    assert_serialization_round_trip(
        _encoder(), (x["image"], x["text"]))
    model = LIMoEModel(_encoder(), loss="softmax", global_entropy_tau=2.0)
    loaded = assert_serialization_round_trip(model, x)
    assert isinstance(loaded, LIMoEModel) and loaded.global_entropy_tau == 2.0


@pytest.mark.both_backends
def test_fit_trains_router_and_experts_and_logs_routing():
    model = LIMoEModel(_encoder(), local_entropy_weight=0.1, global_entropy_weight=0.1)
    x = _batch(16)
    model(x)
    before = {v.path: _np(v).copy() for v in model.trainable_variables}
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(x, batch_size=16, epochs=3, verbose=0).history
    for key in ("loss", "aux_loss", "pair_accuracy", "routing_success_image",
                "routing_success_text", "gate_entropy_image", "gate_entropy_text", "t", "b"):
        assert key in history and all(np.isfinite(history[key])), key
    assert history["loss"][-1] < history["loss"][0]
    assert history["aux_loss"][0] != 0.0      # no threshold: -H(mean gates) makes it negative
    changed = {p for p, v in before.items()
               if not np.array_equal(v, _np(next(w for w in model.trainable_variables
                                                 if w.path == p)))}
    assert any("router" in p for p in changed), sorted(changed)
    assert any("experts_kernel_in" in p for p in changed)
    assert any("image_head" in p for p in changed) and any("text_head" in p for p in changed)


def test_build_limoe_presets():
    model = build_limoe("tiny", vocab_size=120, encoder_overrides={"image_size": 32})
    encoder = model.encoder
    assert encoder.num_experts == 4 and encoder.moe_indices == (1, 3)
    assert (encoder.width, encoder.depth, encoder.mlp_dim) == (192, 4, 768)
    assert model.global_entropy_tau == 4.0 and model.local_entropy_weight == 0.05
    with pytest.raises(ValueError, match="valid names"):
        build_limoe("huge")
