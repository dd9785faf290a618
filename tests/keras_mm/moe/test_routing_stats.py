import math

import keras
import numpy as np
import pytest

from keras_mm.moe import routing_stats as stats
from keras_mm.moe.moe_mlp import MoeMlp

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)


def _routing(k=2, batch=2, tokens=6, experts=4):
    logits = RNG.normal(size=(batch, tokens, experts))
    gates = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    indices = np.argsort(-gates, -1)[..., :k].astype("int32")
    dispatched = (RNG.random((batch, tokens, k)) > 0.3).astype("float32")
    return {"gates": gates.astype("float32"), "expert_indices": indices,
            "expert_index": indices[..., 0], "dispatched": dispatched,
            "kept": dispatched.max(-1)}


def _f(t):
    return keras.ops.convert_to_numpy(t)


@pytest.mark.parametrize("k", [1, 2])
def test_stats_match_numpy_per_modality(k):
    routing = _routing(k)
    image = np.zeros((2, 6), "float32")
    image[:, :4] = 1.0
    text = 1.0 - image
    for mask in (image, text, None):
        sel = np.ones((2, 6), bool) if mask is None else mask > 0
        load = np.zeros(4)
        load_dispatched = np.zeros(4)
        for b, t in zip(*np.nonzero(sel)):
            for r in range(k):
                expert = routing["expert_indices"][b, t, r]
                load[expert] += 1
                load_dispatched[expert] += routing["dispatched"][b, t, r]
        n = sel.sum()
        np.testing.assert_allclose(_f(stats.expert_load(routing, mask)), load / (k * n), atol=1e-6)
        np.testing.assert_allclose(_f(stats.expert_load(routing, mask, dispatched_only=True)),
                                   load_dispatched / (k * n), atol=1e-6)
        np.testing.assert_allclose(_f(stats.routing_success_rate(routing, mask)),
                                   routing["kept"][sel].mean(), atol=1e-6)
        entropy = np.mean([-sum(p * math.log(p) for p in g) for g in routing["gates"][sel]])
        np.testing.assert_allclose(_f(stats.mean_gate_entropy(routing, mask)), entropy, rtol=1e-5)
    summary = stats.routing_summary(routing, {"image": image, "text": text})
    assert sorted(summary) == sorted(f"{s}_{m}" for s in ("expert_load", "routing_success",
                                                          "gate_entropy")
                                     for m in ("image", "text"))
    empty = stats.routing_summary(routing, {"audio": np.zeros((2, 6), "float32")})
    assert all(np.all(_f(v) == 0) for v in empty.values())


def test_stats_of_a_real_layer():
    # All tokens forced to expert 0, capacity 2 per group of 8: success 2 / 8.
    layer = MoeMlp(4, 8, group_size=8, capacity_factor=1.0)
    x = RNG.normal(size=(2, 8, 4)).astype("float32")
    x[..., 0] = np.abs(x[..., 0]) + 0.1
    layer(x)
    kernel = np.zeros((4, 4), "float32")
    kernel[0, 0] = 1.0
    layer.router.kernel.assign(kernel)
    _, routing = layer(x, return_routing=True)
    np.testing.assert_allclose(_f(stats.expert_load(routing)), [1, 0, 0, 0])
    np.testing.assert_allclose(_f(stats.routing_success_rate(routing)), 0.25)
