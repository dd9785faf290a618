"""Global-batch contrastive losses: one device, MirroredStrategy on 2 logical CPUs, JAX on 2 (+4) host devices.

The multi-device checks run this file as a script in a subprocess (devices must be configured before the
first TensorFlow op / before JAX starts). Each worker compares, on the same global batch, the
distributed loss and gradients with the single-device loss functions of keras_mm.losses (themselves
checked against golden values in tests/keras_mm/losses) and prints one JSON line {check: max abs diff}.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
TOL = 1e-5
SPLITS = [[4, 4], [5, 3]]  # equal and uneven local batches (MirroredStrategy splits a batch of 7 into 4 + 3)
# sigmoid_chunked_static: the chunked form's TPU path (static, equal local batches), forced here on 4 + 4.
FORMS = ["softmax", "sigmoid", "sigmoid_chunked", "sigmoid_chunked_static"]


def make_batch(batch, seed=0, in_dim=6, dim=5):
    rng = np.random.default_rng(seed)
    raw_image = rng.normal(size=(batch, in_dim)).astype(np.float32)
    raw_text = (raw_image + rng.normal(size=(batch, in_dim))).astype(np.float32)
    w_image = (0.5 * rng.normal(size=(in_dim, dim))).astype(np.float32)
    w_text = (0.5 * rng.normal(size=(in_dim, dim))).astype(np.float32)
    return raw_image, raw_text, w_image, w_text


# ---------------------------------------------------------------------------------------- in-process
@pytest.mark.both_backends
def test_one_device_gather_is_identity_and_global_losses_are_the_losses():
    import keras

    from keras_mm.losses import pair_hits, sigmoid_loss, softmax_contrastive_loss
    from keras_mm.training import global_batch

    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 4)).astype(np.float32)
    text = rng.normal(size=(6, 4)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    assert global_batch.gather(image) is image
    assert global_batch.replica_info() == (0, 1)
    assert global_batch.local_row_offset(image) == 0
    sigmoid = float(sigmoid_loss(image, text, 1.0, -2.0))
    for chunked in (False, True):
        loss = global_batch.global_sigmoid_loss(image, text, 1.0, -2.0, chunked=chunked)
        assert float(loss) == pytest.approx(sigmoid, abs=TOL)
    assert float(global_batch.global_softmax_loss(image, text, 2.0)) == pytest.approx(
        float(softmax_contrastive_loss(image, text, 2.0)), abs=TOL)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(global_batch.global_pair_hits(image, text)),
                                  keras.ops.convert_to_numpy(pair_hits(image, text)))


def run_worker(kind, extra_env):
    env = dict(os.environ, **extra_env)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run([sys.executable, __file__, kind], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    assert result.returncode == 0, tail
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report, tail


def check_report(report, expected_keys, tail):
    missing = sorted(set(expected_keys) - set(report))
    assert not missing, f"missing checks {missing}\n{tail}"
    bad = {name: diff for name, diff in report.items() if not diff <= TOL}
    assert not bad, f"distributed != single device: {bad}"


def test_mirrored_strategy_two_replicas_equals_single_device():
    report, tail = run_worker("tf-mirrored", {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"})
    cases = [(form, "+".join(map(str, split))) for form in FORMS for split in SPLITS
             if form != "sigmoid_chunked_static" or split[0] == split[1]]
    expected = [f"{form}/{tag}/{what}" for form, tag in cases
                for what in ("loss", "grad_w_image", "grad_w_text", "grad_log_scale", "grad_image_emb",
                             "grad_text_emb", "sgd_step")]
    expected += [f"{form}/{tag}/grad_bias" for form, tag in cases if form != "softmax"]
    expected += [f"pair_hits/{'+'.join(map(str, split))}" for split in SPLITS]
    expected += ["replica_ids"]
    check_report(report, expected, tail)


def test_jax_two_host_devices_equals_single_device():
    from tests.xla_flags import xla_flags      # not at the top: this file also runs as a script

    report, tail = run_worker("jax", {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
                                      "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4")})
    sigmoid_modes = ("sigmoid_jit_sharded", "sigmoid_ring_mesh", "sigmoid_ring_keras_dp",
                     "sigmoid_shard_map_gathered", "sigmoid_shard_map_ring", "sigmoid_ring_4_devices")
    expected = [f"{mode}/{what}" for mode in sigmoid_modes
                for what in ("loss", "grad_image", "grad_text", "grad_log_scale", "grad_bias")]
    expected += [f"{mode}/{what}" for mode in ("softmax_jit_sharded", "softmax_shard_map_gathered")
                 for what in ("loss", "grad_image", "grad_text", "grad_log_scale")]
    expected += ["pair_hits_shard_map", "ring_uses_ppermute", "ring_keras_dp_uses_ppermute", "devices"]
    check_report(report, expected, tail)


# ------------------------------------------------------------------------------------------ TF worker
def tf_mirrored_worker():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras

    from keras_mm.layers.contrastive_logits import ContrastiveLogits
    from keras_mm.losses import pair_hits, sigmoid_loss, softmax_contrastive_loss
    from keras_mm.training import global_batch

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    equal_static_local_batches = global_batch._equal_static_local_batches
    report = {}

    def diff(name, a, b):
        report[name] = max(report.get(name, 0.0), float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))

    def normalise(x):
        return x / keras.ops.sqrt(keras.ops.sum(x * x, axis=1, keepdims=True))

    def distributed_loss(form, image_emb, text_emb, head):
        if form == "softmax":
            return global_batch.global_softmax_loss(image_emb, text_emb, head.log_scale)
        return global_batch.global_sigmoid_loss(image_emb, text_emb, head.log_scale, head.bias,
                                                chunked=form.startswith("sigmoid_chunked"))

    def single_device_loss(form, image_emb, text_emb, head):
        if form == "softmax":
            return softmax_contrastive_loss(image_emb, text_emb, head.log_scale)
        return sigmoid_loss(image_emb, text_emb, head.log_scale, head.bias)

    for split in SPLITS:
        tag = "+".join(map(str, split))
        raw_image, raw_text, w_image0, w_text0 = make_batch(sum(split), seed=len(split) + split[0])
        bounds = np.cumsum([0] + split)

        def per_replica(array):
            return strategy.experimental_distribute_values_from_function(
                lambda context: tf.constant(array[bounds[context.replica_id_in_sync_group]:
                                                  bounds[context.replica_id_in_sync_group + 1]]))

        image_in, text_in = per_replica(raw_image), per_replica(raw_text)
        for form in FORMS:
            if form == "sigmoid_chunked_static" and split[0] != split[1]:
                continue
            global_batch._equal_static_local_batches = (
                (lambda x: True) if form == "sigmoid_chunked_static" else equal_static_local_batches)
            loss_type = "softmax" if form == "softmax" else "sigmoid"
            # Single device: plain loss functions on the whole batch, default strategy.
            head = ContrastiveLogits(loss_type)
            w_image, w_text = keras.Variable(w_image0), keras.Variable(w_text0)
            variables = [w_image, w_text] + head.trainable_weights
            with tf.GradientTape() as tape:
                image_emb = normalise(keras.ops.matmul(raw_image, w_image))
                text_emb = normalise(keras.ops.matmul(raw_text, w_text))
                loss = single_device_loss(form, image_emb, text_emb, head)
            single_grads = tape.gradient(loss, variables + [image_emb, text_emb])
            single_loss = float(loss)
            single_hits = pair_hits(image_emb, text_emb).numpy()

            # Two replicas: strategy.run + GradientTape, Keras' optimizer applies the summed gradients.
            with strategy.scope():
                mirrored_head = ContrastiveLogits(loss_type)
                m_w_image, m_w_text = keras.Variable(w_image0), keras.Variable(w_text0)
                m_variables = [m_w_image, m_w_text] + mirrored_head.trainable_weights
                optimizer = keras.optimizers.SGD(learning_rate=1.0)
                optimizer.build(m_variables)

            @tf.function
            def step(image_in, text_in):
                def replica_fn(raw_image_local, raw_text_local):
                    with tf.GradientTape() as tape:
                        image_emb = normalise(keras.ops.matmul(raw_image_local, m_w_image))
                        text_emb = normalise(keras.ops.matmul(raw_text_local, m_w_text))
                        share = distributed_loss(form, image_emb, text_emb, mirrored_head)
                    grads = tape.gradient(share, m_variables + [image_emb, text_emb])
                    optimizer.apply_gradients(zip(grads[:len(m_variables)], m_variables))
                    hits = global_batch.global_pair_hits(image_emb, text_emb)
                    return share, grads, hits, global_batch.replica_info()[0]

                return strategy.run(replica_fn, (image_in, text_in))

            shares, grads, hits, replica_ids = step(image_in, text_in)
            local = strategy.experimental_local_results
            diff("replica_ids", [int(r) for r in local(replica_ids)], [0, 1])
            diff(f"{form}/{tag}/loss", sum(float(s) for s in local(shares)), single_loss)
            names = ["grad_w_image", "grad_w_text", "grad_log_scale"]
            names += ["grad_bias"] if loss_type == "sigmoid" else []
            for i, name in enumerate(names):
                diff(f"{form}/{tag}/{name}", sum(g.numpy() for g in local(grads[i])), single_grads[i].numpy())
            for offset, name in ((len(names), "grad_image_emb"), (len(names) + 1, "grad_text_emb")):
                diff(f"{form}/{tag}/{name}", np.concatenate([g.numpy() for g in local(grads[offset])]),
                     single_grads[offset].numpy())
            for variable, m_variable, grad in zip(variables, m_variables, single_grads):
                expected = keras.ops.convert_to_numpy(variable) - grad.numpy()  # SGD, learning rate 1
                for value in local(m_variable.value):
                    diff(f"{form}/{tag}/sgd_step", value.numpy(), expected)
            diff(f"pair_hits/{tag}", np.concatenate([h.numpy() for h in local(hits)]), single_hits)
    print(json.dumps(report))


# ----------------------------------------------------------------------------------------- JAX worker
def jax_worker():
    import jax
    import keras
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from keras_mm.losses import pair_hits, sigmoid_loss, softmax_contrastive_loss
    from keras_mm.training import global_batch

    assert keras.backend.backend() == "jax"
    # 4 host devices: the checks use a mesh of 2 (as on 2 devices); one extra ring runs over all 4, where a
    # chunk visited twice or skipped would show (a ring of 2 cannot tell).
    report = {"devices": float(abs(jax.device_count() - 4))}

    def diff(name, a, b):
        report[name] = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))

    raw_image, raw_text, w_image, w_text = make_batch(8, seed=7)
    image = raw_image @ w_image
    text = raw_text @ w_text
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
    sharded = NamedSharding(mesh, P("batch"))
    image_sharded, text_sharded = jax.device_put(image, sharded), jax.device_put(text, sharded)
    log_t, bias = np.float32(math.log(10.0)), np.float32(-10.0)
    log_scale = np.float32(math.log(1 / 0.07))

    def compare(mode, fn, reference, args):
        value, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)
        ref_value, ref_grads = reference
        diff(f"{mode}/loss", value, ref_value)
        names = ["grad_image", "grad_text", "grad_log_scale", "grad_bias"]
        for name, grad, ref_grad in zip(names, grads, ref_grads):
            diff(f"{mode}/{name}", grad, ref_grad)

    # Single device reference: the plain loss on the whole batch, not jitted, unsharded.
    sigmoid_reference = jax.value_and_grad(
        lambda x, y, t, b: sigmoid_loss(x, y, t, b), argnums=(0, 1, 2, 3))(image, text, log_t, bias)
    softmax_reference = jax.value_and_grad(
        lambda x, y, s: softmax_contrastive_loss(x, y, s), argnums=(0, 1, 2))(image, text, log_scale)
    sigmoid_args = (image_sharded, text_sharded, log_t, bias)

    # Gathered: one jitted program over the global (sharded) arrays; gather is the identity, XLA
    # inserts the collectives.
    compare("sigmoid_jit_sharded", lambda x, y, t, b: global_batch.global_sigmoid_loss(x, y, t, b),
            sigmoid_reference, sigmoid_args)
    compare("softmax_jit_sharded", lambda x, y, s: global_batch.global_softmax_loss(x, y, s),
            softmax_reference, (image_sharded, text_sharded, log_scale))

    # Chunked: the ppermute ring inside shard_map, mesh given explicitly ...
    def ring_on_mesh(x, y, t, b):
        return global_batch.global_sigmoid_loss(x, y, t, b, chunked=True, mesh=mesh)

    compare("sigmoid_ring_mesh", ring_on_mesh, sigmoid_reference, sigmoid_args)
    jaxpr = str(jax.make_jaxpr(ring_on_mesh)(*sigmoid_args))
    report["ring_uses_ppermute"] = 0.0 if ("ppermute" in jaxpr and "shard_map" in jaxpr) else 1.0

    # ... or taken from keras.distribution (DataParallel over the 2 devices), as in a Keras JAX train step.
    two_devices = keras.distribution.list_devices()[:2]
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=two_devices))
    try:
        def ring_on_keras_mesh(x, y, t, b):
            return global_batch.global_sigmoid_loss(x, y, t, b, chunked=True)

        compare("sigmoid_ring_keras_dp", ring_on_keras_mesh, sigmoid_reference, sigmoid_args)
        jaxpr = str(jax.make_jaxpr(ring_on_keras_mesh)(*sigmoid_args))
        report["ring_keras_dp_uses_ppermute"] = 0.0 if ("ppermute" in jaxpr and "shard_map" in jaxpr) else 1.0
    finally:
        keras.distribution.set_distribution(None)

    mesh_4 = Mesh(np.array(jax.devices()[:4]), ("batch",))
    compare("sigmoid_ring_4_devices",
            lambda x, y, t, b: global_batch.global_sigmoid_loss(x, y, t, b, chunked=True, mesh=mesh_4),
            sigmoid_reference, (jax.device_put(image, NamedSharding(mesh_4, P("batch"))),
                                jax.device_put(text, NamedSharding(mesh_4, P("batch"))), log_t, bias))

    # Inside the caller's own shard_map: per-device shares, psum'd.
    def in_shard_map(loss_fn, n_scalars):
        def per_device(x, y, *scalars):
            return jax.lax.psum(loss_fn(x, y, *scalars), "batch")

        return jax.shard_map(per_device, mesh=mesh, in_specs=(P("batch"), P("batch")) + (P(),) * n_scalars,
                             out_specs=P())

    for chunked, mode in ((False, "sigmoid_shard_map_gathered"), (True, "sigmoid_shard_map_ring")):
        compare(mode, in_shard_map(lambda x, y, t, b, c=chunked: global_batch.global_sigmoid_loss(
            x, y, t, b, chunked=c, axis_name="batch"), 2), sigmoid_reference, sigmoid_args)
    compare("softmax_shard_map_gathered", in_shard_map(
        lambda x, y, s: global_batch.global_softmax_loss(x, y, s, axis_name="batch"), 1),
        softmax_reference, (image_sharded, text_sharded, log_scale))
    hits = jax.shard_map(lambda x, y: global_batch.global_pair_hits(x, y, axis_name="batch"), mesh=mesh,
                         in_specs=(P("batch"), P("batch")), out_specs=P("batch"))(image_sharded, text_sharded)
    diff("pair_hits_shard_map", hits, pair_hits(image, text))
    print(json.dumps(report))


if __name__ == "__main__":
    {"tf-mirrored": tf_mirrored_worker, "jax": jax_worker}[sys.argv[1]]()
