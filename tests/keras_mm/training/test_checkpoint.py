"""keras_mm.training.checkpoint: atomic checkpoints, resume with the input position, kills.

The kill tests run tests/keras_mm/training/scripts/resume_run.py in subprocesses and SIGKILL them (once at
a train step, once in the middle of writing a checkpoint); the restarted run must end with the weights of
an uninterrupted run with the same seed.
"""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_mm.training import callbacks as CB
from keras_mm.training import checkpoint as K
from keras_mm.training import optimizer as O
from tests.keras_mm.training.scripts.digits_training import (compile_model, digits_arrays,
                                                              make_dataset, make_model)
from tests.keras_mm.training.scripts.digits_training import optimizer_config as opt_config

ROOT = pathlib.Path(__file__).resolve().parents[3]


def numpy_values(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def trained_model(steps=3, seed=0):
    keras.utils.set_random_seed(seed)
    model = make_model()
    compile_model(model, O.make_optimizer(opt_config(lr=1e-2, weight_decay=0.1, warmup_steps=1),
                                          total_steps=10))
    x, y = digits_arrays()
    model.fit(x[:16 * steps], y[:16 * steps], batch_size=16, epochs=1, verbose=0)
    return model


def fresh_model(seed=1, hidden=32):
    keras.utils.set_random_seed(seed)
    model = make_model(hidden=hidden)
    compile_model(model, O.make_optimizer(opt_config(lr=1e-2, weight_decay=0.1, warmup_steps=1),
                                          total_steps=10))
    return model


# ------------------------------------------------------------------------------------ save / restore
@pytest.mark.both_backends
def test_save_and_restore_model_and_optimizer_state(tmp_path):
    model = trained_model()
    checkpointer = K.Checkpointer(tmp_path, keep=2, write=True)
    path = checkpointer.save(3, model, model.optimizer, extra={"note": "x"})
    assert os.path.basename(path) == "ckpt-00000003"
    assert sorted(os.listdir(path)) == ["manifest.json", "state.npz"]
    manifest = json.loads(pathlib.Path(path, "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["extra"] == {"note": "x"}
    paths = [v["path"] for v in manifest["model_variables"]]
    assert any("seed_generator" in p for p in paths)          # dropout's RNG state is saved too
    assert any("iteration" in v["path"] for v in manifest["optimizer_variables"])

    restored = fresh_model()
    assert not restored.optimizer.built
    saved = numpy_values(model.variables) + numpy_values(model.optimizer.variables)
    before = numpy_values(restored.variables)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, saved))
    assert checkpointer.restore_latest(restored, restored.optimizer) == 3
    assert restored.optimizer.built
    got = numpy_values(restored.variables) + numpy_values(restored.optimizer.variables)
    assert len(got) == len(saved)
    for a, b in zip(got, saved):
        np.testing.assert_array_equal(a, b)
    assert K.restore_latest(fresh_model(), None, tmp_path) == 3  # the function form, weights only


def test_restore_checks_the_model(tmp_path):
    checkpointer = K.Checkpointer(tmp_path, write=True)
    checkpointer.save(3, trained_model(), None)

    class Unbuilt(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    with pytest.raises(K.CheckpointError, match="is not built: call it on a batch"):
        checkpointer.restore_latest(Unbuilt())
    with pytest.raises(K.CheckpointError, match=r"model variable 0 \(digits_mlp/hidden/kernel\) has "
                                                r"shape \[64, 32\], the model's .* has \[64, 16\]"):
        checkpointer.restore_latest(fresh_model(hidden=16))
    bigger = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32), keras.layers.Dense(10),
                               keras.layers.Dense(10)])
    with pytest.raises(K.CheckpointError, match="has 7 model variables, the model has 6"):
        checkpointer.restore_latest(bigger)
    with pytest.raises(K.CheckpointError, match="no complete checkpoint of step 4"):
        checkpointer.restore_step(4, fresh_model())


def test_keep_prunes_to_the_newest(tmp_path):
    model = fresh_model()
    checkpointer = K.Checkpointer(tmp_path, keep=2, write=True)
    assert checkpointer.latest() is None and checkpointer.latest_step() == 0
    for step in (10, 20, 30, 40):
        checkpointer.save(step, model)
    assert [c.step for c in checkpointer.checkpoints()] == [30, 40]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000030", "ckpt-00000040"]
    assert checkpointer.latest_step() == 40
    checkpointer.save(40, model)  # the same step again (a rerun) replaces it
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000030", "ckpt-00000040"]
    assert not K.Checkpointer(tmp_path / "other", write=False).write
    assert not (tmp_path / "other").exists()          # a non-writing process creates nothing
    assert K.Checkpointer(tmp_path / "other", write=False).save(1, model) is None


@pytest.mark.parametrize("stage", ["state_written", "before_commit"])
def test_interrupted_save_is_never_restored(tmp_path, monkeypatch, stage):
    model = trained_model()
    checkpointer = K.Checkpointer(tmp_path, keep=3, write=True)
    checkpointer.save(1, model, model.optimizer)
    good = numpy_values(model.variables)

    def crash(at, path):
        if at == stage:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(K, "_test_hook", crash)
    model.variables[0].assign(np.zeros(model.variables[0].shape))
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(2, model, model.optimizer)
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert len(leftovers) == 1 and "ckpt-00000002" not in os.listdir(tmp_path)
    assert checkpointer.latest_step() == 1
    restored = fresh_model()
    assert checkpointer.restore_latest(restored) == 1
    for a, b in zip(numpy_values(restored.variables), good):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(K, "_test_hook", None)
    checkpointer.save(3, model, model.optimizer)       # the next save cleans up
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001", "ckpt-00000003"]


def test_corrupt_or_incomplete_checkpoints_are_skipped(tmp_path, caplog):
    model = fresh_model()
    checkpointer = K.Checkpointer(tmp_path, keep=5, write=True)
    for step in (1, 2, 3):
        checkpointer.save(step, model)
    with open(tmp_path / "ckpt-00000003" / "state.npz", "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger=K.__name__):
        assert checkpointer.latest_step() == 2
    assert "ckpt-00000003" in caplog.text
    os.remove(tmp_path / "ckpt-00000002" / "manifest.json")
    assert checkpointer.latest_step() == 1
    data = bytearray((tmp_path / "ckpt-00000001" / "state.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF                      # same size, one byte flipped
    (tmp_path / "ckpt-00000001" / "state.npz").write_bytes(bytes(data))
    assert checkpointer.latest() is None
    assert checkpointer.restore_latest(model) == 0
    with pytest.raises(K.CheckpointError, match="not a complete checkpoint"):
        checkpointer.restore(tmp_path / "ckpt-00000001", model)


def test_bfloat16_variables_round_trip_bit_exact(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="bfloat16")])
    kernel = model.layers[0].kernel
    assert kernel.dtype == "bfloat16"
    saved = np.array(keras.ops.convert_to_numpy(kernel))
    checkpointer = K.Checkpointer(tmp_path, write=True)
    checkpointer.save(1, model)
    kernel.assign(np.zeros(kernel.shape))
    checkpointer.restore_latest(model)
    restored = np.array(keras.ops.convert_to_numpy(kernel))
    assert restored.dtype == saved.dtype
    np.testing.assert_array_equal(restored.view(np.uint16), saved.view(np.uint16))


def test_write_config_next_to_the_checkpoints(tmp_path):
    from keras_mm.recipes import config as C

    checkpointer = K.Checkpointer(tmp_path, write=True)
    config = C.override(C.ExperimentConfig(), ["train.steps=40", "train.checkpoint_every=20"])
    path = checkpointer.write_config(config)
    assert path == str(tmp_path / "config.json")
    assert C.load(path) == config
    checkpointer.write_config(config)                  # unchanged: nothing else written
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    changed = C.override(config, ["optimizer.lr=0.01"])
    checkpointer.write_config(changed)                 # a resumed run with other settings
    assert C.load(path) == changed
    backups = [n for n in os.listdir(tmp_path) if n != "config.json"]
    assert len(backups) == 1 and C.load(tmp_path / backups[0]) == config
    checkpointer.write_config({"plain": 1})
    assert json.loads(pathlib.Path(path).read_text()) == {"plain": 1}


# --------------------------------------------------------------------------------- input position
def test_resumable_dataset_gives_every_iterator_the_same_stream():
    import tensorflow as tf

    def make():
        ds = tf.data.Dataset.range(10).shuffle(10, seed=1, reshuffle_each_iteration=True).repeat()
        options = tf.data.Options()
        options.deterministic = True
        options.experimental_slack = True
        return ds.with_options(options)

    plain = make()
    first, second = [list(plain.take(12).as_numpy_iterator()) for _ in range(2)]
    assert first != second                             # why the wrapper exists
    resumable = K.resumable_dataset(make)
    streams = [list(resumable.take(25).as_numpy_iterator()) for _ in range(2)]
    assert streams[0] == streams[1] == list(make().take(25).as_numpy_iterator())
    skipped = K.resumable_dataset(make, skip_batches=7)
    assert list(skipped.take(18).as_numpy_iterator()) == streams[0][7:]
    assert skipped.options().experimental_slack is True  # the pipeline's options are kept
    with pytest.raises(ValueError, match="skip_batches must be >= 0"):
        K.resumable_dataset(make, -1)


def test_batches_per_step():
    import tensorflow as tf

    assert K.batches_per_step() == 1
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1,
                                         num_replicas_in_sync=8)
    assert K.batches_per_step(context) == 4
    assert K.batches_per_step(tf.distribute.InputContext(1, 0, 1)) == 1


def test_resume_fit_kwargs():
    assert K.resume_fit_kwargs(0, 100) == {"epochs": 1, "initial_epoch": 0, "steps_per_epoch": 100}
    assert K.resume_fit_kwargs(30, 100) == {"epochs": 1, "initial_epoch": 0, "steps_per_epoch": 70}
    assert K.resume_fit_kwargs(100, 100)["epochs"] == 0      # done: fit runs nothing
    assert K.resume_fit_kwargs(30, 100, 10) == {"epochs": 10, "initial_epoch": 3,
                                                "steps_per_epoch": 10}
    with pytest.raises(ValueError, match="must be multiples of it"):
        K.resume_fit_kwargs(35, 100, 10)
    with pytest.raises(ValueError, match="outside"):
        K.resume_fit_kwargs(101, 100)


# ------------------------------------------------------------------------------------------ resume
def _train(directory, total, every, stop_at=None, steps_per_epoch=None):
    """A fresh process's view: seed, model, dataset skipped to the checkpoint, fit to ``total``."""
    keras.utils.set_random_seed(7)
    checkpointer = K.Checkpointer(directory, keep=2, write=True)
    initial = checkpointer.latest_step()
    model = make_model()
    compile_model(model, O.make_optimizer(
        opt_config(lr=3e-3, end_lr=1e-4, weight_decay=0.1, warmup_steps=3, clip=1.0),
        total_steps=total))
    dataset = K.resumable_dataset(lambda: make_dataset(16, seed=3), initial)
    saver = CB.CheckpointCallback(checkpointer, every, initial_step=initial,
                                  save_at_end=stop_at is None)

    class Stop(CB._GlobalStepCallback):  # an interruption after step ``stop_at`` (not saved)
        def on_train_batch_end(self, batch, logs=None):
            self._advance(batch)
            if self.global_step == stop_at:
                self.model.stop_training = True

    model.fit(dataset, verbose=0, callbacks=[saver, Stop(initial)],
              **K.resume_fit_kwargs(initial, total, steps_per_epoch))
    return initial, saver.global_step, numpy_values(model.variables)


@pytest.mark.both_backends
@pytest.mark.parametrize("steps_per_epoch", [None, 4])
def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, steps_per_epoch):
    _, steps, reference = _train(tmp_path / "a", 12, 4, steps_per_epoch=steps_per_epoch)
    assert steps == 12
    start, stopped, _ = _train(tmp_path / "b", 12, 4, stop_at=7, steps_per_epoch=steps_per_epoch)
    assert (start, stopped) == (0, 7)
    assert K.Checkpointer(tmp_path / "b", write=False).latest_step() == 4
    start, steps, resumed = _train(tmp_path / "b", 12, 4, steps_per_epoch=steps_per_epoch)
    assert (start, steps) == (4, 12)
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(resumed, numpy_values(
        make_model().variables)))                     # it trained
    for a, b in zip(resumed, reference):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- kills
def _script(out, *args):
    return [sys.executable, "-m", "tests.keras_mm.training.scripts.resume_run", str(out),
            *map(str, args)]


def _run(out, *args, timeout=240):
    result = subprocess.run(_script(out, *args), cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    return result.returncode, "\n".join((result.stdout + result.stderr).splitlines()[-30:])


@pytest.mark.slow
def test_sigkill_at_a_step_and_during_a_save_resume_to_the_uninterrupted_weights(tmp_path):
    reference = subprocess.Popen(_script(tmp_path / "reference"), cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    chain = tmp_path / "chain"
    checkpoints = K.Checkpointer(chain / "checkpoints", write=False)

    # 1. SIGKILL at step 13 (checkpoints every 5, keep 2): resumes from 10.
    code, tail = _run(chain, "--kill-at-step", 13)
    assert code == -signal.SIGKILL, tail
    assert checkpoints.latest_step() == 10

    # 2. Restarted, SIGKILLed while writing the checkpoint of step 20 (state.npz written, no
    #    manifest, not renamed): 15 stays the newest complete checkpoint.
    proc = subprocess.Popen(_script(chain, "--hang-in-save-at", 20), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (chain / "hanging").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    partial = pathlib.Path((chain / "hanging").read_text())
    assert (partial / "state.npz").exists() and not (partial / "manifest.json").exists()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert partial.exists()                                    # the torn write is still there...
    assert checkpoints.latest_step() == 15                     # ...and never picked up

    # 3. Restarted again: resumes from 15 and finishes.
    code, tail = _run(chain)
    assert code == 0, tail
    out, _ = reference.communicate(timeout=240)
    assert reference.returncode == 0, out[-3000:]

    starts = [json.loads(line)["initial_step"]
              for line in (chain / "starts.jsonl").read_text().splitlines()]
    assert starts == [0, 10, 15]
    final = json.loads((chain / "final.json").read_text())
    assert final == json.loads((tmp_path / "reference" / "final.json").read_text())
    assert final == {"step": 25, "iterations": 25}
    ours, theirs = np.load(chain / "final.npz"), np.load(tmp_path / "reference" / "final.npz")
    assert ours.files == theirs.files and len(ours.files) > 5
    for name in ours.files:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-6, rtol=0)
    # No corrupt checkpoint left: the torn one is gone, the kept ones verify.
    names = sorted(os.listdir(chain / "checkpoints"))
    assert names == ["ckpt-00000020", "ckpt-00000025"]
    assert [c.step for c in checkpoints.checkpoints()] == [20, 25]
