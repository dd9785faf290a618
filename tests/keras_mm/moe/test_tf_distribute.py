"""MoeMlp under tf.distribute.MirroredStrategy on 2 logical CPUs (a subprocess: devices must be
configured before TensorFlow starts): each replica routes its own tokens, so replica r's output
and gradients equal the one-device layer's on replica r's examples."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[3]

SCRIPT = r'''
import json

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from keras_mm.losses import moe_auxiliary as aux  # noqa: E402
from keras_mm.moe.moe_mlp import MoeMlp  # noqa: E402

rng = np.random.default_rng(0)
x = rng.normal(size=(4, 6, 8)).astype("float32")


def make():
    return MoeMlp(4, 16, group_size=6, capacity_factor=0.5)      # C = 1: tokens are dropped


def loss_and_grads(layer, inputs):
    with tf.GradientTape() as tape:
        y, routing = layer(inputs, training=True, return_routing=True)
        loss = tf.reduce_sum(y ** 2) + aux.importance_loss(routing["gates"])
    return y, routing["kept"], tape.gradient(loss, layer.trainable_variables)


reference = make()
reference(x)
for v in reference.weights:
    v.assign(rng.normal(size=v.shape).astype("float32") * 0.3)
local = [loss_and_grads(reference, x[i:i + 2]) for i in (0, 2)]

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    layer = make()
    layer(x)
    for target, source in zip(layer.weights, reference.weights):
        target.assign(source)


@tf.function
def step(batch):
    return strategy.run(lambda b: loss_and_grads(layer, b), args=(batch,))


dataset = strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensor_slices(x).batch(4))
y, kept, grads = step(next(iter(dataset)))
ys = strategy.experimental_local_results(y)
kepts = strategy.experimental_local_results(kept)
y_err = max(float(np.abs(np.asarray(a) - np.asarray(b[0])).max()) for a, b in zip(ys, local))
kept_equal = all(np.array_equal(np.asarray(a), np.asarray(b[1])) for a, b in zip(kepts, local))
grad_err = 0.0
for i, g in enumerate(grads):
    parts = strategy.experimental_local_results(g)
    for r in range(2):
        grad_err = max(grad_err, float(np.abs(np.asarray(parts[r])
                                              - np.asarray(local[r][2][i])).max()))
dropped = int(sum((np.asarray(k) == 0).sum() for k in kepts))
print("RESULT " + json.dumps(dict(replicas=strategy.num_replicas_in_sync, y_err=y_err,
                                  grad_err=grad_err, kept_equal=kept_equal, dropped=dropped)))
'''


def test_mirrored_strategy_replicas_equal_one_device_layer():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, (out.stdout + out.stderr)[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["replicas"] == 2
    assert result["y_err"] < 1e-5 and result["grad_err"] < 1e-4, result
    assert result["kept_equal"] and result["dropped"] > 0, result
