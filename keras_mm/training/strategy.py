"""Where training runs: a ``tf.distribute`` strategy (TensorFlow backend) or a ``keras.distribution``
(JAX backend), from one name.

==============  ================================================  ==========================================
kind            TensorFlow backend (``make_strategy``)             JAX backend (``make_jax_distribution``)
==============  ================================================  ==========================================
one_device      ``OneDeviceStrategy`` on GPU:0 if any, else CPU:0   ``DataParallel`` over the first device
mirrored        ``MirroredStrategy`` over ``devices`` (default:     ``DataParallel`` over every local device
                every local GPU, else the CPU)
multi_worker    ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``  ``keras.distribution.initialize()`` (the
                                                                   ``KERAS_DISTRIBUTION_*`` environment), then
                                                                   ``DataParallel`` over every process' devices
tpu             ``TPUClusterResolver(tpu=address)`` ->              ``DataParallel`` over the TPU devices (JAX
                ``initialize_tpu_system`` -> ``TPUStrategy``       sees them directly; no address)
==============  ================================================  ==========================================

On the TensorFlow backend, build the model, the optimizer and call ``compile`` inside
``strategy.scope()``; ``model.fit`` then runs each step on every replica and Keras' optimizer SUM-all-
reduces the gradients (see keras_mm.training.global_batch for the loss normalisation). On the JAX backend
``tf.distribute`` does not apply: ``keras.distribution.set_distribution(make_jax_distribution(kind))``
before building the model makes ``fit`` shard every batch over the devices and compile one global-batch
step (no ``scope``).

Tests and laptops fake several devices: ``logical_cpu_devices(2)`` (TensorFlow, before any op) or
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (JAX, before jax starts).
"""

import json
import os

KINDS = ("one_device", "mirrored", "multi_worker", "tpu")


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"unknown strategy kind {kind!r}; valid kinds: {', '.join(KINDS)}")


# ----------------------------------------------------------------------------------------- TF_CONFIG
def parse_tf_config(text=None):
    """The validated ``TF_CONFIG`` of a multi-worker job (from the environment when ``text`` is None).

    ``TF_CONFIG`` is JSON: ``{"cluster": {"worker": ["host:port", ...], ("chief": ["host:port"])},
    "task": {"type": "worker", "index": i}}``.

    Returns:
      the parsed dict.

    Raises:
      ValueError: missing, not JSON, or inconsistent (no worker list, task type not in the cluster,
        index out of range), naming what is wrong.
    """
    if text is None:
        text = os.environ.get("TF_CONFIG")
    if not text:
        raise ValueError(
            "strategy 'multi_worker' needs the TF_CONFIG environment variable, e.g. "
            'TF_CONFIG=\'{"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}\' (one per process, its own index)')
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e.msg} at char {e.pos}): {text!r}") from None
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object, got {text!r}")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError(f"TF_CONFIG has no 'cluster' object with the worker addresses: {text!r}")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses or not all(
                isinstance(a, str) and ":" in a for a in addresses):
            raise ValueError(
                f"TF_CONFIG cluster job {job!r} must be a non-empty list of 'host:port' strings, "
                f"got {addresses!r}")
    if "worker" not in cluster and "chief" not in cluster:
        raise ValueError(f"TF_CONFIG cluster has neither 'worker' nor 'chief' jobs: {text!r}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(f"TF_CONFIG needs a 'task' object with 'type' and 'index': {text!r}")
    task_type, index = task["type"], task["index"]
    if task_type not in cluster:
        raise ValueError(
            f"TF_CONFIG task type {task_type!r} is not a job of the cluster ({sorted(cluster)})")
    if not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise ValueError(
            f"TF_CONFIG task index {index!r} is out of range for job {task_type!r} "
            f"({len(cluster[task_type])} addresses)")
    return config


def is_chief():
    """Whether this process writes checkpoints, configs and summaries.

    True for single-process runs; under ``TF_CONFIG`` for the 'chief' task, or worker 0 when the cluster
    has no chief; on a multi-process JAX job (``keras.distribution.initialize``) for process 0.
    """
    text = os.environ.get("TF_CONFIG")
    if text:
        config = parse_tf_config(text)
        task = config["task"]
        if "chief" in config["cluster"]:
            return task["type"] == "chief"
        return task["type"] == "worker" and task["index"] == 0
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.process_index() == 0
    return True


# ------------------------------------------------------------------------------------- TensorFlow
def logical_cpu_devices(n):
    """Splits the CPU into ``n`` logical devices and returns their names (``/device:CPU:i``).

    For tests and laptops: ``make_strategy("mirrored", devices=logical_cpu_devices(2))``. TensorFlow
    fixes its devices when it runs its first op, so call this first thing in the process.

    Raises:
      RuntimeError: TensorFlow is already initialised (with a different number of CPU devices).
    """
    import tensorflow as tf

    if n < 1:
        raise ValueError(f"logical_cpu_devices needs n >= 1, got {n}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if not (current and len(current) == n):
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
        except RuntimeError as e:
            raise RuntimeError(
                f"logical_cpu_devices({n}) must run before TensorFlow's first op (its devices are fixed "
                f"once initialised; this process has {len(tf.config.list_logical_devices('CPU'))} "
                f"CPU device(s)). Call it first thing in the process, e.g. in a test's subprocess.") from e
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def make_strategy(kind="one_device", tpu=None, devices=None):
    """A ``tf.distribute.Strategy`` by name (TensorFlow backend).

    Args:
      kind: "one_device", "mirrored", "multi_worker" or "tpu".
      tpu: for kind "tpu", the TPU's name or address (``grpc://10.0.0.2:8470``, a Cloud TPU name, or
        "local" on a TPU VM); None or "" lets ``TPUClusterResolver`` find it from the environment.
      devices: "one_device": the device (first entry); "mirrored": the device list (default: every
        local GPU, else the CPU). Ignored by multi_worker (every GPU, else the CPU, of every worker) and
        tpu.

    Returns:
      the strategy. Build the model, optimizer and ``compile`` inside ``strategy.scope()``.

    Raises:
      ValueError: unknown kind, or multi_worker without a valid ``TF_CONFIG``.
      RuntimeError: the TPU cannot be resolved or initialised.
    """
    _check_kind(kind)
    import tensorflow as tf

    if kind == "one_device":
        if devices:
            device = devices[0]
        elif tf.config.list_physical_devices("GPU"):
            device = "/gpu:0"
        else:
            device = "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy(devices=list(devices) if devices else None)
    if kind == "multi_worker":
        parse_tf_config()  # clear error now, rather than a silent one-worker fallback
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        patch_keras_for_multi_worker()
        return strategy
    return _make_tpu_strategy(tf, tpu)


_PATCHED = False


def patch_keras_for_multi_worker():
    """Makes Keras 3's TensorFlow ``model.fit`` run under ``MultiWorkerMirroredStrategy``.

    Keras 3 (checked on 3.15) fails there in two places (keras-team/keras#20585, tensorflow#72388):
    ``fit`` builds the model from one batch that it first averages over the workers with an eager
    ``strategy.reduce`` of a PerReplica value, which MWMS rejects; and the train function averages the
    logged scalars with ``strategy.reduce("MEAN", v, axis=0)``, which fails on a scalar (and with one replica per worker
    ``run`` returns each worker's own plain values, never reduced across workers). Here the build
    uses this worker's first replica batch (only its shapes matter) and the logged scalars are
    averaged over all workers with one ``all_reduce``, so each worker logs the global-batch values. Everything else (gradients, updates) is Keras' own code. Applied by
    ``make_strategy("multi_worker")``; idempotent; only changes behaviour under MWMS.
    """
    global _PATCHED
    if _PATCHED:
        return
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    def is_multi_worker(strategy):
        return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)

    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None or not is_multi_worker(self.distribute_strategy) or (
                iterator is None):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        strategy = self.distribute_strategy
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tf.nest.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v, batch)
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if is_multi_worker(strategy) and reduction in ("auto", "mean"):
            def mean(v):
                rank = v.shape.rank if hasattr(v, "shape") and v.shape is not None else None
                return strategy.reduce("MEAN", v, axis=None if not rank else 0)

            # One local replica per worker: run() returned this worker's plain values (metrics
            # over the worker's own rows). Treat each as the PerReplica value it is, so
            # strategy.reduce averages it over all workers with a collective: every worker then
            # logs what one process logs on the global batch.
            from tensorflow.python.distribute import values as values_lib

            def per_replica(v):
                if isinstance(v, tf.distribute.DistributedValues):
                    return v
                with tf.device(strategy.extended.worker_devices[0]):
                    return values_lib.PerReplica((tf.identity(v),))

            values = tf.nest.map_structure(per_replica, values)
            return tf.nest.map_structure(mean, values)
        return original_reduce(values, strategy, reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    _PATCHED = True


def _make_tpu_strategy(tf, tpu):
    """TPUClusterResolver -> connect -> initialize_tpu_system -> TPUStrategy (the Cloud TPU recipe)."""
    address = tpu or ""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
    except (ValueError, RuntimeError) as e:
        raise RuntimeError(
            f"could not resolve the TPU {address or '(from the environment)'!r}: {e}. Pass --tpu with "
            f"the TPU name or grpc://host:8470 address (or 'local' on a TPU VM).") from e
    if address not in ("local",):
        # A TPU VM ('local') runs in-process; a TPU node is a remote cluster to connect to.
        tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


# -------------------------------------------------------------------------------------------- JAX
def make_jax_distribution(kind="mirrored", devices=None):
    """A ``keras.distribution.DataParallel`` by name (JAX backend; see the module docstring).

    Use ``keras.distribution.set_distribution(make_jax_distribution(kind))`` before building the model.
    Under it a jitted train step sees the global batch (nothing to all_gather,
    keras_mm.training.global_batch).

    Args:
      kind: as ``make_strategy``.
      devices: optional list of jax device strings (``"cpu:0"``...) for one_device / mirrored.

    Raises:
      ValueError: unknown kind, or the backend is not JAX.
    """
    _check_kind(kind)
    import keras

    if keras.backend.backend() != "jax":
        raise ValueError(
            f"make_jax_distribution needs the JAX backend (KERAS_BACKEND=jax); this process runs "
            f"{keras.backend.backend()!r}: use make_strategy({kind!r}) there")
    from keras import distribution

    if kind == "multi_worker":
        # jax.distributed from KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID.
        distribution.initialize()
        return distribution.DataParallel(devices=distribution.list_devices())
    if kind == "tpu":
        return distribution.DataParallel(devices=distribution.list_devices("tpu"))
    all_devices = list(devices) if devices else distribution.list_devices()
    if kind == "one_device":
        all_devices = all_devices[:1]
    return distribution.DataParallel(devices=all_devices)
