"""Multi-device checks of keras_mm.training, each in its own process (devices are fixed at start-up).

    python -m tests.keras_mm.training.scripts.distributed_checks MODE [OUT]

Prints one line ``RESULT {json}``. Modes:

tf_mirrored_strategy  2 logical CPUs: make_strategy("mirrored") has 2 replicas and model.fit on it gives
                      the one-device weights; a checkpoint saved from it restores into every replica of a
                      fresh mirrored model (and into a one-device model).
tf_mirrored_clip      2 logical CPUs: our AdamW's global-norm clip (also with gradient accumulation)
                      under MirroredStrategy gives the one-device weights; Keras' AdamW does not.
jax_data_parallel     KERAS_BACKEND=jax, 2 host devices: make_jax_distribution("mirrored") spans both,
                      fit under it gives the one-device weights, checkpoints round-trip.
tf_multi_worker       one worker of a MultiWorkerMirroredStrategy job (TF_CONFIG set by the parent);
                      worker 0 also trains the same global batches on one device and reports the
                      difference; only the chief writes checkpoints (OUT/checkpoints).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[4]

STEPS = 6
GLOBAL_BATCH = 32


def _config(**kwargs):
    from tests.keras_mm.training.scripts.digits_training import optimizer_config

    return optimizer_config(**{"lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 2, **kwargs})


def _batches(n_steps=STEPS, batch=GLOBAL_BATCH, scale=None):
    from tests.keras_mm.training.scripts.digits_training import digits_arrays

    x, y = digits_arrays()
    x, y = x[:n_steps * batch], y[:n_steps * batch]
    if scale is not None:  # uneven input scales: gradient norms vary from step to step
        x = x * scale[: len(x), None]
    return x, y


def _fit(strategy, optimizer_fn, x, y, batch=GLOBAL_BATCH, seed=1):
    import keras
    import tensorflow as tf

    from tests.keras_mm.training.scripts.digits_training import compile_model, make_model

    with strategy.scope():
        keras.utils.set_random_seed(seed)
        model = make_model(dropout=0.0)
        compile_model(model, optimizer_fn())
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    model.fit(ds, epochs=1, verbose=0)
    return model


def _weights(model):
    import keras

    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]


def _max_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


def tf_mirrored_strategy(out):
    from keras_mm.training import strategy as S

    devices = S.logical_cpu_devices(2)
    import keras
    import tensorflow as tf

    from keras_mm.training import checkpoint, optimizer
    from tests.keras_mm.training.scripts.digits_training import compile_model, make_model

    one = S.make_strategy("one_device")
    mirrored = S.make_strategy("mirrored", devices=devices)
    report = {"devices": devices, "replicas": mirrored.num_replicas_in_sync,
              "one_device_devices": list(one.extended.worker_devices)}
    x, y = _batches()
    make_opt = lambda: optimizer.make_optimizer(_config(clip=None), total_steps=STEPS)  # noqa: E731
    single = _fit(one, make_opt, x, y)
    distributed = _fit(mirrored, make_opt, x, y)
    report["fit_max_diff"] = _max_diff(_weights(single), _weights(distributed))
    report["weights_changed"] = _max_diff(_weights(single), _weights(_fresh(one)))

    checkpointer = checkpoint.Checkpointer(os.path.join(out, "ckpt"), keep=1, write=True)
    checkpointer.save(STEPS, distributed, distributed.optimizer)
    with mirrored.scope():
        keras.utils.set_random_seed(99)
        restored = make_model(dropout=0.0)
        compile_model(restored, optimizer.make_optimizer(_config(), total_steps=STEPS))
        restored.optimizer.build(restored.trainable_variables)
    step = checkpointer.restore_latest(restored, restored.optimizer)
    report["restored_step"] = step
    diffs = []
    for saved, variable in zip(list(distributed.variables) + list(distributed.optimizer.variables),
                               list(restored.variables) + list(restored.optimizer.variables)):
        value = np.asarray(keras.ops.convert_to_numpy(saved))
        tf_variable = variable.value if hasattr(variable, "value") else variable
        for replica_value in mirrored.experimental_local_results(tf_variable):
            diffs.append(float(np.max(np.abs(replica_value.numpy().astype(np.float64) - value))))
    report["restore_every_replica_max_diff"] = max(diffs)
    report["restore_replica_values"] = len(diffs)
    single_restore = make_model(dropout=0.0)
    checkpointer.restore_latest(single_restore)
    report["restore_one_device_max_diff"] = _max_diff(_weights(distributed), _weights(single_restore))
    return report


def _fresh(strategy):
    import keras

    from tests.keras_mm.training.scripts.digits_training import make_model

    with strategy.scope():
        keras.utils.set_random_seed(1)
        return make_model(dropout=0.0)


def tf_mirrored_clip(out):
    from keras_mm.training import strategy as S

    devices = S.logical_cpu_devices(2)
    import keras

    from keras_mm.training import optimizer

    one = S.make_strategy("one_device")
    mirrored = S.make_strategy("mirrored", devices=devices)
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.2, 20.0, size=STEPS * GLOBAL_BATCH * 4).astype(np.float32)
    report = {"replicas": mirrored.num_replicas_in_sync}

    # eps=1 and a large lr: Adam's step then scales with the (clipped) gradient, like SGD with momentum,
    # so a clip by the wrong norm changes the weights. Differences are relative to the weights' change.
    x, y = _batches(scale=scale)
    start = _weights(_fresh(one))

    def relative(a, b):
        return _max_diff(a, b) / _max_diff(a, start)

    def ours(total=STEPS, **kwargs):
        settings = dict(lr=0.5, weight_decay=0.0, clip=0.05, eps=1.0)
        settings.update(kwargs)
        return lambda: optimizer.make_optimizer(_config(**settings), total_steps=total)

    single = _weights(_fit(one, ours(), x, y))
    report["ours_relative_diff"] = relative(single, _weights(_fit(mirrored, ours(), x, y)))
    report["clip_relative_effect"] = relative(single, _weights(_fit(one, ours(clip=None), x, y)))

    def keras_adamw():
        return keras.optimizers.AdamW(learning_rate=0.5, weight_decay=0.0, epsilon=1.0,
                                      global_clipnorm=0.05)

    keras_single = _weights(_fit(one, keras_adamw, x, y))
    report["keras_relative_diff"] = relative(keras_single, _weights(_fit(mirrored, keras_adamw, x, y)))

    # Accumulation (the update and the clip's all-reduce run in a cond) under the strategy.
    acc = ours(total=2 * STEPS, accumulation=2, warmup_steps=4)
    xa, ya = _batches(n_steps=2 * STEPS, batch=GLOBAL_BATCH, scale=scale)
    acc_single = _weights(_fit(one, acc, xa, ya))
    report["accumulation_relative_diff"] = relative(acc_single, _weights(_fit(mirrored, acc, xa, ya)))
    return report


def jax_data_parallel(out):
    import keras

    assert keras.backend.backend() == "jax", keras.backend.backend()
    import jax
    import tensorflow as tf

    from keras_mm.training import checkpoint, optimizer
    from keras_mm.training import strategy as S
    from tests.keras_mm.training.scripts.digits_training import compile_model, make_model

    x, y = _batches()
    report = {"jax_devices": len(jax.devices())}

    def fit(accumulation=1):
        keras.utils.set_random_seed(1)
        model = make_model(dropout=0.0)
        config = _config(clip=0.5, accumulation=accumulation, warmup_steps=2 * accumulation)
        compile_model(model, optimizer.make_optimizer(config, total_steps=STEPS * accumulation))
        batch = GLOBAL_BATCH // accumulation
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch), verbose=0)
        return model

    single = fit()
    distribution = S.make_jax_distribution("mirrored")
    report["distribution"] = type(distribution).__name__
    report["mesh_devices"] = int(np.prod(distribution.device_mesh.shape))
    report["one_device_mesh"] = int(np.prod(S.make_jax_distribution("one_device").device_mesh.shape))
    keras.distribution.set_distribution(distribution)
    distributed = fit()
    kernel = distributed.trainable_variables[0].value
    report["kernel_devices"] = len(kernel.sharding.device_set)
    report["fit_max_diff"] = _max_diff(_weights(single), _weights(distributed))
    # Gradient accumulation under the distribution: 2 micro-batches of 16 = the one-device batch of 32.
    report["accumulation_vs_big_batch_max_diff"] = _max_diff(_weights(single),
                                                             _weights(fit(accumulation=2)))

    checkpointer = checkpoint.Checkpointer(os.path.join(out, "ckpt"), keep=1, write=True)
    checkpointer.save(STEPS, distributed, distributed.optimizer)
    keras.utils.set_random_seed(5)
    restored = make_model(dropout=0.0)
    compile_model(restored, optimizer.make_optimizer(_config(clip=0.5), total_steps=STEPS))
    report["restored_step"] = checkpointer.restore_latest(restored, restored.optimizer)
    report["restore_max_diff"] = _max_diff(
        [np.asarray(v) for v in distributed.variables + distributed.optimizer.variables],
        [np.asarray(v) for v in restored.variables + restored.optimizer.variables])
    return report


def tf_multi_worker(out):
    import tensorflow as tf

    from keras_mm.training import checkpoint, optimizer
    from keras_mm.training import strategy as S

    strategy = S.make_strategy("multi_worker")
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    report = {"task": task, "replicas": strategy.num_replicas_in_sync, "is_chief": S.is_chief()}
    x, y = _batches()
    make_opt = lambda: optimizer.make_optimizer(_config(clip=0.5), total_steps=STEPS)  # noqa: E731

    def dataset_fn(context):
        # Global batches of 32; this worker takes its rows of each.
        per_replica = context.get_per_replica_batch_size(GLOBAL_BATCH)
        lo = context.input_pipeline_id * per_replica
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
        return ds.map(lambda a, b: (a[lo:lo + per_replica], b[lo:lo + per_replica]))

    import keras

    from tests.keras_mm.training.scripts.digits_training import compile_model, make_model

    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = make_model(dropout=0.0)
        compile_model(model, make_opt())
    model.fit(strategy.distribute_datasets_from_function(dataset_fn), epochs=1, steps_per_epoch=STEPS,
              verbose=0)
    checkpointer = checkpoint.Checkpointer(os.path.join(out, "checkpoints"), keep=1)
    report["wrote"] = checkpointer.save(STEPS, model, model.optimizer) is not None
    if task == 0:
        single = _fit(tf.distribute.get_strategy(), make_opt, x, y)
        report["fit_max_diff"] = _max_diff(_weights(single), _weights(model))
    return report


def run_check(mode, out, env=None, timeout=300):
    """Runs MODE in a subprocess (for the tests); returns its RESULT dict."""
    env = dict(os.environ, **(env or {}))
    result = subprocess.run([sys.executable, "-m", __name__ if __name__ != "__main__" else
                             "tests.keras_mm.training.scripts.distributed_checks", mode, str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    assert result.returncode == 0 and lines, tail
    return json.loads(lines[-1][len("RESULT "):])


def main():
    import keras

    keras.config.disable_traceback_filtering()
    mode = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else "."
    report = globals()[mode](out)
    print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
