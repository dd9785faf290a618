"""keras_mm.training.callbacks: checkpoint cadence at the global step, TensorBoard scalars."""

import glob
import os

import keras
import numpy as np
import pytest

from keras_mm.training import callbacks as CB
from keras_mm.training import checkpoint as K
from keras_mm.training import optimizer as O
from tests.keras_mm.training.scripts.digits_training import digits_arrays, make_model
from tests.keras_mm.training.scripts.digits_training import optimizer_config as opt_config
from tests.keras_mm.training.scripts.digits_training import schedule_formula as reference


def read_scalars(directory):
    """{tag: {step: value}} of every event file under ``directory`` (independent of the writer)."""
    import tensorflow as tf

    scalars = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return scalars


class Scale(keras.metrics.Metric):
    """A model-specific scalar logged like a contrastive model's ``t``: the mean of y_pred."""

    def __init__(self, name="t"):
        super().__init__(name=name)
        self.total = self.add_variable((), initializer="zeros", name="total")
        self.count = self.add_variable((), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.total.assign_add(keras.ops.mean(keras.ops.cast(y_pred, "float32")))
        self.count.assign_add(1.0)

    def result(self):
        return self.total / keras.ops.maximum(self.count, 1.0)


def model_and_data(total_steps, batch=16, steps=None, steps_per_execution=1):
    keras.utils.set_random_seed(0)
    model = make_model()
    opt = O.make_optimizer(opt_config(lr=1e-2, end_lr=1e-3, warmup_steps=4), total_steps=total_steps)
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"), Scale()],
                  steps_per_execution=steps_per_execution)
    x, y = digits_arrays()
    n = batch * (steps or total_steps)
    return model, x[:n], y[:n]


@pytest.mark.both_backends
def test_scalar_logger_writes_metrics_lr_and_throughput_at_the_global_step(tmp_path):
    total, initial, batch = 112, 100, 16   # a run resumed at step 100, 12 steps left
    model, x, y = model_and_data(total, batch=batch, steps=total - initial)
    # Resumed optimizer state: its step counter continues (the schedule reads it).
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(initial)
    logger = CB.ScalarLogger(tmp_path, every=4, global_batch_size=batch, initial_step=initial,
                             write=True)
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    scalars = read_scalars(tmp_path / "train")
    assert {"loss", "accuracy", "t", "learning_rate", "step_time_seconds",
            "examples_per_second"} <= set(scalars)
    assert sorted(scalars["loss"]) == [104, 108, 112]
    for step in (104, 108, 112):
        # the rate of the next update: the schedule at the optimizer's step (= the global step here)
        assert scalars["learning_rate"][step] == pytest.approx(
            reference(step, 1e-2, total, 4, 1e-3), rel=1e-5, abs=1e-9)
    # timing starts after the first (tracing) step: 104 covers 101..104, three steps
    for step in (104, 108, 112):
        step_time = scalars["step_time_seconds"][step]
        assert 0 < step_time < 30
        assert scalars["examples_per_second"][step] == pytest.approx(batch / step_time, rel=1e-4)
    assert 0 <= scalars["accuracy"][112] <= 1
    assert np.isfinite(scalars["t"][112])


def test_scalar_logger_eval_scalars_and_validation_logs(tmp_path):
    model, x, y = model_and_data(8)
    logger = CB.ScalarLogger(tmp_path, every=100, initial_step=40, write=True)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[logger],
              validation_data=(x[:32], y[:32]))
    logger.log_scalars({"zero_shot_top1": 0.5, "name": "not a number"}, step=7)
    logger.on_train_end()
    scalars = read_scalars(tmp_path / "eval")
    assert sorted(scalars["loss"]) == [48, 56]     # val_loss at the global step ending each epoch (8 steps)
    assert sorted(scalars["accuracy"]) == [48, 56]
    assert scalars["zero_shot_top1"] == {7: 0.5}
    assert "name" not in scalars
    silent = CB.ScalarLogger(tmp_path / "silent", write=False)
    silent.log_scalars({"a": 1.0}, step=1)
    assert not (tmp_path / "silent").exists()


class Recorder:
    """A Checkpointer stand-in that records the steps it is asked to save."""

    def __init__(self):
        self.saved, self.restored = [], []

    def save(self, step, model, optimizer=None, extra=None):
        self.saved.append(step)

    def restore_step(self, step, model, optimizer=None):
        self.restored.append(step)
        return step


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_checkpoint_cadence_counts_global_steps(steps_per_execution):
    model, x, y = model_and_data(12, steps=6, steps_per_execution=steps_per_execution)
    recorder = Recorder()
    saver = CB.CheckpointCallback(recorder, every=4, initial_step=20)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[saver])
    # 12 steps from 20 (2 epochs of 6): saves at 24, 28 and 32 (the end, already saved)
    assert recorder.restored == [20]
    assert recorder.saved == [24, 28, 32]
    assert saver.global_step == 32
    model.fit(x[:16 * 2], y[:16 * 2], batch_size=16, verbose=0, callbacks=[saver])
    assert saver.global_step == 22 and recorder.saved[-1] == 22   # a new fit starts at initial_step


def test_checkpoint_callback_without_restore_or_final_save():
    model, x, y = model_and_data(8, steps=5)
    recorder = Recorder()
    saver = CB.CheckpointCallback(recorder, every=3, restore=False, save_at_end=False)
    model.fit(x, y, batch_size=16, verbose=0, shuffle=False, callbacks=[saver])
    assert recorder.restored == [] and recorder.saved == [3]
    with pytest.raises(ValueError, match="every must be >= 1"):
        CB.CheckpointCallback(recorder, every=0)


def test_checkpoint_callback_restores_the_resumed_step(tmp_path):
    model, x, y = model_and_data(8, steps=4)
    model.fit(x, y, batch_size=16, verbose=0, shuffle=False)
    checkpointer = K.Checkpointer(tmp_path, write=True)
    checkpointer.save(4, model, model.optimizer)
    saved = [np.array(keras.ops.convert_to_numpy(v)) for v in model.trainable_variables]

    fresh, _, _ = model_and_data(8, steps=4)

    class Capture(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                self.weights = [np.array(keras.ops.convert_to_numpy(v))
                                for v in self.model.trainable_variables]

    capture = Capture()
    fresh.fit(x[:16], y[:16], batch_size=16, verbose=0, callbacks=[
        CB.CheckpointCallback(checkpointer, every=100, initial_step=4, save_at_end=False), capture])
    for a, b in zip(capture.weights, saved):     # fit started from the checkpoint's weights
        np.testing.assert_array_equal(a, b)


def test_training_callbacks(tmp_path):
    checkpointer = K.Checkpointer(tmp_path / "ckpt", write=True)
    callbacks = CB.training_callbacks(checkpointer, 10, checkpoint_every=5, log_dir=tmp_path / "tb",
                                      log_every=2, global_batch_size=8)
    kinds = [type(c) for c in callbacks]
    assert kinds == [CB.CheckpointCallback, CB.ScalarLogger, keras.callbacks.TensorBoard]
    assert callbacks[0].every == 5 and callbacks[0].initial_step == 10
    assert callbacks[1].every == 2 and callbacks[1].global_batch_size == 8
    assert len(CB.training_callbacks(checkpointer, 0, 5, tmp_path, keras_tensorboard=False)) == 2
