"""Checkpoints every N steps, written atomically, and resume after a kill with the input position.

Layout of a checkpoint directory (``<out_dir>/checkpoints``)::

    config.json               the run's resolved config (``Checkpointer.write_config``)
    ckpt-00000500/            one complete checkpoint per kept step
        state.npz             model.variables (weights + RNG seed states) and optimizer.variables
        manifest.json         step, variable paths / shapes / dtypes, state.npz's size and sha256
    .tmp-ckpt-00000600-<id>/  a checkpoint being written (never read; removed by the next save)

Atomicity. ``save`` writes ``state.npz``, then ``manifest.json`` (fsynced) into a hidden temporary
directory and renames it to ``ckpt-<step>`` last; ``latest`` only considers ``ckpt-<step>`` directories
whose manifest parses and whose ``state.npz`` has the recorded size and sha256. A process killed at any
point of a save leaves either the previous checkpoints only (plus a temporary directory nothing reads) or
the complete new one. The check also protects object stores where a rename is a copy (gs://). The
``keep`` newest complete checkpoints are kept.

The format is backend-agnostic (NumPy arrays of ``model.variables`` and ``optimizer.variables``, matched by
position and checked by shape; bfloat16 stored bit-exact), so a run resumes on TensorFlow (any
tf.distribute strategy: values are read from / assigned to every replica) and on JAX. Metric variables are
not saved (metrics restart at each fit).

Input position: deterministic skip. The training stream is a pure function of the seed (a deterministic
tf.data pipeline: fixed seeds, ``deterministic`` map / interleave) and Keras' ``fit`` consumes exactly one
batch per step and replica, so resuming at step s skips the first ``s * batches_per_step`` batches of a
fresh stream (``resumable_dataset``). Chosen over checkpointing the tf.data iterator because Keras' ``fit``
owns its iterator (it cannot be handed a restored one, and a tf.distribute iterator would need the
strategy's own checkpointing), and a shuffle buffer of serialized records in every checkpoint is large.
Cost: skipped batches are produced (read, decoded) again; a pipeline can make the skip cheap by skipping
serialized records before its decode ``map`` (same stream, since its augmentation seeds come from the
example index). ``resumable_dataset`` also makes every iterator of the dataset yield the same stream (a
``shuffle(..., reshuffle_each_iteration=True)`` otherwise gives each new iterator, e.g. the one Keras
opens to build the model, a different order).

Exactness needs a deterministic stream: ``keras_mm.pipelines.datasets.train_dataset`` as of now maps and
interleaves with ``deterministic=False`` (faster), so a resumed run sees the right number of batches but
not necessarily the same ones in the same order; exact resume also wants
``tf.config.experimental.enable_op_determinism()`` (TrainConfig.deterministic).

A whole training run (the ``kmm train`` glue; ``cfg`` an ExperimentConfig)::

    from keras_mm.training import callbacks, checkpoint, optimizer, strategy
    from keras_mm.training.mixed_precision import set_precision

    keras.utils.set_random_seed(cfg.train.seed)
    set_precision(cfg.train.precision)                      # before building the model
    dist = strategy.make_strategy(cfg.train.strategy, tpu=cfg.train.tpu, devices=cfg.train.devices)
    checkpointer = checkpoint.Checkpointer(os.path.join(cfg.train.out_dir, "checkpoints"),
                                           keep=cfg.train.keep)
    checkpointer.write_config(cfg)                          # the resolved config, next to them
    initial_step = checkpointer.latest_step()               # 0 for a fresh run

    def dataset_fn(input_context):
        return checkpoint.resumable_dataset(
            lambda: train_dataset(cfg.data.folder, cfg.data.input, input_context=input_context),
            skip_batches=initial_step * checkpoint.batches_per_step(input_context))

    dataset = dist.distribute_datasets_from_function(dataset_fn)
    with dist.scope():
        model = ...                                         # e.g. TwoTowerModel
        model.compile(optimizer=optimizer.make_optimizer(cfg.optimizer, cfg.train.steps),
                      jit_compile=cfg.train.jit_compile,
                      steps_per_execution=cfg.train.steps_per_execution)
    fit_callbacks = callbacks.training_callbacks(
        checkpointer, initial_step, cfg.train.checkpoint_every,
        log_dir=os.path.join(cfg.train.out_dir, "tensorboard"), log_every=cfg.train.log_every,
        global_batch_size=cfg.data.input.batch_size)
    if initial_step < cfg.train.steps:
        model.fit(dataset, callbacks=fit_callbacks, verbose=...,
                  **checkpoint.resume_fit_kwargs(initial_step, cfg.train.steps,
                                                 cfg.train.steps_per_epoch))

``CheckpointCallback`` (in ``training_callbacks``) restores the checkpoint of ``initial_step`` in
``on_train_begin``, after ``fit`` has built the model and the optimizer, so nothing needs building
beforehand; it saves every ``checkpoint_every`` global steps and at the end of ``fit``. To restore
outside ``fit`` (evaluation, export), build the model and call ``restore_latest(model, optimizer,
directory)``.
"""

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "state.npz"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})$")
_TMP_PREFIX = ".tmp-ckpt-"

# Test hook: called as hook(stage, path) at "state_written" (state.npz written, manifest not yet) and
# "before_commit" (manifest written, not yet renamed). Tests use it to kill a process in mid-save.
_test_hook = None


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the model / optimizer it is restored into."""


# ------------------------------------------------------------------------------------------ files
def _is_remote(path):
    return "://" in str(path)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _exists(path):
    return _gfile().exists(path) if _is_remote(path) else os.path.exists(path)


def _makedirs(path):
    if _is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def _listdir(path):
    if not _exists(path):
        return []
    if _is_remote(path):
        return [name.rstrip("/") for name in _gfile().listdir(path)]
    return os.listdir(path)


def _rmtree(path):
    if _is_remote(path):
        if _gfile().exists(path):
            _gfile().rmtree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _write_bytes(path, data):
    """Writes ``data`` durably (fsync on local disks)."""
    if _is_remote(path):
        with _gfile().GFile(path, "wb") as f:
            f.write(data)
        return
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_bytes(path):
    if _is_remote(path):
        with _gfile().GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _fsync_dir(path):
    if _is_remote(path) or not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_dir(src, dst):
    if _is_remote(src):
        _gfile().rename(src, dst, overwrite=False)
    else:
        os.rename(src, dst)


def write_json_atomic(path, obj):
    """Writes ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    _write_bytes(tmp, (json.dumps(obj, indent=2) + "\n").encode())
    if _is_remote(path):
        _gfile().rename(tmp, path, overwrite=True)
    else:
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- arrays
def _to_numpy(variable):
    from keras import ops

    return np.asarray(ops.convert_to_numpy(variable))


def _dtype_name(variable):
    dtype = variable.dtype
    return getattr(dtype, "name", None) or str(dtype)


_NATIVE_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                  "float16", "float32", "float64", "complex64", "complex128"}
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _encode(array):
    """NumPy-native dtypes as is; ml_dtypes (bfloat16, float8...) as their raw bits."""
    if array.dtype.name not in _NATIVE_DTYPES:
        return array.view(_BITS[array.dtype.itemsize])
    return array


def _decode(array, dtype_name):
    if dtype_name not in _NATIVE_DTYPES:
        import ml_dtypes

        return array.view(getattr(ml_dtypes, dtype_name))
    return array


def _path(variable):
    return getattr(variable, "path", None) or variable.name


def _describe(variables):
    return [{"path": _path(v), "shape": [int(d) for d in v.shape],
             "dtype": _dtype_name(v)} for v in variables]


# ------------------------------------------------------------------------------------ checkpoints
class CheckpointInfo:
    """A complete checkpoint: ``step``, ``path`` and its ``manifest`` dict."""

    def __init__(self, step, path, manifest):
        self.step, self.path, self.manifest = step, path, manifest

    def __repr__(self):
        return f"CheckpointInfo(step={self.step}, path={self.path!r})"


def _optimizer_variables(optimizer):
    return list(optimizer.variables) if optimizer is not None else []


def ensure_built(model, optimizer=None):
    """Checks the model has variables and builds ``optimizer`` on its trainable variables if needed
    (inside the model's tf.distribute scope)."""
    if not model.built or not model.variables:
        raise CheckpointError(
            f"model {model.name!r} is not built: call it on a batch (or let model.fit build it and "
            f"restore from CheckpointCallback) before restoring a checkpoint")
    if optimizer is not None and not optimizer.built:
        scope = getattr(model, "distribute_strategy", None)
        if scope is not None:
            with scope.scope():
                optimizer.build(model.trainable_variables)
        else:
            optimizer.build(model.trainable_variables)


class Checkpointer:
    """Saves / finds / restores checkpoints in one directory (see the module docstring).

    Args:
      directory: local path or a tf.io.gfile URL (gs://...).
      keep: how many of the newest complete checkpoints to keep (>= 1).
      write: whether this process writes (False on the non-chief workers of a multi-worker job, which
        must then see the chief's directory, e.g. on GCS); default: ``strategy.is_chief()``.
    """

    def __init__(self, directory, keep=3, write=None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = str(directory)
        self.keep = int(keep)
        if write is None:
            from keras_mm.training.strategy import is_chief

            write = is_chief()
        self.write = bool(write)
        if self.write:
            _makedirs(self.directory)

    # ------------------------------------------------------------------------------- discovery
    def _candidates(self):
        steps = []
        for name in _listdir(self.directory):
            match = _CKPT_RE.match(name)
            if match:
                steps.append((int(match.group(1)), os.path.join(self.directory, name)))
        return sorted(steps, reverse=True)

    def verify(self, path):
        """The manifest of the checkpoint at ``path`` if it is complete and intact, else None."""
        try:
            manifest = json.loads(_read_bytes(os.path.join(path, MANIFEST_FILE)))
            if manifest.get("format") != FORMAT_VERSION:
                return None
            entry = manifest["files"][STATE_FILE]
            data = _read_bytes(os.path.join(path, STATE_FILE))
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring incomplete checkpoint %s: %s", path, e)
            return None
        except Exception as e:  # tf.errors.NotFoundError and friends on remote paths
            logger.warning("ignoring unreadable checkpoint %s: %s", path, e)
            return None
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            logger.warning("ignoring corrupt checkpoint %s (size or sha256 mismatch)", path)
            return None
        return manifest

    def checkpoints(self):
        """Every complete checkpoint, oldest first."""
        found = []
        for step, path in self._candidates():
            manifest = self.verify(path)
            if manifest is not None:
                found.append(CheckpointInfo(step, path, manifest))
        return found[::-1]

    def latest(self):
        """The newest complete checkpoint, or None."""
        for step, path in self._candidates():
            manifest = self.verify(path)
            if manifest is not None:
                return CheckpointInfo(step, path, manifest)
        return None

    def latest_step(self):
        """The step of the newest complete checkpoint, 0 if there is none."""
        info = self.latest()
        return info.step if info is not None else 0

    # ------------------------------------------------------------------------------------ save
    def save(self, step, model, optimizer=None, extra=None):
        """Writes a checkpoint of ``step`` atomically, then prunes to ``keep``.

        Args:
          step: the number of train steps done.
          model, optimizer: what to save (``model.variables``, ``optimizer.variables``).
          extra: JSON-serialisable dict stored in the manifest.

        Returns:
          the checkpoint's path (None on a process that does not write).
        """
        if not self.write:
            return None
        step = int(step)
        final = os.path.join(self.directory, f"ckpt-{step:08d}")
        model_vars = list(model.variables)
        opt_vars = _optimizer_variables(optimizer)
        arrays = {}
        for prefix, variables in (("model", model_vars), ("optimizer", opt_vars)):
            for i, v in enumerate(variables):
                arrays[f"{prefix}/{i:05d}"] = _encode(_to_numpy(v))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()

        tmp = os.path.join(self.directory, f"{_TMP_PREFIX}{step:08d}-{uuid.uuid4().hex[:12]}")
        _makedirs(tmp)
        _write_bytes(os.path.join(tmp, STATE_FILE), data)
        if _test_hook is not None:
            _test_hook("state_written", tmp)
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "time": time.time(),
            "files": {STATE_FILE: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
            "model_variables": _describe(model_vars),
            "optimizer_variables": _describe(opt_vars),
            "optimizer_class": type(optimizer).__name__ if optimizer is not None else None,
            "extra": extra or {},
        }
        _write_bytes(os.path.join(tmp, MANIFEST_FILE), (json.dumps(manifest) + "\n").encode())
        _fsync_dir(tmp)
        if _test_hook is not None:
            _test_hook("before_commit", tmp)
        if _exists(final):  # the same step saved again (a rerun): replace it
            trash = os.path.join(self.directory, f"{_TMP_PREFIX}old-{step:08d}-{uuid.uuid4().hex[:8]}")
            _rename_dir(final, trash)
            _rename_dir(tmp, final)
            _rmtree(trash)
        else:
            _rename_dir(tmp, final)
        _fsync_dir(self.directory)
        self._prune(keep_tmp=())
        logger.info("saved checkpoint %s", final)
        return final

    def _prune(self, keep_tmp=()):
        complete = [(step, path) for step, path in self._candidates()]
        for _, path in complete[self.keep:]:
            _rmtree(path)
        for name in _listdir(self.directory):
            if name.startswith(_TMP_PREFIX) and name not in keep_tmp:
                # Left by a killed save (this process saves one at a time).
                _rmtree(os.path.join(self.directory, name))

    # --------------------------------------------------------------------------------- restore
    def restore(self, info, model, optimizer=None):
        """Loads the checkpoint ``info`` (a CheckpointInfo or a path) into ``model`` / ``optimizer``.

        Returns:
          its step.

        Raises:
          CheckpointError: the checkpoint is incomplete or its variables do not match.
        """
        if not isinstance(info, CheckpointInfo):
            manifest = self.verify(str(info))
            if manifest is None:
                raise CheckpointError(f"{info} is not a complete checkpoint")
            info = CheckpointInfo(manifest["step"], str(info), manifest)
        ensure_built(model, optimizer)
        prefixes = ("model",) if optimizer is None else ("model", "optimizer")
        arrays = _load_arrays(info.path, info.manifest, prefixes)
        model_vars = list(model.variables)
        opt_vars = _optimizer_variables(optimizer)
        assignments = []
        for prefix, variables in (("model", model_vars), ("optimizer", opt_vars)):
            saved = info.manifest[f"{prefix}_variables"]
            if optimizer is None and prefix == "optimizer":
                continue
            if len(saved) != len(variables):
                raise CheckpointError(
                    f"checkpoint {info.path} has {len(saved)} {prefix} variables, the {prefix} has "
                    f"{len(variables)}: the architecture or the optimizer settings differ from the run "
                    f"that wrote it")
            for i, (v, entry) in enumerate(zip(variables, saved)):
                value = arrays[prefix][i]
                if list(value.shape) != [int(d) for d in v.shape]:
                    raise CheckpointError(
                        f"checkpoint {info.path}: {prefix} variable {i} ({entry['path']}) has shape "
                        f"{list(value.shape)}, the {prefix}'s ({_path(v)}) has {list(v.shape)}")
                assignments.append((v, value))
        for v, value in assignments:
            v.assign(value)
        logger.info("restored checkpoint %s", info.path)
        return info.step

    def restore_latest(self, model, optimizer=None):
        """Restores the newest complete checkpoint; returns its step, or 0 (nothing restored)."""
        info = self.latest()
        if info is None:
            return 0
        return self.restore(info, model, optimizer)

    def restore_step(self, step, model, optimizer=None):
        """Restores the checkpoint of exactly ``step``."""
        for info in self.checkpoints():
            if info.step == step:
                return self.restore(info, model, optimizer)
        raise CheckpointError(f"no complete checkpoint of step {step} in {self.directory}")

    # ---------------------------------------------------------------------------------- config
    def write_config(self, config):
        """Writes the run's resolved config as ``config.json`` next to the checkpoints.

        ``config``: a recipes dataclass (saved with keras_mm.recipes.config.save) or a JSON-serialisable
        dict. A different config already there (a resumed run with other overrides) is kept as
        ``config.<unix time>.json``.

        Returns:
          the path (None on a process that does not write).
        """
        if not self.write:
            return None
        path = os.path.join(self.directory, CONFIG_FILE)
        if isinstance(config, dict):
            text = json.dumps(config, indent=2) + "\n"
        else:
            from keras_mm.recipes import config as config_lib

            text = config_lib.dumps(config)
        if _exists(path):
            old = _read_bytes(path).decode()
            if old == text:
                return path
            _write_bytes(os.path.join(self.directory, f"config.{int(time.time())}.json"), old.encode())
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        _write_bytes(tmp, text.encode())
        if _is_remote(path):
            _gfile().rename(tmp, path, overwrite=True)
        else:
            os.replace(tmp, path)
        return path


def restore_latest(model, optimizer, directory):
    """Restores the newest complete checkpoint of ``directory`` into a built model (and its optimizer,
    built here if needed). Returns its step, 0 when there is none."""
    return Checkpointer(directory, write=False).restore_latest(model, optimizer)


def read_model_variables(path):
    """The model variables of a checkpoint as ``{variable path: array}`` (paths as Keras names
    them, e.g. ``video_two_tower_tiny/video_encoder/encoder/block_0/norm1/gamma``), to
    initialise another model from (``keras_mm.models.video.initialize_video_tower``).

    ``path``: a checkpoint (``.../checkpoints/ckpt-00001500``), a checkpoints folder or a run's
    ``train.out_dir`` (their newest complete checkpoint).

    Raises:
      CheckpointError: no complete checkpoint there.
    """
    path = str(path)
    manifest = (Checkpointer(path, write=False).verify(path)
                if _exists(os.path.join(path, MANIFEST_FILE)) else None)
    if manifest is None:
        for folder in (os.path.join(path, "checkpoints"), path):
            info = Checkpointer(folder, write=False).latest() if _exists(folder) else None
            if info is not None:
                path, manifest = info.path, info.manifest
                break
    if manifest is None:
        raise CheckpointError(f"{path}: no complete checkpoint (give a ckpt-N folder, a "
                              "checkpoints folder or a run's out_dir)")
    values = _load_arrays(path, manifest, ("model",))["model"]
    return {entry["path"]: value
            for entry, value in zip(manifest["model_variables"], values)}


def _load_arrays(path, manifest, prefixes):
    """``{prefix: [decoded array of each manifest entry]}`` from the checkpoint ``path``'s
    state file, for each of ``prefixes`` ("model", "optimizer")."""
    with np.load(io.BytesIO(_read_bytes(os.path.join(path, STATE_FILE)))) as npz:
        return {prefix: [_decode(npz[f"{prefix}/{i:05d}"], entry["dtype"])
                         for i, entry in enumerate(manifest[f"{prefix}_variables"])]
                for prefix in prefixes}


# ------------------------------------------------------------------------------- input position
def batches_per_step(input_context=None, strategy=None):
    """Batches one input pipeline yields per train step.

    * A dataset of global batches given to ``fit`` (Keras splits each over the replicas): 1.
    * ``strategy.distribute_datasets_from_function``: each pipeline yields per-replica batches, one
      per local replica and step: ``num_replicas_in_sync / num_input_pipelines``.
    """
    if input_context is None:
        return 1
    return max(1, input_context.num_replicas_in_sync // input_context.num_input_pipelines)


def resumable_dataset(make_dataset, skip_batches=0):
    """The stream of ``make_dataset()`` without its first ``skip_batches`` elements, the same stream
    for every iterator of the returned dataset (TensorFlow ``tf.data``).

    ``make_dataset`` is called inside a traced function (it must build a tf.data pipeline from Python
    values, e.g. ``lambda: train_dataset(folder, config, input_context=ctx)``) and once eagerly to copy
    its ``tf.data.Options``. For an exact resume the pipeline must be deterministic given its seeds.
    """
    import tensorflow as tf

    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
    probe = make_dataset()
    skip = int(skip_batches)

    @tf.autograph.experimental.do_not_convert  # pipeline-building Python, not graph code
    def stream(_):
        dataset = make_dataset()
        return dataset.skip(skip) if skip else dataset

    dataset = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).flat_map(stream)
    return dataset.with_options(probe.options())


def resume_fit_kwargs(initial_step, total_steps, steps_per_epoch=None):
    """``epochs``, ``initial_epoch`` and ``steps_per_epoch`` for ``model.fit`` resuming at
    ``initial_step`` of a ``total_steps`` run.

    Without ``steps_per_epoch``: one epoch of the remaining steps. With it (Keras epochs as eval / summary
    periods): ``total_steps`` and ``initial_step`` must be multiples of it (make ``checkpoint_every`` a
    multiple of ``steps_per_epoch``); epochs are numbered globally.
    """
    if not 0 <= initial_step <= total_steps:
        raise ValueError(f"initial_step {initial_step} outside [0, total_steps={total_steps}]")
    if steps_per_epoch is None:
        remaining = total_steps - initial_step
        return {"epochs": 1 if remaining else 0, "initial_epoch": 0,
                "steps_per_epoch": max(remaining, 1)}
    if total_steps % steps_per_epoch or initial_step % steps_per_epoch:
        raise ValueError(
            f"with steps_per_epoch={steps_per_epoch}, total_steps ({total_steps}) and the resumed step "
            f"({initial_step}) must be multiples of it (make checkpoint_every a multiple of "
            f"steps_per_epoch)")
    return {"epochs": total_steps // steps_per_epoch, "initial_epoch": initial_step // steps_per_epoch,
            "steps_per_epoch": steps_per_epoch}
