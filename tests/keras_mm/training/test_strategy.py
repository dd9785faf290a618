"""keras_mm.training.strategy: strategy factory, TF_CONFIG checks, multi-device fits in subprocesses.

The multi-device checks run tests/keras_mm/training/scripts/distributed_checks.py in subprocesses (devices
are fixed when TensorFlow / JAX start); each compares model.fit under the strategy with a one-device fit on
the same global batches.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import keras
import pytest

from keras_mm.training import strategy as S
from tests.keras_mm.training.scripts.distributed_checks import run_check
from tests.xla_flags import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[3]
TF_ONLY = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow backend")


# ----------------------------------------------------------------------------------------- factory
@TF_ONLY
def test_one_device_strategy_uses_the_cpu_without_gpu():
    import tensorflow as tf

    assert not tf.config.list_physical_devices("GPU")
    strategy = S.make_strategy("one_device")
    assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
    assert strategy.num_replicas_in_sync == 1
    assert strategy.extended.worker_devices[0].endswith("CPU:0")
    explicit = S.make_strategy("one_device", devices=["/cpu:0"])
    assert explicit.extended.worker_devices[0].endswith("CPU:0")


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown strategy kind 'gpu'.*one_device, mirrored, "
                                         "multi_worker, tpu"):
        S.make_strategy("gpu")
    with pytest.raises(ValueError, match="unknown strategy kind"):
        S.make_jax_distribution("data_parallel")


@TF_ONLY
def test_make_jax_distribution_needs_jax():
    with pytest.raises(ValueError, match="needs the JAX backend"):
        S.make_jax_distribution("mirrored")


@TF_ONLY
def test_logical_cpu_devices_after_start_is_a_clear_error():
    import tensorflow as tf

    tf.constant(1.0) + 1.0  # TensorFlow has started in this process
    count = len(tf.config.list_logical_devices("CPU"))
    if count == 2:  # another test configured 2 devices first: asking again for 2 is fine
        assert len(S.logical_cpu_devices(2)) == 2
    with pytest.raises(RuntimeError, match="must run before TensorFlow's first op"):
        S.logical_cpu_devices(3)


# --------------------------------------------------------------------------------------- TF_CONFIG
def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        S.make_strategy("multi_worker")


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"task": {"type": "worker", "index": 0}}', "no 'cluster'"),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', "non-empty list"),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}}', "needs a 'task'"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "chief", "index": 0}}',
     "task type 'chief' is not a job"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
     "index 2 is out of range"),
    ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "neither 'worker' nor"),
])
def test_invalid_tf_config_names_the_problem(monkeypatch, text, message):
    monkeypatch.setenv("TF_CONFIG", text)
    with pytest.raises(ValueError, match=message):
        S.make_strategy("multi_worker")


def test_is_chief(monkeypatch):
    workers = '{"worker": ["a:1", "b:2"]}'
    for index, chief in [(0, True), (1, False)]:
        monkeypatch.setenv("TF_CONFIG", f'{{"cluster": {workers}, "task": {{"type": "worker", '
                                        f'"index": {index}}}}}')
        assert S.is_chief() is chief
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, '
                                    '"task": {"type": "worker", "index": 0}}')
    assert S.is_chief() is False
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, '
                                    '"task": {"type": "chief", "index": 0}}')
    assert S.is_chief() is True
    monkeypatch.delenv("TF_CONFIG")
    assert S.is_chief() is True


# --------------------------------------------------------------------------------------------- TPU
@TF_ONLY
def test_tpu_path_resolves_connects_initialises_then_builds_the_strategy(monkeypatch):
    """No TPU here: the TF entry points are replaced by recorders to check the Cloud TPU sequence."""
    import tensorflow as tf

    calls = []

    class Resolver:
        def __init__(self, tpu):
            calls.append(("resolver", tpu))

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster",
                        lambda r: calls.append(("connect", type(r).__name__)))
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system",
                        lambda r: calls.append(("initialize", type(r).__name__)))
    monkeypatch.setattr(tf.distribute, "TPUStrategy",
                        lambda r: calls.append(("strategy", type(r).__name__)) or "tpu-strategy")
    assert S.make_strategy("tpu", tpu="grpc://10.0.0.2:8470") == "tpu-strategy"
    assert calls == [("resolver", "grpc://10.0.0.2:8470"), ("connect", "Resolver"),
                     ("initialize", "Resolver"), ("strategy", "Resolver")]
    calls.clear()
    S.make_strategy("tpu", tpu="local")  # a TPU VM: nothing remote to connect to
    assert [c[0] for c in calls] == ["resolver", "initialize", "strategy"]


@TF_ONLY
def test_tpu_resolution_failure_is_a_clear_error(monkeypatch):
    import tensorflow as tf

    def fail(tpu):
        raise ValueError("Please provide a TPU Name to connect to.")

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", fail)
    with pytest.raises(RuntimeError, match="could not resolve the TPU 'my-tpu'.*--tpu"):
        S.make_strategy("tpu", tpu="my-tpu")


# ------------------------------------------------------------------------------ multi-device fits
@TF_ONLY
def test_mirrored_two_logical_cpus_fit_equals_one_device_and_checkpoints_restore(tmp_path):
    report = run_check("tf_mirrored_strategy", tmp_path)
    assert report["devices"] == ["/device:CPU:0", "/device:CPU:1"]
    assert report["replicas"] == 2
    assert report["weights_changed"] > 1e-3          # training moved the weights...
    assert report["fit_max_diff"] < 1e-5             # ...identically on 2 replicas and on one device
    assert report["restored_step"] == 6
    assert report["restore_replica_values"] > 0
    assert report["restore_every_replica_max_diff"] == 0.0   # every replica got the saved values
    assert report["restore_one_device_max_diff"] == 0.0      # and a one-device model reads them too


@pytest.mark.slow
def test_jax_data_parallel_two_host_devices(tmp_path):
    env = {"KERAS_BACKEND": "jax",
           "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2")}
    report = run_check("jax_data_parallel", tmp_path, env=env)
    assert report["jax_devices"] == 2
    assert report["distribution"] == "DataParallel"
    assert report["mesh_devices"] == 2 and report["one_device_mesh"] == 1
    assert report["kernel_devices"] == 2             # variables live on both devices
    assert report["fit_max_diff"] < 1e-5
    assert report["accumulation_vs_big_batch_max_diff"] < 1e-5
    assert report["restored_step"] == 6 and report["restore_max_diff"] == 0.0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@TF_ONLY
@pytest.mark.slow
def test_multi_worker_two_processes_fit_equals_one_device(tmp_path):
    workers = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), KERAS_BACKEND="tensorflow")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.keras_mm.training.scripts.distributed_checks",
             "tf_multi_worker", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, "\n".join(out.splitlines()[-40:])
        reports.append(json.loads(lines[-1][len("RESULT "):]))
    assert [r["replicas"] for r in reports] == [2, 2]
    assert [r["is_chief"] for r in reports] == [True, False]
    assert [r["wrote"] for r in reports] == [True, False]     # only the chief writes checkpoints
    assert reports[0]["fit_max_diff"] < 1e-5
    assert os.listdir(tmp_path / "checkpoints") == ["ckpt-00000006"]
