"""TwoTowerModel: serialization, global-batch training under tf.distribute and JAX, LiT."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_mm.encoders.text import TextEncoder
from keras_mm.encoders.vit import ViTEncoder
from keras_mm.models.two_tower import TwoTowerModel, build_two_tower, locked_image_tower
from tests.keras_mm.serialization import assert_serialization_round_trip
from tests.xla_flags import xla_flags

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "fit_two_tower.py"
ROOT = pathlib.Path(__file__).resolve().parents[3]


def _small(loss="sigmoid", **kw):
    keras.utils.set_random_seed(1)
    image = ViTEncoder(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64,
                       pool="map", output_dim=16)
    text = TextEncoder(vocab_size=50, max_len=6, width=32, depth=1, heads=2, mlp_dim=64,
                       pool="last", output_dim=16)
    return TwoTowerModel(image, text, loss=loss, **kw)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, 16, 16, 3)).astype("float32"),
            "text": rng.integers(4, 50, size=(n, 6)).astype("int32")}


@pytest.mark.both_backends
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_serialization_round_trip(loss):
    model = _small(loss)
    assert_serialization_round_trip(model, _batch())


@pytest.mark.both_backends
def test_embeddings_are_normalised_and_init_follows_the_papers():
    x = _batch()
    sig, soft = _small("sigmoid"), _small("softmax")
    out = sig(x)
    for key in ("image_emb", "text_emb"):
        np.testing.assert_allclose(np.linalg.norm(keras.ops.convert_to_numpy(out[key]), axis=-1),
                                   1.0, atol=1e-5)
    soft(x)
    assert float(sig.logits.scale) == pytest.approx(10.0)        # t' = log 10
    assert float(sig.logits.bias) == pytest.approx(-10.0)        # b = -10
    assert float(soft.logits.scale) == pytest.approx(1 / 0.07, rel=1e-5)  # temperature 0.07
    with pytest.raises(ValueError):
        _small("softmax", chunked=True)


@pytest.mark.both_backends
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_fit_learns_pairs(loss):
    """A fixed batch of 8 pairs: the model must learn to match them (pair accuracy -> 1)."""
    import tensorflow as tf

    model = _small(loss)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    ds = tf.data.Dataset.from_tensors(_batch()).repeat(60)
    history = model.fit(ds, epochs=1, verbose=0).history
    assert set(history) >= {"loss", "pair_accuracy", "t"}
    assert ("b" in history) == (loss == "sigmoid")
    final = model.evaluate(tf.data.Dataset.from_tensors(_batch()), verbose=0, return_dict=True)
    assert final["pair_accuracy"] == 1.0
    assert np.isfinite(final["loss"])


@pytest.mark.both_backends
def test_lit_locks_the_image_tower():
    import tensorflow as tf

    # A "pre-trained" digit-classifier-like model: ViT features + Dense classifier.
    keras.utils.set_random_seed(3)
    vit = ViTEncoder(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64,
                     pool="gap")
    inputs = keras.Input((16, 16, 3))
    classifier = keras.Model(inputs, keras.layers.Dense(10)(vit(inputs)))
    tower = locked_image_tower(classifier)
    assert tower.output_shape[-1] == 32
    text = TextEncoder(vocab_size=50, max_len=6, width=32, depth=1, heads=2, mlp_dim=64,
                       pool="last", output_dim=32)
    model = TwoTowerModel(tower, text, loss="sigmoid", lock_image=True)
    model.compile(optimizer=keras.optimizers.AdamW(1e-2))
    before = [keras.ops.convert_to_numpy(w).copy() for w in tower.weights]
    model.fit(tf.data.Dataset.from_tensors(_batch()).repeat(5), epochs=1, verbose=0)
    after = [keras.ops.convert_to_numpy(w) for w in tower.weights]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)  # bit-identical
    tower_ids = {id(w) for w in tower.weights}
    assert not tower_ids & {id(w) for w in model.trainable_weights}
    # No optimizer slot belongs to the locked tower: slots = 2 per trainable variable (Adam).
    slots = [v for v in model.optimizer.variables if len(v.shape) > 0]
    assert len(slots) == 2 * len([w for w in model.trainable_weights if len(w.shape) > 0])


def test_build_two_tower_presets():
    model = build_two_tower("tiny", "sigmoid", vocab_size=300)
    out = model({"image": np.zeros((2, 64, 64, 3), "float32"),
                 "text": np.ones((2, 16), "int32")})
    assert out["image_emb"].shape == (2, 192) and out["text_emb"].shape == (2, 192)
    clip = build_two_tower("tiny", "softmax", vocab_size=300)
    assert clip.text_encoder.causal and clip.text_encoder.pool == "eos"
    with pytest.raises(ValueError, match="valid names"):
        build_two_tower("huge")


def _fit(tmp_path, replicas, backend="tensorflow", *extra):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT),
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"), TF_CPP_MIN_LOG_LEVEL="2")
    out = tmp_path / f"{backend}_{replicas}_{'_'.join(extra)}.npz"
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), "--replicas", str(replicas),
                             *extra], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = json.loads(result.stdout.strip().splitlines()[-1])["logs"]
    return logs, _load_weights(out)


def _assert_same_run(a, b, atol=1e-4):
    logs_a, w_a = a
    logs_b, w_b = b
    assert len(logs_a) == len(logs_b) == 3
    for la, lb in zip(logs_a, logs_b):
        for key in la:
            assert la[key] == pytest.approx(lb[key], abs=atol, rel=1e-5), key
    for x, y in zip(w_a, w_b):
        np.testing.assert_allclose(x, y, atol=atol)


def _load_weights(path):
    weights = np.load(path)
    return [weights[k] for k in sorted(weights.files, key=lambda s: int(s.split("_")[1]))]


MIRRORED_SETTINGS = ("sigmoid", "sigmoid:chunked", "softmax")


@pytest.fixture(scope="module")
def tf_fits(tmp_path_factory):
    """{replicas: {setting tag: (logs, weights)}}: every MIRRORED_SETTINGS fit on one device and
    on 2 MirroredStrategy replicas, one subprocess per replica count (not one per setting)."""
    tmp = tmp_path_factory.mktemp("tf_fits")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=str(ROOT),
               TF_CPP_MIN_LOG_LEVEL="2")
    fits = {}
    for replicas in (1, 2):
        out = tmp / f"replicas{replicas}.npz"
        runs = [a for setting in MIRRORED_SETTINGS for a in ("--run", setting)]
        result = subprocess.run([sys.executable, str(SCRIPT), str(out), "--replicas",
                                 str(replicas), *runs], env=env, capture_output=True, text=True,
                                timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        done = json.loads(result.stdout.strip().splitlines()[-1])["runs"]
        fits[replicas] = {tag: (run["logs"], _load_weights(run["weights"]))
                          for tag, run in done.items()}
    return fits


@pytest.mark.parametrize("setting", MIRRORED_SETTINGS)
def test_mirrored_strategy_equals_one_device(tf_fits, setting):
    """model.fit on 2 replicas (MirroredStrategy) == one device on the same global batch."""
    tag = setting.replace(":", "_")
    _assert_same_run(tf_fits[1][tag], tf_fits[2][tag])


def test_jax_data_parallel_equals_one_device(tmp_path):
    """model.fit under keras.distribution.DataParallel on 2 host devices == one device, with the
    chunked sigmoid loss (the ring of chunks; the softmax loss's all-gather on a JAX mesh is
    checked in test_global_batch.py's JAX worker)."""
    extra = ("--loss", "sigmoid", "--chunked")
    _assert_same_run(_fit(tmp_path, 1, "jax", *extra), _fit(tmp_path, 2, "jax", *extra))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_two_processes_equal_one_process(tmp_path, tf_fits):
    """Two workers on 127.0.0.1 (TF_CONFIG, MultiWorkerMirroredStrategy) end with the same
    weights as one process on the same global batches, and each logs the same losses, pair
    accuracy, t and b as the one process (1e-4)."""
    workers = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), KERAS_BACKEND="tensorflow",
                   PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
        procs.append(subprocess.Popen(
            [sys.executable, str(SCRIPT), str(tmp_path / f"worker{index}.npz"),
             "--multi_worker", "--loss", "sigmoid"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1])["logs"])
    single_logs, single_weights = tf_fits[1]["sigmoid"]      # the same fit on one process
    for index in range(2):
        for x, y in zip(_load_weights(tmp_path / f"worker{index}.npz"), single_weights):
            np.testing.assert_allclose(x, y, atol=1e-4)
    assert len(single_logs) == len(outputs[0]) == len(outputs[1]) == 3
    for step, one in enumerate(single_logs):
        for worker in outputs:
            assert set(worker[step]) == set(one)
            for key in one:
                assert worker[step][key] == pytest.approx(one[key], abs=1e-4), (step, key)
