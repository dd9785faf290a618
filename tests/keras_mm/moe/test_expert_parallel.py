"""Expert parallelism on JAX: MoeMlp under keras.distribution.ModelParallel with
``expert_layout_map`` (experts over the mesh axis "model", data over "batch") computes the same
outputs and gradients as the unsharded layer, with its expert weights really sharded. Runs in a
subprocess with 4 logical CPU devices (XLA_FLAGS), whatever this process' backend."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.xla_flags import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[3]

SCRIPT = r'''
import json
import re

import jax
import keras
import numpy as np

from keras_mm.moe.expert_parallel import expert_layout_map, expert_parallel_distribution
from keras_mm.moe.moe_mlp import MoeMlp

E, WIDTH, HIDDEN = 4, 8, 16
rng = np.random.default_rng(0)
x = rng.normal(size=(4, 6, WIDTH)).astype("float32")       # 24 tokens = 4 groups of 6


def make():
    return MoeMlp(E, HIDDEN, num_selected=2, group_size=6, capacity_factor=1.0)


def step(layer):
    trainable = [v.value for v in layer.trainable_variables]

    def loss(params, inputs):
        (y, routing), _ = layer.stateless_call(params, [], inputs, return_routing=True)
        return keras.ops.sum(keras.ops.square(y)) + keras.ops.sum(routing["gates"] ** 2), y

    return jax.jit(jax.value_and_grad(loss, has_aux=True)), trainable


reference = make()
reference(x)
for v in reference.weights:
    v.assign(rng.normal(size=v.shape).astype("float32") * 0.3)
fn, params = step(reference)
(_, y_ref), g_ref = fn(params, x)
names = [v.path.split("/")[-1] for v in reference.trainable_variables]

result = {}
devices = keras.distribution.list_devices()
for shape in ((1, 4), (2, 2)):
    mesh = keras.distribution.DeviceMesh(shape, ("batch", "model"), devices)
    distribution = expert_parallel_distribution(mesh)
    with distribution.scope():
        layer = make()
        layer(x)
        for target, source in zip(layer.weights, reference.weights):
            target.assign(source.value)
        sharded_x = jax.device_put(x, jax.sharding.NamedSharding(
            mesh.backend_mesh, jax.sharding.PartitionSpec("batch")))
        fn, params = step(layer)
        (_, y), grads = fn(params, sharded_x)
        hlo = fn.lower(params, sharded_x).compile().as_text()
    gathered = [line for line in hlo.splitlines() if "all-gather(" in line
                and re.search(rf"f32\[{E},({WIDTH},{HIDDEN}|{HIDDEN},{WIDTH})\]", line)]
    result[str(shape)] = {
        "y_err": float(np.abs(np.asarray(y) - np.asarray(y_ref)).max()),
        "grad_err": {n: float(np.abs(np.asarray(a) - np.asarray(b)).max())
                     for n, a, b in zip(names, grads, g_ref)},
        "grad_norm": {n: float(np.abs(np.asarray(g)).max()) for n, g in zip(names, grads)},
        "specs": {v.path.split("/")[-1]: [str(a) for a in v.value.sharding.spec]
                  for v in layer.weights},
        "shard_shapes": {v.path.split("/")[-1]: sorted({tuple(s.data.shape)
                                                        for s in v.value.addressable_shards})
                         for v in layer.weights},
        "grad_specs": {n: [str(a) for a in g.sharding.spec] for n, g in zip(names, grads)},
        "expert_kernel_all_gathers": len(gathered),
        "activation_layout": str(distribution.get_tensor_layout(layer.path + "/expert_inputs")
                                 .axes),
    }
print("RESULT " + json.dumps(result))
'''


@pytest.mark.slow
def test_expert_parallel_matches_unsharded_layer():
    env = dict(os.environ, KERAS_BACKEND="jax",
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4"))
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, (out.stdout + out.stderr)[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    for shape, model_size in (("(1, 4)", 4), ("(2, 2)", 2)):
        r = result[shape]
        assert r["y_err"] < 1e-5, (shape, r["y_err"])
        for name, err in r["grad_err"].items():    # 1e-5 relative to the gradient's scale
            assert err < 1e-5 * max(1.0, r["grad_norm"][name]), (shape, name, err, r["grad_norm"])
            assert r["grad_norm"][name] > 1e-6, (shape, name)
        per_device = 4 // model_size
        assert r["specs"]["experts_kernel_in"] == ["model", "None", "None"]
        assert r["specs"]["experts_kernel_out"] == ["model", "None", "None"]
        assert r["specs"]["experts_bias_in"] == ["model", "None"]
        assert r["specs"]["experts_bias_out"] == ["model", "None"]
        assert r["shard_shapes"]["experts_kernel_in"] == [[per_device, 8, 16]]
        assert r["shard_shapes"]["experts_kernel_out"] == [[per_device, 16, 8]]
        assert r["shard_shapes"]["kernel"] == [[8, 4]]                  # router replicated
        assert r["grad_specs"]["experts_kernel_in"][0] == "model"    # gradients stay sharded
        assert r["expert_kernel_all_gathers"] == 0                    # weights never gathered
        assert r["activation_layout"] == "('model', 'batch', None, None)"
