"""Fit a small TwoTowerModel for a few steps on a fixed global batch; print losses as JSON.

    python fit_two_tower.py OUT.npz --replicas 2 --loss sigmoid [--chunked]
    python fit_two_tower.py OUT.npz --replicas 2 --run sigmoid --run sigmoid:chunked --run softmax

With ``--run LOSS[:chunked]`` (repeatable; TensorFlow, not multi-worker) one process fits each
setting in turn, a fresh model each, and writes OUT_LOSS[_chunked].npz per setting: one TF start and
one strategy for all of them. The printed JSON then has ``runs``: {LOSS[_chunked]: {"logs": logs,
"weights": that .npz path}}.

TensorFlow backend: --replicas R > 1 uses MirroredStrategy over R logical CPU devices.
JAX backend (KERAS_BACKEND=jax, XLA_FLAGS=--xla_force_host_platform_device_count=R):
keras.distribution.DataParallel over R host devices. The global batch is the same either way.
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--replicas", type=int, default=1)
parser.add_argument("--loss", default="sigmoid")
parser.add_argument("--chunked", action="store_true")
parser.add_argument("--run", action="append", default=[],
                    help="LOSS or LOSS:chunked; repeatable (several settings in one process)")
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--multi_worker", action="store_true",
                    help="MultiWorkerMirroredStrategy from TF_CONFIG (one replica per process)")
args = parser.parse_args()

import keras  # noqa: E402
import numpy as np  # noqa: E402

backend = keras.backend.backend()
if backend == "tensorflow":
    import tensorflow as tf

    if args.replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)

from keras_mm.models.two_tower import TwoTowerModel  # noqa: E402
from keras_mm.encoders.text import TextEncoder  # noqa: E402
from keras_mm.encoders.vit import ViTEncoder  # noqa: E402

GLOBAL_BATCH = 8
rng = np.random.default_rng(0)
images = rng.normal(size=(args.steps, GLOBAL_BATCH, 16, 16, 3)).astype("float32")
texts = rng.integers(4, 50, size=(args.steps, GLOBAL_BATCH, 6)).astype("int32")


def build(loss=args.loss, chunked=args.chunked):
    keras.utils.set_random_seed(7)
    image = ViTEncoder(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64,
                       pool="gap", output_dim=16)
    text = TextEncoder(vocab_size=50, max_len=6, width=32, depth=1, heads=2, mlp_dim=64,
                       pool="last", output_dim=16)
    model = TwoTowerModel(image, text, loss=loss, chunked=chunked)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    return model


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append({k: float(v) for k, v in logs.items()})


recorder = Recorder()
if backend == "tensorflow" and args.multi_worker:
    from keras_mm.training import strategy as S

    strategy = S.make_strategy("multi_worker")

    def dataset_fn(context):
        # The same global batches; this worker takes its rows of each.
        per_replica = context.get_per_replica_batch_size(GLOBAL_BATCH)
        lo = context.input_pipeline_id * per_replica
        ds = tf.data.Dataset.from_tensor_slices({"image": images, "text": texts})
        return ds.map(lambda b: {k: v[lo:lo + per_replica] for k, v in b.items()})

    with strategy.scope():
        model = build()
    model.fit(strategy.distribute_datasets_from_function(dataset_fn), epochs=1,
              steps_per_epoch=args.steps, verbose=0, callbacks=[recorder])
elif backend == "tensorflow":
    strategy = (tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.replicas)])
                if args.replicas > 1 else tf.distribute.get_strategy())
    assert strategy.num_replicas_in_sync == args.replicas
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "text": texts})
    if args.run:
        runs = {}
        for setting in args.run:
            loss, _, chunked = setting.partition(":")
            assert chunked in ("", "chunked"), setting
            tag = loss + ("_chunked" if chunked else "")
            with strategy.scope():
                model = build(loss, bool(chunked))
            recorder = Recorder()
            model.fit(ds, epochs=1, verbose=0, callbacks=[recorder], shuffle=False)
            path = args.out.replace(".npz", f"_{tag}.npz")
            np.savez(path, *[keras.ops.convert_to_numpy(w) for w in model.weights])
            runs[tag] = {"logs": recorder.logs, "weights": path}
        print(json.dumps({"backend": backend, "runs": runs}))
        sys.exit(0)
    with strategy.scope():
        model = build()
    model.fit(ds, epochs=1, verbose=0, callbacks=[recorder], shuffle=False)
else:
    import jax

    assert len(jax.devices()) >= args.replicas
    if args.replicas > 1:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()[: args.replicas]))
    model = build()

    def gen():
        for s in range(args.steps):
            yield {"image": images[s], "text": texts[s]}

    import tensorflow as tf  # tf.data only

    ds = tf.data.Dataset.from_generator(gen, output_signature={
        "image": tf.TensorSpec((GLOBAL_BATCH, 16, 16, 3), tf.float32),
        "text": tf.TensorSpec((GLOBAL_BATCH, 6), tf.int32)})
    model.fit(ds, epochs=1, verbose=0, callbacks=[recorder], shuffle=False)

np.savez(args.out, *[keras.ops.convert_to_numpy(w) for w in model.weights])
print(json.dumps({"backend": backend, "logs": recorder.logs}))
