"""TF Serving warm-up requests for an export: ``assets.extra/tf_serving_warmup_requests``.

TF Serving replays the requests in this file when it loads a SavedModel version, before the
version answers traffic, so the first real request does not pay for graph initialisation
(function tracing, SentencePiece model parsing, allocator growth). The file is a TFRecord of
``tensorflow.serving.PredictionLog`` protos (at most 1000), each with a ``PredictRequest`` for one
signature; a request that fails makes TF Serving reject the version, and ``kmm serve`` does the
same.

    from keras_mm.export import warmup
    warmup.write_warmup_requests("saved_models/siglip_digits/3")   # one request per signature
    warmup.write_warmup_requests(export_dir, {"embed_video": {"frames": frames_1xT}})

Default inputs follow DESIGN.md's SavedModel contract: ``image_bytes`` / ``frames`` get a small
JPEG, ``labels`` two label strings, other string inputs a short sentence, numeric inputs zeros;
unknown dimensions are 1 (2 for ``labels``). Pass ``inputs`` for a signature whose defaults do not
fit (e.g. a video model that needs a fixed number of frames).

The protos come from ``tensorflow-serving-api`` (``tensorflow_serving.apis``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from keras_mm.export.serve import (DEFAULT_SIGNATURE, WARMUP_FILE, op_error_message,
                                   read_signature_defs)

logger = logging.getLogger(__name__)

MAX_RECORDS = 1000  # TF Serving reads at most this many warm-up records
SAMPLE_TEXT = "a photo of the number seven."
SAMPLE_LABELS = ("seven", "one")


def warmup_path(export_dir: str) -> str:
    """``<export_dir>/assets.extra/tf_serving_warmup_requests``."""
    return os.path.join(export_dir, WARMUP_FILE)


def sample_jpeg(size: int = 32) -> bytes:
    """A small real JPEG (a colour gradient with a bright square), for image inputs."""
    import tensorflow as tf

    y, x = np.mgrid[0:size, 0:size]
    image = np.stack([x * 255 // (size - 1), y * 255 // (size - 1),
                      np.full_like(x, 96)], axis=-1).astype(np.uint8)
    image[size // 4: size // 2, size // 4: size // 2] = 255
    return tf.io.encode_jpeg(image, quality=90).numpy()


def _signature_specs(export_dir: str) -> Dict[str, Dict[str, Any]]:
    """signature -> input name -> (tf.DType, dims with None for unknown, or None for unknown rank)."""
    import tensorflow as tf

    specs = {}
    for name, signature_def in sorted(read_signature_defs(export_dir).items()):
        if name.startswith("__"):  # __saved_model_init_op and the like
            continue
        specs[name] = {
            input_name: (tf.dtypes.as_dtype(info.dtype),
                         None if info.tensor_shape.unknown_rank else
                         [d.size if d.size >= 0 else None for d in info.tensor_shape.dim])
            for input_name, info in signature_def.inputs.items()}
    return specs


def _default_value(name: str, dtype, dims: Optional[List[Optional[int]]]) -> np.ndarray:
    import tensorflow as tf

    is_labels = name == "labels"
    if dims is None:
        dims = [None]
    shape = [(d if d is not None else (len(SAMPLE_LABELS) if is_labels and i == 0 else 1))
             for i, d in enumerate(dims)]
    if dtype == tf.string:
        if "image" in name or "frame" in name:
            fill: Any = sample_jpeg()
        elif is_labels:
            count = int(np.prod(shape)) if shape else 1
            return np.array([SAMPLE_LABELS[i % len(SAMPLE_LABELS)].encode()
                             for i in range(count)], dtype=object).reshape(shape)
        else:
            fill = SAMPLE_TEXT.encode()
        return np.full(shape, fill, dtype=object)
    return np.zeros(shape, dtype=dtype.as_numpy_dtype)


def default_inputs(export_dir: str) -> Dict[str, Dict[str, np.ndarray]]:
    """A small valid input per signature of ``export_dir`` (see the module docstring)."""
    return {signature: {name: _default_value(name, dtype, dims)
                        for name, (dtype, dims) in sorted(inputs.items())}
            for signature, inputs in _signature_specs(export_dir).items()}


def _tensor_proto(value: Any, dtype, dims, where: str):
    import tensorflow as tf

    try:
        proto = tf.make_tensor_proto(value, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot make a {dtype.name} tensor: {e}") from e
    shape = [d.size for d in proto.tensor_shape.dim]
    if dims is not None and (len(shape) != len(dims) or any(
            d is not None and d != s for d, s in zip(dims, shape))):
        raise ValueError(f"{where}: shape {shape} does not fit the signature's "
                         f"{[-1 if d is None else d for d in dims]}")
    return proto


def build_warmup_requests(export_dir: str,
                          inputs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                          *, model_name: Optional[str] = None) -> List[Any]:
    """``PredictionLog`` protos, one per signature of ``export_dir``.

    Args:
      export_dir: a SavedModel folder (``saved_models/<name>/<version>``).
      inputs: signature -> input name -> array-like; replaces the defaults of those signatures
        (every input of the signature must be given).
      model_name: ``model_spec.name`` of the requests (default: the name of the export's parent
        folder; TF Serving ignores it during warm-up).

    Raises:
      ValueError: an unknown signature or input name, a missing input, a bad dtype or shape.
    """
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    specs = _signature_specs(export_dir)
    chosen = default_inputs(export_dir)
    for signature, values in (inputs or {}).items():
        if signature not in specs:
            raise ValueError(f"export {export_dir} has no signature {signature!r} "
                             f"(signatures: {sorted(specs)})")
        expected, given = set(specs[signature]), set(values)
        if expected != given:
            raise ValueError(f"signature {signature!r} takes inputs {sorted(expected)}, "
                             f"got {sorted(given)}")
        chosen[signature] = dict(values)
    if model_name is None:
        model_name = os.path.basename(os.path.dirname(os.path.abspath(export_dir))) or "model"
    logs = []
    for signature, values in chosen.items():
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
        for name, value in sorted(values.items()):
            dtype, dims = specs[signature][name]
            request.inputs[name].CopyFrom(
                _tensor_proto(value, dtype, dims, f"signature {signature!r} input {name!r}"))
        logs.append(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)))
    if len(logs) > MAX_RECORDS:
        raise ValueError(f"{len(logs)} warm-up requests; TF Serving reads at most {MAX_RECORDS}")
    return logs


def write_warmup_requests(export_dir: str,
                          inputs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                          *, model_name: Optional[str] = None, verify: bool = True) -> str:
    """Writes ``assets.extra/tf_serving_warmup_requests`` into ``export_dir``; returns its path.

    Args:
      export_dir, inputs, model_name: see :func:`build_warmup_requests`.
      verify: load the export (tensorflow + tensorflow_text only) and replay the requests, so an
        export never ships a warm-up file that would make TF Serving reject it. The file is
        removed again if a request fails.

    Raises:
      ValueError: bad inputs, or (``verify``) a request that fails against the export.
    """
    import tensorflow as tf

    logs = build_warmup_requests(export_dir, inputs, model_name=model_name)
    path = warmup_path(export_dir)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    if verify:
        try:
            run_warmup_requests(export_dir)
        except Exception:
            tf.io.gfile.remove(path)
            raise
    logger.info("wrote %d warm-up requests to %s", len(logs), path)
    return path


def read_warmup_requests(export_dir: str) -> List[Any]:
    """The ``PredictionLog`` protos of ``export_dir``'s warm-up file (at most 1000 are read).

    Raises:
      FileNotFoundError: no warm-up file.
      ValueError: a record is not a ``PredictionLog``.
    """
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    path = warmup_path(export_dir)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"no warm-up requests at {path}")
    logs = []
    for i, record in enumerate(tf.data.TFRecordDataset(path).take(MAX_RECORDS)):
        log = prediction_log_pb2.PredictionLog()
        try:
            log.ParseFromString(record.numpy())
        except DecodeError as e:
            raise ValueError(f"{path}: record {i} is not a PredictionLog: {e}") from e
        logs.append(log)
    return logs


def run_warmup_requests(export_dir: str, signatures: Optional[Mapping[str, Any]] = None) -> int:
    """Replays the warm-up file's predict requests against the export; returns how many ran.

    Args:
      export_dir: the SavedModel folder holding the warm-up file.
      signatures: the loaded export's ``.signatures`` (default: load ``export_dir`` with
        ``tensorflow_text`` imported first).

    Raises:
      ValueError: a request names an unknown signature or fails (the message says which).
    """
    import tensorflow as tf

    if signatures is None:
        import tensorflow_text  # noqa: F401  SentencePiece ops must be registered to load

        signatures = tf.saved_model.load(export_dir).signatures
    count = 0
    for i, log in enumerate(read_warmup_requests(export_dir)):
        kind = log.WhichOneof("log_type")
        if kind != "predict_log":
            logger.warning("warm-up record %d is a %s; only predict requests are replayed", i,
                           kind)
            continue
        request = log.predict_log.request
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature not in signatures:
            raise ValueError(f"warm-up request {i}: the export has no signature {signature!r}")
        try:
            arguments = {name: tf.constant(tf.make_ndarray(proto))
                         for name, proto in request.inputs.items()}
            signatures[signature](**arguments)
        except tf.errors.OpError as e:
            raise ValueError(f"warm-up request {i} (signature {signature!r}) fails: "
                             f"{op_error_message(e)}") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"warm-up request {i} (signature {signature!r}) fails: {e}") from e
        count += 1
    return count
