"""CLIP softmax and SigLIP sigmoid losses against committed golden values (golden/make_golden.py, a NumPy
computation from the papers' formulas) and keras-hub's SigLIP loss; gradients, shares, mixed precision."""

import importlib.util
import json
import math
import pathlib

import keras
import numpy as np
import pytest

from keras_mm.losses import (
    chunked_sigmoid_loss,
    pair_accuracy,
    pair_hits,
    sigmoid_block_loss,
    sigmoid_logits,
    sigmoid_loss,
    softmax_contrastive_loss,
)
from tests.keras_mm.losses.gradients import value_and_grads

pytestmark = pytest.mark.both_backends

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
GOLDEN = json.loads((GOLDEN_DIR / "contrastive.json").read_text())
IMAGE = np.asarray(GOLDEN["image"], np.float32)  # [8, 16], L2-normalised
TEXT = np.asarray(GOLDEN["text"], np.float32)
TOL = dict(rtol=1e-5, atol=1e-5)
SIGMOID_CASES = pytest.mark.parametrize(
    "case", GOLDEN["sigmoid"], ids=lambda c: f"t'={c['log_temperature']:.2f},b={c['bias']}")
SOFTMAX_CASES = pytest.mark.parametrize(
    "case", GOLDEN["softmax"], ids=lambda c: f"log_scale={c['log_scale']:.2f}")
SPLITS = pytest.mark.parametrize(
    "split_index", range(len(GOLDEN["splits"])), ids=lambda i: "+".join(map(str, GOLDEN["splits"][i])))


def row_slices(split):
    bounds = np.cumsum([0] + split)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def test_committed_golden_values_are_what_make_golden_computes():
    """The committed file and the NumPy reference script agree (nobody edited one without the other)."""
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN_DIR / "make_golden.py")
    make_golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_golden)
    fresh = json.loads(json.dumps(make_golden.build()))
    assert fresh.keys() == GOLDEN.keys()

    def compare(a, b, where):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for key in a:
                compare(a[key], b[key], f"{where}.{key}")
        elif isinstance(a, list) and a and isinstance(a[0], (dict, list)):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                compare(x, y, f"{where}[{i}]")
        else:
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=where)

    compare(fresh, GOLDEN, "golden")


# ------------------------------------------------------------------------------------------------ sigmoid
@SIGMOID_CASES
def test_sigmoid_loss_and_gradients_match_golden(case):
    value, (g_image, g_text, g_t, g_b) = value_and_grads(
        lambda x, y, t, b: sigmoid_loss(x, y, t, b), IMAGE, TEXT, case["log_temperature"], case["bias"])
    assert value.dtype == np.float32
    np.testing.assert_allclose(value, case["loss"], **TOL)
    np.testing.assert_allclose(g_image, case["grad_image"], **TOL)
    np.testing.assert_allclose(g_text, case["grad_text"], **TOL)
    np.testing.assert_allclose(g_t, case["grad_log_temperature"], **TOL)
    np.testing.assert_allclose(g_b, case["grad_bias"], **TOL)
    for grad in (g_image, g_text, g_t, g_b):
        assert np.all(np.isfinite(grad))


@SIGMOID_CASES
@SPLITS
def test_sigmoid_replica_shares_gathered_and_chunked_match_golden(case, split_index):
    """Replica r's rows against all texts (gathered) or chunk by chunk (chunked) give its golden share."""
    split = GOLDEN["splits"][split_index]
    expected = case["shares"][split_index]
    t, b = case["log_temperature"], case["bias"]
    chunks = [TEXT[rows] for rows in row_slices(split)]
    gathered, chunked = [], []
    for r, rows in enumerate(row_slices(split)):
        gathered.append(float(sigmoid_loss(IMAGE[rows], TEXT, t, b, label_offset=rows.start)))
        chunked.append(float(chunked_sigmoid_loss(IMAGE[rows], chunks, t, b, own_chunk=r)))
    np.testing.assert_allclose(gathered, expected, **TOL)
    np.testing.assert_allclose(chunked, expected, **TOL)
    np.testing.assert_allclose(sum(gathered), case["loss"], **TOL)


def test_sigmoid_block_loss_positive_flag_places_positives_on_the_diagonal():
    t, b = math.log(10.0), -10.0
    logits = np.exp(t) * IMAGE @ TEXT.T + b
    signs = 2 * np.eye(8) - 1
    expected_own = np.sum(np.logaddexp(0.0, -signs * logits))
    expected_other = np.sum(np.logaddexp(0.0, logits))
    np.testing.assert_allclose(float(sigmoid_block_loss(IMAGE, TEXT, t, b, True)), expected_own, rtol=1e-5)
    np.testing.assert_allclose(float(sigmoid_block_loss(IMAGE, TEXT, t, b, 0.0)), expected_other, rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(sigmoid_logits(IMAGE, TEXT, t, b)), logits, **TOL)


def test_sigmoid_loss_matches_keras_hub_siglip_on_one_device():
    """Peer: keras-hub's SigLIPHead (normalises, t * cos + b) + SigLIPLoss (sum over pairs / batch)."""
    from keras_hub.src.models.siglip.siglip_layers import SigLIPHead
    from keras_hub.src.models.siglip.siglip_loss import SigLIPLoss

    rng = np.random.default_rng(3)
    raw_image = rng.normal(size=(12, 10)).astype(np.float32)
    raw_text = (raw_image + rng.normal(size=(12, 10))).astype(np.float32)
    image = raw_image / np.linalg.norm(raw_image, axis=1, keepdims=True)
    text = raw_text / np.linalg.norm(raw_text, axis=1, keepdims=True)
    for t, b in [(0.0, 0.0), (math.log(10.0), -10.0), (2.3, -4.0)]:  # keras-hub init, paper init, other
        head = SigLIPHead()
        head.build(None)
        head.logit_scale.assign(t)
        head.logit_bias.assign(b)
        vision_logits, _ = head(raw_image, raw_text)  # [images, texts]
        expected = float(SigLIPLoss()(2.0 * np.eye(12, dtype=np.float32) - 1.0, vision_logits))
        np.testing.assert_allclose(float(sigmoid_loss(image, text, t, b)), expected, **TOL)


# ------------------------------------------------------------------------------------------------ softmax
@SOFTMAX_CASES
def test_softmax_loss_and_gradients_match_golden(case):
    value, (g_image, g_text, g_scale) = value_and_grads(
        lambda x, y, s: softmax_contrastive_loss(x, y, s), IMAGE, TEXT, case["log_scale"])
    assert value.dtype == np.float32
    np.testing.assert_allclose(value, case["loss"], **TOL)
    np.testing.assert_allclose(g_image, case["grad_image"], **TOL)
    np.testing.assert_allclose(g_text, case["grad_text"], **TOL)
    np.testing.assert_allclose(g_scale, case["grad_log_scale"], **TOL)  # 0 when clipped at 100
    for grad in (g_image, g_text, g_scale):
        assert np.all(np.isfinite(grad))


@SOFTMAX_CASES
@SPLITS
def test_softmax_replica_shares_match_golden(case, split_index):
    split = GOLDEN["splits"][split_index]
    shares = [float(softmax_contrastive_loss(IMAGE[rows], TEXT[rows], case["log_scale"],
                                             global_image_emb=IMAGE, global_text_emb=TEXT,
                                             label_offset=rows.start))
              for rows in row_slices(split)]
    np.testing.assert_allclose(shares, case["shares"][split_index], **TOL)
    np.testing.assert_allclose(sum(shares), case["loss"], **TOL)


def test_softmax_loss_clips_scale_at_100():
    at_clip = float(softmax_contrastive_loss(IMAGE, TEXT, math.log(100.0)))
    above = float(softmax_contrastive_loss(IMAGE, TEXT, math.log(1000.0)))
    unclipped = float(softmax_contrastive_loss(IMAGE, TEXT, math.log(1000.0), max_scale=None))
    assert abs(at_clip - above) < 1e-6 and abs(unclipped - above) > 1e-2


def test_softmax_loss_needs_both_global_arrays():
    with pytest.raises(ValueError, match="both"):
        softmax_contrastive_loss(IMAGE[:4], TEXT[:4], 1.0, global_text_emb=TEXT)


# --------------------------------------------------------------------------------------------- accuracy
def test_pair_hits_match_golden():
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(pair_hits(IMAGE, TEXT)),
                                  GOLDEN["image_to_text_hits"])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(pair_hits(TEXT, IMAGE)),
                                  GOLDEN["text_to_image_hits"])
    hits = [keras.ops.convert_to_numpy(pair_hits(IMAGE[rows], TEXT, label_offset=rows.start))
            for rows in row_slices([5, 3])]
    np.testing.assert_array_equal(np.concatenate(hits), GOLDEN["image_to_text_hits"])
    assert float(pair_accuracy(IMAGE, TEXT)) == pytest.approx(np.mean(GOLDEN["image_to_text_hits"]))


# ---------------------------------------------------------------------------------- precision, stability
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_inputs_give_float32_losses(dtype):
    image = keras.ops.cast(IMAGE, dtype)
    text = keras.ops.cast(TEXT, dtype)
    rounded_image = keras.ops.convert_to_numpy(keras.ops.cast(image, "float32"))  # exact widening
    rounded_text = keras.ops.convert_to_numpy(keras.ops.cast(text, "float32"))
    sigmoid_case, softmax_case = GOLDEN["sigmoid"][0], GOLDEN["softmax"][0]
    checks = [
        (lambda x, y: sigmoid_loss(x, y, sigmoid_case["log_temperature"], sigmoid_case["bias"]),
         sigmoid_case),
        (lambda x, y: sum(chunked_sigmoid_loss(x[rows], [y[:4], y[4:]], sigmoid_case["log_temperature"],
                                               sigmoid_case["bias"], own_chunk=r)
                          for r, rows in enumerate(row_slices([4, 4]))), sigmoid_case),
        (lambda x, y: softmax_contrastive_loss(x, y, softmax_case["log_scale"]), softmax_case),
    ]
    for fn, case in checks:
        low = fn(image, text)
        assert keras.backend.standardize_dtype(low.dtype) == "float32"
        # Computed in float32 on the (exactly widened) low-precision values.
        np.testing.assert_allclose(float(low), float(fn(rounded_image, rounded_text)), rtol=1e-6, atol=1e-6)
        if case is not None:  # and close to the float32 golden value up to the input rounding
            np.testing.assert_allclose(float(low), case["loss"], rtol=0.05)
    hits = pair_hits(image, text)
    assert keras.backend.standardize_dtype(hits.dtype) == "float32"


def test_extreme_logits_give_finite_losses_and_gradients():
    # |logits| in the thousands: log-sigmoid and logsumexp must not overflow.
    value, grads = value_and_grads(lambda x, y, t, b: sigmoid_loss(x, y, t, b), IMAGE, TEXT,
                                   math.log(5000.0), 300.0)
    assert np.isfinite(value) and value > 100.0 and all(np.all(np.isfinite(g)) for g in grads)
    value, grads = value_and_grads(lambda x, y, s: softmax_contrastive_loss(x, y, s, max_scale=None),
                                   IMAGE, TEXT, math.log(5000.0))
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


# ------------------------------------------------------------------------------ hard negatives
def _numpy_negclip(image, text, negative, valid, scale):
    """NegCLIP in NumPy: image->text softmax over every text and every valid negative,
    text->image as CLIP; the mean over the 2N rows."""
    def ce(logits):
        top = logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        return lse - np.diag(logits[:, :len(image)])
    i2t = np.concatenate([image @ text.T, np.where(valid[None], image @ negative.T, -np.inf)], 1)
    return (ce(scale * i2t).sum() + ce(scale * (text @ image.T)).sum()) / (2 * len(image))


def test_softmax_hard_negatives_match_numpy_and_shares_add_up():
    rng = np.random.default_rng(0)
    negative = rng.normal(size=TEXT.shape).astype(np.float32)
    negative /= np.linalg.norm(negative, axis=1, keepdims=True)
    valid = np.array([True, False, True, True, True, False, True, True])
    log_scale = math.log(10.0)
    expected = _numpy_negclip(IMAGE, TEXT, negative, valid, 10.0)
    got = float(softmax_contrastive_loss(IMAGE, TEXT, log_scale, global_negative_emb=negative,
                                         global_negative_valid=valid))
    np.testing.assert_allclose(got, expected, **TOL)
    assert got > float(softmax_contrastive_loss(IMAGE, TEXT, log_scale))
    # all negatives left out: the CLIP loss
    np.testing.assert_allclose(
        float(softmax_contrastive_loss(IMAGE, TEXT, log_scale, global_negative_emb=negative,
                                       global_negative_valid=np.zeros(8, bool))),
        float(softmax_contrastive_loss(IMAGE, TEXT, log_scale)), **TOL)
    shares = [float(softmax_contrastive_loss(
        IMAGE[rows], TEXT[rows], log_scale, global_image_emb=IMAGE, global_text_emb=TEXT,
        label_offset=rows.start, global_negative_emb=negative, global_negative_valid=valid))
        for rows in row_slices([3, 5])]
    np.testing.assert_allclose(sum(shares), expected, **TOL)
    value, grads = value_and_grads(
        lambda x, y, n: softmax_contrastive_loss(x, y, log_scale, global_negative_emb=n,
                                                 global_negative_valid=valid),
        IMAGE, TEXT, negative)
    for grad in grads:
        assert np.all(np.isfinite(grad))
    # a left-out negative gets no gradient; a valid one does
    assert np.abs(grads[2][1]).max() == 0.0 and np.abs(grads[2][0]).max() > 0.0
