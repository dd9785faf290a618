"""keras_mm.training.optimizer and mixed_precision: schedule, weight-decay mask, clipping, accumulation.

Reference values come from formulas written here (the schedule, Adam's update), from the variable names of
keras_mm's encoders ("kernels decay, nothing else"), and from a K-times larger batch (accumulation).
"""

import math
import pathlib

import keras
import numpy as np
import pytest

from keras_mm.training import mixed_precision
from keras_mm.training import optimizer as O
from tests.keras_mm.training.scripts.digits_training import optimizer_config as config
from tests.keras_mm.training.scripts.digits_training import schedule_formula as reference
from tests.keras_mm.training.scripts.distributed_checks import run_check

ROOT = pathlib.Path(__file__).resolve().parents[3]
TF_ONLY = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow backend")


def lr_at(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


@pytest.fixture
def float32_policy():
    yield
    keras.config.set_dtype_policy("float32")


# ---------------------------------------------------------------------------------------- schedule
@pytest.mark.both_backends
@pytest.mark.parametrize("warmup, end_lr", [(0, 0.0), (10, 0.0), (10, 1e-4), (1, 2e-4)])
def test_warmup_cosine_schedule_matches_the_formula(warmup, end_lr):
    lr, total = 1e-3, 50
    schedule = O.make_schedule(config(lr=lr, end_lr=end_lr, warmup_steps=warmup), total_steps=total)
    for step in range(0, total + 10):
        assert lr_at(schedule, step) == pytest.approx(reference(step, lr, total, warmup, end_lr),
                                                      rel=1e-5, abs=1e-10)
    assert lr_at(schedule, total + 100) == pytest.approx(end_lr, abs=1e-10)     # the floor
    if warmup:
        assert lr_at(schedule, 0) == 0.0
        assert lr_at(schedule, warmup) == pytest.approx(lr)                     # the peak
    assert O.warmup_cosine_reference(7, lr, total, warmup, end_lr) == pytest.approx(
        reference(7, lr, total, warmup, end_lr))


@pytest.mark.both_backends
def test_accumulation_holds_the_rate_over_each_window():
    k = 4
    schedule = O.make_schedule(config(lr=1e-3, warmup_steps=8, accumulation=k), total_steps=40)
    assert isinstance(schedule, O.AccumulationAlignedSchedule)
    for step in range(45):
        window_start = step // k * k
        assert lr_at(schedule, step) == pytest.approx(reference(window_start, 1e-3, 40, 8, 0.0),
                                                      rel=1e-5, abs=1e-10)


def test_schedule_argument_errors():
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        O.warmup_cosine(1e-3, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="0 <= end_lr <= lr"):
        O.warmup_cosine(1e-3, total_steps=10, end_lr=1e-2)
    with pytest.raises(ValueError, match="needs total_steps"):
        O.make_optimizer(config(total_steps=None))
    with pytest.raises(ValueError, match="accumulation must be >= 1"):
        O.make_optimizer(config(accumulation=0), total_steps=10)


def test_keras_cosine_is_the_schedule_not_tf_models_official():
    """tf-models-official's optimization package is tf_keras (Keras 2): its schedules are not Keras 3
    schedules, so the Keras 3 optimizer cannot use them; ours is Keras' own CosineDecay."""
    from official.modeling.optimization import lr_schedule

    assert not issubclass(lr_schedule.LinearWarmup, keras.optimizers.schedules.LearningRateSchedule)
    schedule = O.make_schedule(config(warmup_steps=5), total_steps=20)
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)


# ------------------------------------------------------------------------------- weight decay mask
def _encoder_variables():
    from keras_mm.encoders.text import TextEncoder
    from keras_mm.encoders.vit import ViTEncoder
    from keras_mm.layers.contrastive_logits import ContrastiveLogits

    small = dict(width=8, depth=1, heads=2, mlp_dim=16)
    variables = []
    for pool in ("map", "cls"):
        vit = ViTEncoder(image_size=16, patch_size=8, pool=pool, output_dim=4, **small)
        vit(np.zeros((1, 16, 16, 3), "float32"))
        variables += vit.trainable_variables
    text = TextEncoder(vocab_size=50, max_len=8, output_dim=4, **small)
    text(np.ones((1, 8), "int32"))
    variables += text.trainable_variables
    for loss_type in ("sigmoid", "softmax"):
        variables += ContrastiveLogits(loss_type, name="contrastive_logits").trainable_variables
    return variables


def test_exactly_the_kernels_of_keras_mm_encoders_decay():
    variables = _encoder_variables()
    paths = {v.path for v in variables}
    # Everything a two-tower model owns is there: embeddings, position embeddings, the [CLS] token,
    # the MAP probe, LayerNorms, vector and [3, heads, dim] biases, the contrastive scalars.
    for fragment in ("token_embedding/embeddings", "position_embedding/embeddings", "cls_token",
                     "map_head/probe", "norm1/gamma", "qkv_bias", "qkv_kernel",
                     "patch_embedding/kernel", "log_scale", "contrastive_logits/bias"):
        assert any(fragment in p for p in paths), fragment
    decayed = {v.path for v in variables if O.decays(v)}
    kernels = {v.path for v in variables if v.path.endswith("kernel")}
    assert decayed == kernels


@pytest.mark.both_backends
def test_weight_decay_applies_to_masked_variables_only():
    """Zero gradients: Adam's step is 0, so a variable changes only by decay: w * (1 - lr * wd)."""

    class Scalars(keras.layers.Layer):
        def build(self, input_shape):
            self.temperature = self.add_weight(shape=(), initializer="ones", name="log_scale")
            self.cls_token = self.add_weight(shape=(1, 1, 4), initializer="ones", name="cls_token")

        def call(self, x):
            return x * self.temperature + self.cls_token[0]

    inputs = keras.Input((3,), dtype="int32")
    x = keras.layers.Embedding(10, 4, name="token_embedding")(inputs)
    x = keras.layers.Dense(4, name="dense", bias_initializer="ones")(x)
    x = keras.layers.LayerNormalization(name="norm", beta_initializer="ones")(x)
    x = Scalars(name="contrastive")(x)
    model = keras.Model(inputs, x)
    lr, wd = 0.1, 0.5
    opt = O.make_optimizer(config(lr=lr, weight_decay=wd), total_steps=100)
    before = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables}
    opt.apply([keras.ops.zeros(v.shape) for v in model.trainable_variables],
              model.trainable_variables)
    expected = {"token_embedding/embeddings": 1.0, "dense/kernel": 1 - lr * wd, "dense/bias": 1.0,
                "norm/gamma": 1.0, "norm/beta": 1.0, "contrastive/log_scale": 1.0,
                "contrastive/cls_token": 1.0}
    assert sorted(before) == sorted(expected)
    for v in model.trainable_variables:
        after = np.array(keras.ops.convert_to_numpy(v))
        assert np.abs(before[v.path]).max() > 0.01, v.path  # a non-zero variable: decay would show
        np.testing.assert_allclose(after, before[v.path] * expected[v.path], rtol=1e-6,
                                   err_msg=v.path)


def test_custom_no_decay_patterns():
    dense = keras.layers.Dense(2, name="head")
    dense.build((None, 3))
    assert O.decays(dense.kernel)
    assert not O.decays(dense.kernel, no_decay=(r"head/",))
    assert O.decays(dense.bias, no_decay=(), min_rank=1)


# ---------------------------------------------------------------------------------------- clipping
@pytest.mark.both_backends
def test_global_norm_clip_on_one_device():
    """b1 = b2 = 0: Adam's first step is lr * g / (|g| + eps), elementwise, on the clipped g."""
    lr, eps, clip = 0.1, 10.0, 1.0
    v1 = keras.Variable(np.zeros((2, 2), "float32"))
    v2 = keras.Variable(np.zeros((3,), "float32"))
    g1 = np.array([[3.0, -4.0], [0.0, 12.0]], "float32")
    g2 = np.array([1.0, 2.0, -2.0], "float32")
    opt = O.make_optimizer(config(lr=lr, eps=eps, b1=0.0, b2=0.0, clip=clip), total_steps=100)
    opt.apply([keras.ops.convert_to_tensor(g1), keras.ops.convert_to_tensor(g2)], [v1, v2])
    norm = math.sqrt((g1 ** 2).sum() + (g2 ** 2).sum())
    assert norm > clip
    for v, g in ((v1, g1), (v2, g2)):
        clipped = g * clip / norm
        expected = -lr * clipped / (np.abs(clipped) + eps)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(v), expected, rtol=1e-5, atol=1e-9)


@TF_ONLY
def test_clip_and_accumulation_under_mirrored_strategy_equal_one_device(tmp_path):
    report = run_check("tf_mirrored_clip", tmp_path)
    assert report["replicas"] == 2
    assert report["clip_relative_effect"] > 1.0        # the clip matters in this setting
    assert report["ours_relative_diff"] < 1e-4         # ours: same weights as one device
    assert report["keras_relative_diff"] > 0.1         # Keras' AdamW clips each replica's share
    assert report["accumulation_relative_diff"] < 1e-4


# ------------------------------------------------------------------------------------ accumulation
@pytest.mark.both_backends
def test_gradient_accumulation_in_fit_equals_a_k_times_larger_batch():
    """A linear model, plain model.fit: batch 8 with accumulation 4 for 24 steps vs batch 32 for 6
    steps, with warmup + cosine, weight decay and clipping (step counts scaled by K)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(192, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 3)) + 0.1 * rng.normal(size=(192, 3))).astype("float32")

    def train(batch, accumulation):
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
        opt = O.make_optimizer(config(lr=0.05, end_lr=0.005, weight_decay=0.1, clip=0.5,
                                      warmup_steps=2 * accumulation, accumulation=accumulation),
                               total_steps=6 * accumulation)
        model.compile(opt, "mse")
        start = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        end = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]
        return start, end, opt

    start, big, big_opt = train(32, 1)
    _, small, small_opt = train(8, 4)
    assert int(keras.ops.convert_to_numpy(big_opt.iterations)) == 6
    assert int(keras.ops.convert_to_numpy(small_opt.iterations)) == 6      # updates, not steps
    assert small_opt.gradient_accumulation_steps == 4
    assert np.max(np.abs(big[0] - start[0])) > 0.05                       # it trained
    for a, b in zip(big, small):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ optimizer settings
def test_make_optimizer_settings():
    opt = O.make_optimizer(config(lr=2e-3, weight_decay=0.05, b1=0.8, b2=0.95, eps=1e-6, clip=2.0),
                           total_steps=100)
    assert isinstance(opt, O.AdamW) and isinstance(opt, keras.optimizers.AdamW)
    assert opt.weight_decay == 0.05 and opt.beta_1 == 0.8 and opt.beta_2 == 0.95
    assert opt.epsilon == 1e-6 and opt.global_clipnorm == 2.0
    assert opt.gradient_accumulation_steps is None
    assert O.make_optimizer(config(clip=None), total_steps=10).global_clipnorm is None
    assert O.make_optimizer(config(accumulation=3), total_steps=30).gradient_accumulation_steps == 3
    # OptimizerConfig.total_steps, when set, ends the cosine; else the run's steps do
    schedule = O.make_schedule(config(lr=1e-3, total_steps=30), total_steps=100)
    assert lr_at(schedule, 30) == pytest.approx(0.0, abs=1e-12) and lr_at(schedule, 15) > 0
    assert lr_at(O.make_schedule(config(lr=1e-3), total_steps=100), 30) > 0


def test_optimizer_serialization_round_trip():
    opt = O.make_optimizer(config(warmup_steps=4, accumulation=2, no_decay=("head",)),
                           total_steps=40)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(restored) is O.AdamW
    assert restored.no_decay == ("head",) and restored.gradient_accumulation_steps == 2
    assert isinstance(restored._learning_rate, O.AccumulationAlignedSchedule)
    for step in (0, 3, 5, 17, 39):
        assert lr_at(restored._learning_rate, step) == pytest.approx(lr_at(opt._learning_rate, step))


# --------------------------------------------------------------------------------- mixed precision
def test_set_precision(float32_policy):
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        mixed_precision.set_precision("fp8")
    policy = mixed_precision.set_precision("mixed_bfloat16")
    assert policy.compute_dtype == "bfloat16" and policy.variable_dtype == "float32"
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    assert layer.kernel.dtype == "float32" and layer.compute_dtype == "bfloat16"
    assert not isinstance(O.make_optimizer(config(), total_steps=10),
                          keras.optimizers.LossScaleOptimizer)
    mixed_precision.set_precision("float32")
    assert mixed_precision.current_precision() == "float32"


def test_mixed_float16_uses_loss_scaling_and_trains(float32_policy):
    mixed_precision.set_precision("mixed_float16")
    opt = O.make_optimizer(config(lr=1e-2, warmup_steps=1), total_steps=5)
    assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
    assert isinstance(opt.inner_optimizer, O.AdamW)
    assert mixed_precision.wrap_optimizer(opt) is opt                      # idempotent
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, dtype="float32")])
    assert model.layers[0].compute_dtype == "float16"
    model.compile(opt, "mse")
    x = np.random.default_rng(0).normal(size=(20, 4)).astype("float32")
    before = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]
    history = model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]
    assert all(np.isfinite(w).all() for w in after)
    assert max(np.abs(a - b).max() for a, b in zip(after, before)) > 1e-4
    # Steps whose float16 gradients overflow are skipped (and the loss scale halves), so the
    # optimizer's iterations can lag the train steps: the checkpoint callbacks count fit batches.
    updates = int(keras.ops.convert_to_numpy(opt.iterations))
    skipped = 5 - updates
    assert 0 <= skipped < 5
    scale = float(keras.ops.convert_to_numpy(opt.dynamic_scale))
    assert scale == opt.initial_scale / 2 ** skipped
    # explicit precision wins over the global policy
    assert not isinstance(O.make_optimizer(config(), total_steps=5, precision="float32"),
                          keras.optimizers.LossScaleOptimizer)
