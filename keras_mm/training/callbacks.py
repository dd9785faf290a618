"""Callbacks of a training run: checkpoints every N steps with resume, TensorBoard scalars at the global step.

Both count *global* train steps: ``initial_step`` (the resumed checkpoint's step) plus the batches this
``fit`` has run, so summaries and checkpoints continue where a killed run stopped (Keras' own TensorBoard
callback restarts its batch counter at 0 in every ``fit``). ``steps_per_execution`` > 1 is handled (the
count jumps by it); keep ``checkpoint_every`` and ``log_every`` multiples of it.

A fit loop (see keras_mm.training.checkpoint for the dataset side)::

    checkpointer = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=train.keep)
    initial_step = checkpointer.latest_step()
    callbacks = training_callbacks(checkpointer, initial_step, checkpoint_every=train.checkpoint_every,
                                   log_dir=os.path.join(out_dir, "tensorboard"),
                                   log_every=train.log_every, global_batch_size=batch_size)
    model.fit(dataset, callbacks=callbacks, **resume_fit_kwargs(initial_step, train.steps))

TensorBoard scalars (``<log_dir>/train``, step = global step): every value ``fit`` logs (loss and the
model's metrics, e.g. a contrastive model's ``t`` and ``b``), ``learning_rate`` (the rate of the next
update), ``step_time_seconds`` and ``examples_per_second`` (wall time between logs divided by the steps,
so it includes input and callbacks; the first interval starts after the first step, excluding tracing).
Validation logs of ``fit`` (``val_*``) and ``ScalarLogger.log_scalars`` go to ``<log_dir>/eval``.
"""

import os
import time

import keras
import numpy as np

from keras_mm.training.optimizer import current_learning_rate


class _GlobalStepCallback(keras.callbacks.Callback):
    """Tracks ``self.global_step`` = ``initial_step`` + batches run in this fit."""

    def __init__(self, initial_step=0):
        super().__init__()
        self.initial_step = int(initial_step)
        self.global_step = self.initial_step
        self._epoch_base = self.initial_step

    def on_train_begin(self, logs=None):
        self.global_step = self._epoch_base = self.initial_step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_base = self.global_step

    def _advance(self, batch):
        """Updates the step after ``on_train_batch_end(batch)``; returns the step before."""
        before = self.global_step
        self.global_step = self._epoch_base + int(batch) + 1
        return before


def _crossed(before, after, every):
    return every > 0 and after // every > before // every


class CheckpointCallback(_GlobalStepCallback):
    """Restores the resumed checkpoint when training begins and saves every ``every`` steps.

    Args:
      checkpointer: a keras_mm.training.checkpoint.Checkpointer.
      every: save when the global step reaches a multiple of it.
      initial_step: the step training resumes from (``checkpointer.latest_step()``); 0 for a fresh run.
      restore: restore the checkpoint of ``initial_step`` in ``on_train_begin`` (after ``fit`` has built
        the model and the optimizer). Pass False if you restored it yourself.
      save_at_end: also save at the end of ``fit`` when the last step is not a multiple of ``every``.
    """

    def __init__(self, checkpointer, every, initial_step=0, restore=True, save_at_end=True):
        super().__init__(initial_step)
        if every < 1:
            raise ValueError(f"checkpoint every must be >= 1, got {every}")
        self.checkpointer = checkpointer
        self.every = int(every)
        self.restore = restore
        self.save_at_end = save_at_end
        self.last_saved = self.initial_step

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.last_saved = self.initial_step
        if self.restore and self.initial_step > 0:
            model = self.model
            self.checkpointer.restore_step(self.initial_step, model, model.optimizer)

    def _save(self):
        model = self.model
        self.checkpointer.save(self.global_step, model, model.optimizer)
        self.last_saved = self.global_step

    def on_train_batch_end(self, batch, logs=None):
        before = self._advance(batch)
        if _crossed(before, self.global_step, self.every):
            self._save()

    def on_train_end(self, logs=None):
        if self.save_at_end and self.global_step > self.last_saved:
            self._save()


def _scalar(value):
    try:
        array = np.asarray(keras.ops.convert_to_numpy(value))
    except Exception:  # strings, nested structures...
        return None
    if array.size != 1 or array.dtype.kind not in "biuf":
        return None
    return float(array.reshape(()))


class ScalarLogger(_GlobalStepCallback):
    """TensorBoard scalars every ``every`` global steps (see the module docstring).

    Args:
      log_dir: TensorBoard directory (``train`` and ``eval`` sub-directories are written).
      every: log period in steps.
      global_batch_size: examples per train step over all replicas (for ``examples_per_second``);
        None leaves that scalar out.
      initial_step: the resumed step.
      write: whether this process writes (default: ``strategy.is_chief()``).
    """

    def __init__(self, log_dir, every=100, global_batch_size=None, initial_step=0, write=None):
        super().__init__(initial_step)
        if every < 1:
            raise ValueError(f"log every must be >= 1, got {every}")
        self.log_dir = str(log_dir)
        self.every = int(every)
        self.global_batch_size = global_batch_size
        if write is None:
            from keras_mm.training.strategy import is_chief

            write = is_chief()
        self.write = bool(write)
        self._writers = {}
        self._mark = None  # (time, step) the current timing interval started at

    def _writer(self, split):
        import tensorflow as tf

        if not self._writers and keras.backend.backend() != "tensorflow":
            # TensorFlow only writes summaries here: keep it off the accelerators JAX uses.
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:  # TensorFlow already initialised its devices
                pass
        if split not in self._writers:
            self._writers[split] = tf.summary.create_file_writer(os.path.join(self.log_dir, split))
        return self._writers[split]

    def log_scalars(self, scalars, step=None, split="eval"):
        """Writes ``{name: number}`` at ``step`` (default: the current global step) to ``<log_dir>/<split>``."""
        if not self.write:
            return
        import tensorflow as tf

        step = self.global_step if step is None else int(step)
        with self._writer(split).as_default(step=step):
            for name, value in scalars.items():
                value = _scalar(value)
                if value is not None:
                    tf.summary.scalar(name, value)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._mark = None

    def on_train_batch_end(self, batch, logs=None):
        before = self._advance(batch)
        now = time.perf_counter()
        if self._mark is None:
            self._mark = (now, self.global_step)  # timing starts after the first (tracing) step
        if not _crossed(before, self.global_step, self.every):
            return
        scalars = dict(logs or {})
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            scalars["learning_rate"] = current_learning_rate(optimizer)
        start, start_step = self._mark
        steps = self.global_step - start_step
        if steps > 0 and now > start:
            scalars["step_time_seconds"] = (now - start) / steps
            if self.global_batch_size:
                scalars["examples_per_second"] = self.global_batch_size * steps / (now - start)
        self.log_scalars(scalars, split="train")
        self._mark = (time.perf_counter(), self.global_step)

    def on_epoch_end(self, epoch, logs=None):
        evals = {k[len("val_"):]: v for k, v in (logs or {}).items() if k.startswith("val_")}
        if evals:
            self.log_scalars(evals, split="eval")

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.flush()


def training_callbacks(checkpointer, initial_step, checkpoint_every, log_dir, log_every=100,
                       global_batch_size=None, keras_tensorboard=True):
    """[CheckpointCallback, ScalarLogger(, keras.callbacks.TensorBoard)] of a run.

    The Keras TensorBoard callback (``update_freq="epoch"``, no graph; on the chief only) adds its
    epoch summaries (x axis: the global epoch) and is where profiling options go; the step-level
    scalars come from ScalarLogger. Append the run's own callbacks (evaluation...) after these.
    """
    callbacks = [
        CheckpointCallback(checkpointer, checkpoint_every, initial_step=initial_step),
        ScalarLogger(log_dir, every=log_every, global_batch_size=global_batch_size,
                     initial_step=initial_step),
    ]
    if keras_tensorboard and callbacks[1].write:  # the chief only, like the ScalarLogger
        callbacks.append(keras.callbacks.TensorBoard(log_dir, write_graph=False, update_freq="epoch"))
    return callbacks
