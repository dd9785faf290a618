"""``kmm serve``: a local server that speaks TF Serving's REST API, for development and tests.

    kmm serve --model_name siglip_digits --model_base_path saved_models/siglip_digits \\
        --rest_api_port 8501

**This server is for development and tests.** Production serving uses the TF Serving docker
image (``tensorflow/serving``), whose model server links the tensorflow-text ops, so exports with
in-graph SentencePiece tokenization serve there unchanged (see ``saved_models/README.md``). No
``tensorflow_model_server`` binary installs from pip or Debian, hence this stand-in: clients
written against it work unchanged against TF Serving's REST port.

What it does, as TF Serving does:

- Serves the newest integer version folder under ``--model_base_path``
  (``saved_models/<name>/<version>/``; TF Serving's default ``latest { num_versions: 1 }``
  policy), polls the folder every ``--file_system_poll_wait_seconds`` (default 1) and swaps in a
  newer version once it loads. Write a version atomically (export to a temporary folder, then
  rename it) so the poller never sees half a SavedModel.
- Imports ``tensorflow_text`` before loading, so SentencePiece and other tensorflow-text ops
  resolve, and replays the export's warm-up requests
  (``assets.extra/tf_serving_warmup_requests``) at load; a failing warm-up fails the load.
- ``--model_config_file`` reads a ``ModelServerConfig`` text proto (``model_config_list`` with
  ``name``, ``base_path``, ``model_version_policy`` latest / all / specific) to serve several
  models; a relative ``base_path`` is resolved against the config file's folder.

The REST contract (TF Serving's):

- ``POST /v1/models/<name>[/versions/<v>]:predict`` with a JSON object
  ``{"signature_name": "...", "instances": [...]}`` (row format: one entry per example, each an
  object ``{input name: value}``, or the bare value when the signature has one input; all inputs
  must share the 0-th dimension) or ``{"signature_name": "...", "inputs": {...}}`` (columnar:
  ``{input name: tensor}``, or the bare tensor for a one-input signature). ``signature_name``
  defaults to ``serving_default``. Bytes are sent as ``{"b64": "<base64>"}`` wherever a
  ``DT_STRING`` value is expected (e.g. ``image_bytes``); plain JSON strings are taken as UTF-8.
- The answer is ``{"predictions": [...]}`` for the row format (per example: an object
  ``{output name: value}``, or the bare value when the signature has a single output) and
  ``{"outputs": ...}`` for the columnar one (``{output name: tensor}``, or the bare tensor for a
  single output). String outputs come back as UTF-8 strings; an output whose name ends in
  ``_bytes``, or whose value is not valid UTF-8, comes back as ``{"b64": "..."}``.
- ``GET /v1/models/<name>[/versions/<v>]`` gives ``{"model_version_status": [{"version": "3",
  "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}``;
  ``GET /v1/models/<name>[/versions/<v>]/metadata`` gives ``{"model_spec": {...}, "metadata":
  {"signature_def": {"signature_def": {<name>: SignatureDef as JSON}}}}``.
- Errors answer ``{"error": "..."}`` with TF Serving's status codes: 400 for a bad request
  (malformed JSON, unknown signature, missing or unknown input names, wrong dtypes or shapes,
  bad base64, a signature raising ``InvalidArgumentError`` such as non-image bytes), 404 for an
  unknown model or version, 413 for a body over ``--max_request_bytes`` (default 64 MiB).

Differences: no gRPC port, no ``:classify`` / ``:regress`` (tf.Example signatures), no version
labels, no request batching (``--enable_batching``), and one log line per request.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
# Version policies: ("latest", n), ("all",) or ("specific", (v1, v2, ...)).
LATEST_ONE = ("latest", 1)

# TensorFlow error code -> HTTP status, as TF Serving's REST server maps them.
_HTTP_STATUS = {
    1: 499,   # CANCELLED
    2: 500,   # UNKNOWN
    3: 400,   # INVALID_ARGUMENT
    4: 504,   # DEADLINE_EXCEEDED
    5: 404,   # NOT_FOUND
    6: 409,   # ALREADY_EXISTS
    7: 403,   # PERMISSION_DENIED
    8: 429,   # RESOURCE_EXHAUSTED
    9: 400,   # FAILED_PRECONDITION
    10: 409,  # ABORTED
    11: 400,  # OUT_OF_RANGE
    12: 501,  # UNIMPLEMENTED
    13: 500,  # INTERNAL
    14: 503,  # UNAVAILABLE
    15: 500,  # DATA_LOSS
    16: 401,  # UNAUTHENTICATED
}

_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<suffix>/metadata|:predict|:classify|:regress)?$", re.ASCII)


class ServingError(Exception):
    """A request error answered as ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


def _bad_request(message: str) -> ServingError:
    return ServingError(400, message)


# ---------------------------------------------------------------------------------- loading
def version_folders(base_path: str) -> List[int]:
    """Integer version folders under ``base_path`` that hold a SavedModel, ascending."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(base_path):
        raise FileNotFoundError(f"model base path {base_path} does not exist or is not a folder")
    versions = []
    for entry in tf.io.gfile.listdir(base_path):
        entry = entry.rstrip("/")
        if not (entry.isascii() and entry.isdigit()):
            continue
        folder = os.path.join(base_path, entry)
        if any(tf.io.gfile.exists(os.path.join(folder, f))
               for f in ("saved_model.pb", "saved_model.pbtxt")):
            versions.append(int(entry))
    return sorted(versions)


def read_signature_defs(export_dir: str) -> Dict[str, Any]:
    """The ``SignatureDef`` protos of the ``serve`` MetaGraph of a SavedModel, by name."""
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    pb = os.path.join(export_dir, "saved_model.pb")
    if tf.io.gfile.exists(pb):
        with tf.io.gfile.GFile(pb, "rb") as f:
            saved_model.ParseFromString(f.read())
    else:
        with tf.io.gfile.GFile(os.path.join(export_dir, "saved_model.pbtxt"), "r") as f:
            text_format.Parse(f.read(), saved_model)
    graphs = [g for g in saved_model.meta_graphs if "serve" in g.meta_info_def.tags]
    graphs = graphs or list(saved_model.meta_graphs)
    if not graphs:
        raise ValueError(f"{export_dir} holds no MetaGraph")
    return dict(graphs[0].signature_def)


def dtype_name(dtype) -> str:
    """``tf.string`` -> ``"DT_STRING"`` (the names TF Serving uses)."""
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2

    return types_pb2.DataType.Name(tf.dtypes.as_dtype(dtype).as_datatype_enum)


class Signature:
    """One serving signature of a loaded SavedModel: a concrete function with named tensors.

    Attributes:
      inputs / outputs: name -> ``tf.TensorSpec`` (dtype and shape, ``None`` for any size).
    """

    def __init__(self, name: str, fn):
        import tensorflow as tf

        self.name = name
        self.fn = fn
        self.inputs: Dict[str, tf.TensorSpec] = dict(fn.structured_input_signature[1])
        self.outputs: Dict[str, tf.TensorSpec] = {
            k: tf.TensorSpec(v.shape, v.dtype, k) for k, v in sorted(fn.structured_outputs.items())}

    def __call__(self, arrays: Mapping[str, Any]) -> Dict[str, Any]:
        """Runs the signature on numpy arrays; returns numpy arrays by output name.

        Raises:
          ServingError: the graph raised (``InvalidArgumentError`` -> 400, ...).
        """
        import tensorflow as tf

        tensors = {k: tf.constant(v, dtype=self.inputs[k].dtype) for k, v in arrays.items()}
        try:
            outputs = self.fn(**tensors)
        except tf.errors.OpError as e:
            raise ServingError(_HTTP_STATUS.get(e.error_code, 500), op_error_message(e)) from e
        except (TypeError, ValueError) as e:  # argument validation of the concrete function
            raise _bad_request(f"signature '{self.name}' rejected its inputs: {e}") from e
        return {k: v.numpy() for k, v in sorted(outputs.items())}


def op_error_message(error) -> str:
    """The useful part of a TF runtime error (no node annotations or Python tracebacks)."""
    message = getattr(error, "message", None) or str(error)
    keep = []
    for line in message.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("[[") or stripped.startswith("Detected at node"):
            continue
        if stripped.startswith("Graph execution error"):
            continue
        keep.append(stripped)
    text = " ".join(keep) or message.strip()
    text = text.replace("<stack traces unavailable>", "").strip()
    text = re.sub(r"\s*\[Op:[^\]]*\]\s*$", "", text)
    return text


class ModelVersion:
    """A loaded version: the SavedModel, its signatures and its SignatureDef protos."""

    def __init__(self, version: int, path: str):
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  registers SentencePiece etc. before loading

        self.version = version
        self.path = path
        self.loaded = tf.saved_model.load(path, tags=["serve"])
        self.signatures = {name: Signature(name, fn)
                           for name, fn in self.loaded.signatures.items()}
        self.signature_defs = read_signature_defs(path)
        self.warmup_requests = self._warm_up()

    def _warm_up(self) -> int:
        import tensorflow as tf

        if not tf.io.gfile.exists(os.path.join(self.path, WARMUP_FILE)):
            return 0
        try:
            from keras_mm.export import warmup
        except ImportError as e:  # tensorflow-serving-api missing
            logger.warning("skipping warm-up of %s: %s", self.path, e)
            return 0
        return warmup.run_warmup_requests(self.path, self.loaded.signatures)


def _select_versions(available: Sequence[int], policy: Tuple) -> List[int]:
    if policy[0] == "latest":
        return sorted(available)[-max(1, int(policy[1])):] if available else []
    if policy[0] == "all":
        return sorted(available)
    if policy[0] == "specific":
        return sorted(set(available) & set(policy[1]))
    raise ValueError(f"unknown version policy {policy!r}")


class ServedModel:
    """A model name, its base path, and the versions its policy keeps loaded.

    Args:
      name: the model name in URLs.
      base_path: folder of integer version folders (TF Serving layout).
      policy: ``("latest", n)`` (default n=1: the newest version), ``("all",)`` or
        ``("specific", versions)``.
    """

    def __init__(self, name: str, base_path: str, policy: Tuple = LATEST_ONE):
        if not name or "/" in name or ":" in name:
            raise ValueError(f"model name {name!r} must be non-empty without '/' or ':'")
        self.name = name
        self.base_path = base_path
        self.policy = tuple(policy)
        self._lock = threading.Lock()
        self._versions: Dict[int, ModelVersion] = {}
        self._ended: Dict[int, Tuple[str, str]] = {}  # version -> (error code, message)

    def refresh(self) -> bool:
        """Loads the versions the policy wants and unloads the others; True if anything changed.

        A version that fails to load is reported in the status (state END with the error) and
        not retried.
        """
        wanted = _select_versions(version_folders(self.base_path), self.policy)
        with self._lock:
            loaded = set(self._versions)
        changed = False
        for version in wanted:
            if version in loaded or self._ended.get(version, ("OK",))[0] != "OK":
                continue  # loaded already, or failed to load (not retried)
            path = os.path.join(self.base_path, str(version))
            start = time.perf_counter()
            try:
                model_version = ModelVersion(version, path)
            except Exception as e:  # noqa: BLE001 - any load failure is reported, not raised
                code = _error_code_name(e)
                logger.error("model %s: version %d failed to load: %s", self.name, version, e)
                with self._lock:
                    self._ended[version] = (code, str(e).strip().splitlines()[0] if str(e) else code)
                continue
            with self._lock:
                self._versions[version] = model_version
                self._ended.pop(version, None)
            changed = True
            logger.info("model %s: version %d loaded from %s in %.1f s (%d signatures, %d "
                        "warm-up requests)", self.name, version, path, time.perf_counter() - start,
                        len(model_version.signatures), model_version.warmup_requests)
        keep = set(wanted) & set(self._versions)
        if keep:  # never unload the last servable version before a replacement is up
            with self._lock:
                for version in sorted(set(self._versions) - keep):
                    del self._versions[version]
                    self._ended[version] = ("OK", "")
                    changed = True
                    logger.info("model %s: version %d unloaded", self.name, version)
        return changed

    @property
    def versions(self) -> List[int]:
        """Loaded (AVAILABLE) versions, ascending."""
        with self._lock:
            return sorted(self._versions)

    def get(self, version: Optional[int] = None) -> ModelVersion:
        """The requested version, or the newest loaded one (404 when not loaded)."""
        with self._lock:
            if version is None:
                if not self._versions:
                    raise ServingError(404, f"Servable not found for request: Latest({self.name})")
                return self._versions[max(self._versions)]
            if version not in self._versions:
                raise ServingError(
                    404, f"Servable not found for request: Specific({self.name}, {version})")
            return self._versions[version]

    def status(self, version: Optional[int] = None) -> List[Dict[str, Any]]:
        """TF Serving's ``model_version_status`` entries, newest first."""
        with self._lock:
            entries = {v: ("AVAILABLE", "OK", "") for v in self._versions}
            for v, (code, message) in self._ended.items():
                entries.setdefault(v, ("END", code, message))
        if version is not None:
            if version not in entries:
                raise ServingError(404, f"Could not find version {version} of model {self.name}")
            entries = {version: entries[version]}
        return [{"version": str(v), "state": state,
                 "status": {"error_code": code, "error_message": message}}
                for v, (state, code, message) in sorted(entries.items(), reverse=True)]


def _error_code_name(error: Exception) -> str:
    try:
        import tensorflow as tf
        from tensorflow.core.protobuf import error_codes_pb2

        if isinstance(error, tf.errors.OpError):
            return error_codes_pb2.Code.Name(error.error_code)
    except Exception:  # noqa: BLE001
        pass
    return "UNKNOWN"


def read_model_config(path: str) -> List[ServedModel]:
    """``ServedModel``s (not yet loaded) from a TF Serving ``ModelServerConfig`` text proto."""
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"model config file {path} not found")
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ValueError(f"{path} is not a ModelServerConfig text proto: {e}") from e
    if config.HasField("custom_model_config"):
        raise ValueError(f"{path}: custom_model_config is not supported, use model_config_list")
    models = []
    for entry in config.model_config_list.config:
        if entry.model_platform not in ("", "tensorflow"):
            raise ValueError(f"{path}: model {entry.name!r} has model_platform "
                             f"{entry.model_platform!r}; only 'tensorflow' is served")
        base_path = entry.base_path
        if not base_path:
            raise ValueError(f"{path}: model {entry.name!r} has no base_path")
        if "://" not in base_path and not os.path.isabs(base_path):
            base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base_path)
        choice = entry.model_version_policy.WhichOneof("policy_choice")
        if choice == "all":
            policy = ("all",)
        elif choice == "specific":
            policy = ("specific", tuple(entry.model_version_policy.specific.versions))
        elif choice == "latest":
            policy = ("latest", entry.model_version_policy.latest.num_versions or 1)
        else:
            policy = LATEST_ONE
        models.append(ServedModel(entry.name, base_path, policy))
    if not models:
        raise ValueError(f"{path} lists no model (model_config_list {{ config {{ ... }} }})")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"{path} lists a model name twice: {names}")
    return models


# --------------------------------------------------------------------------- JSON <-> arrays
def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _decode_b64(value: Any, name: str) -> bytes:
    text = value["b64"]
    if not isinstance(text, str):
        raise _bad_request(f"input '{name}': the value of a {{\"b64\": ...}} object must be a "
                           "base64 string")
    data = text.strip().encode("ascii", errors="replace")
    if b"=" not in data:
        data += b"=" * (-len(data) % 4)
    for altchars in (None, b"-_"):  # standard, then web-safe alphabet
        try:
            return base64.b64decode(data, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
    raise _bad_request(f"input '{name}': invalid base64 in {{\"b64\": ...}} value")


def _shape_and_leaves(value: Any, name: str) -> Tuple[Tuple[int, ...], List[Any]]:
    """Shape of a nested JSON list and its leaves in row-major order (400 when ragged)."""
    if not isinstance(value, list):
        return (), [value]
    if not value:
        return (0,), []
    shape = None
    leaves: List[Any] = []
    for item in value:
        item_shape, item_leaves = _shape_and_leaves(item, name)
        if shape is None:
            shape = item_shape
        elif item_shape != shape:
            raise _bad_request(f"input '{name}' is ragged: its lists have different lengths "
                               f"({list(shape)} vs {list(item_shape)}); tensors must be "
                               "rectangular")
        leaves.extend(item_leaves)
    return (len(value),) + shape, leaves


def _leaf_converter(spec, name: str):
    """A function JSON leaf -> Python value of the input's dtype, raising 400 on a mismatch."""
    import tensorflow as tf

    dtype = spec.dtype
    expected = dtype_name(dtype)

    def mismatch(leaf):
        shown = json.dumps(leaf)[:60] if not isinstance(leaf, bytes) else repr(leaf[:60])
        return _bad_request(f"input '{name}' expects {expected} values, got {shown}")

    if dtype == tf.string:
        def convert(leaf):
            if isinstance(leaf, str):
                return leaf.encode("utf-8")
            if _is_b64(leaf):
                return _decode_b64(leaf, name)
            raise mismatch(leaf)
    elif dtype == tf.bool:
        def convert(leaf):
            if isinstance(leaf, bool):
                return leaf
            raise mismatch(leaf)
    elif dtype.is_integer:
        low, high = int(dtype.min), int(dtype.max)

        def convert(leaf):
            if isinstance(leaf, float) and leaf.is_integer():
                leaf = int(leaf)
            if isinstance(leaf, int) and not isinstance(leaf, bool):
                if low <= leaf <= high:
                    return leaf
                raise _bad_request(f"input '{name}': {leaf} is out of range for {expected}")
            raise mismatch(leaf)
    elif dtype.is_floating:
        def convert(leaf):
            if isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
                return float(leaf)
            raise mismatch(leaf)
    else:
        def convert(leaf):
            raise _bad_request(f"input '{name}' has dtype {expected}, which JSON cannot carry")
    return convert


def _shape_text(dims: Iterable[Optional[int]]) -> str:
    return "[" + ", ".join("-1" if d is None else str(d) for d in dims) + "]"


def json_to_array(value: Any, name: str, spec, signature: str = DEFAULT_SIGNATURE):
    """A JSON tensor value -> numpy array of ``spec``'s dtype, checked against its shape.

    Raises:
      ServingError (400): ragged lists, wrong value types, bad base64, or a shape the signature
        does not take.
    """
    import numpy as np
    import tensorflow as tf

    shape, leaves = _shape_and_leaves(value, name)
    convert = _leaf_converter(spec, name)
    converted = [convert(leaf) for leaf in leaves]
    if spec.dtype == tf.string:
        array = np.empty(len(converted), dtype=object)
        array[:] = converted
    else:
        array = np.asarray(converted, dtype=spec.dtype.as_numpy_dtype)
    array = array.reshape(shape)
    expected = spec.shape
    if expected.rank is not None:
        dims = expected.as_list()
        if len(dims) != len(shape) or any(d is not None and d != s for d, s in zip(dims, shape)):
            raise _bad_request(f"input '{name}' has shape {_shape_text(shape)}, but signature "
                               f"'{signature}' expects {_shape_text(dims)} (-1: any size)")
    return array


def _string_to_json(value: bytes, force_b64: bool) -> Any:
    if not force_b64:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(value).decode("ascii")}


def _map_nested(value: Any, fn) -> Any:
    if isinstance(value, list):
        return [_map_nested(v, fn) for v in value]
    return fn(value)


def array_to_json(array, name: str) -> Any:
    """A numpy output -> JSON value (nested lists; strings as UTF-8 or ``{"b64": ...}``)."""
    import numpy as np

    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind == "S":
        force_b64 = name.endswith("_bytes")
        return _map_nested(array.tolist(), lambda b: _string_to_json(bytes(b), force_b64))
    if array.dtype.kind in "biuf":
        if array.dtype.kind == "f" and array.dtype.itemsize < 4:
            array = array.astype(np.float32)
        return array.tolist()
    if array.dtype.kind == "V":  # bfloat16 and other ml_dtypes floats
        return array.astype(np.float32).tolist()
    raise ServingError(500, f"output '{name}' has dtype {array.dtype}, which JSON cannot carry")


# ------------------------------------------------------------------------------- REST API
class RestApi:
    """TF Serving's REST API over ``ServedModel``s: ``handle(method, path, body)``."""

    def __init__(self, models: Sequence[ServedModel]):
        self.models = {m.name: m for m in models}

    def handle(self, method: str, path: str, body: bytes) -> Tuple[int, Any]:
        """Returns (HTTP status, JSON-able payload); errors become ``{"error": ...}``."""
        try:
            return 200, self._dispatch(method, path, body)
        except ServingError as e:
            return e.status, {"error": e.message}
        except Exception as e:  # noqa: BLE001 - a bug must not kill the server
            logger.exception("internal error on %s %s", method, path)
            return 500, {"error": f"internal error: {type(e).__name__}: {e}"}

    def _dispatch(self, method: str, path: str, body: bytes) -> Any:
        path = path.split("?", 1)[0]
        if not path.startswith("/v1/"):
            raise ServingError(404, f"Not found: {method} {path} (the API is under /v1/models/)")
        match = _MODEL_PATH.match(path)
        suffix = match.group("suffix") if match else None
        if (match is None
                or (method == "GET" and suffix not in (None, "/metadata"))
                or (method == "POST" and suffix not in (":predict", ":classify", ":regress"))
                or method not in ("GET", "POST")):
            raise _bad_request(f"Malformed request: {method} {path}")
        name, label = match.group("name"), match.group("label")
        version = int(match.group("version")) if match.group("version") else None
        model = self.models.get(name)
        if model is None:
            if version is None:
                raise ServingError(404, f"Servable not found for request: Latest({name})")
            raise ServingError(404, f"Servable not found for request: Specific({name}, {version})")
        if label is not None:
            raise ServingError(404, f"Unrecognized servable version label: {label} (kmm serve "
                                    "does not support version labels; use /versions/<v>)")
        if suffix is None:
            return {"model_version_status": model.status(version)}
        if suffix == "/metadata":
            return self._metadata(model, version)
        if suffix != ":predict":
            raise _bad_request(f"{suffix[1:]} needs tf.Example Classification/Regression "
                               "signatures, which keras-mm exports do not have; use :predict")
        return self._predict(model.get(version), _parse_json(body))

    @staticmethod
    def _metadata(model: ServedModel, version: Optional[int]) -> Dict[str, Any]:
        from google.protobuf import json_format

        served = model.get(version)
        signature_def = {
            name: json_format.MessageToDict(proto, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)
            for name, proto in sorted(served.signature_defs.items())}
        return {"model_spec": {"name": model.name, "signature_name": "",
                               "version": str(served.version)},
                "metadata": {"signature_def": {"signature_def": signature_def}}}

    @staticmethod
    def _predict(served: ModelVersion, request: Dict[str, Any]) -> Dict[str, Any]:
        signature_name = request.get("signature_name", DEFAULT_SIGNATURE)
        if not isinstance(signature_name, str):
            raise _bad_request("'signature_name' must be a string")
        signature_name = signature_name or DEFAULT_SIGNATURE
        signature = served.signatures.get(signature_name)
        if signature is None:
            raise _bad_request(
                f'Serving signature name: "{signature_name}" not found in signature def '
                f"(signatures: {', '.join(sorted(served.signatures))})")
        row_format = "instances" in request
        if row_format == ("inputs" in request):
            raise _bad_request("the request needs exactly one of 'instances' (row format) and "
                               "'inputs' (columnar format)")
        if row_format:
            columns = _row_columns(request["instances"], signature)
        else:
            columns = _columnar_columns(request["inputs"], signature)
        _check_names(columns, signature)
        arrays = {name: json_to_array(value, name, signature.inputs[name], signature.name)
                  for name, value in columns.items()}
        outputs = signature(arrays)
        if not row_format:
            converted = {k: array_to_json(v, k) for k, v in outputs.items()}
            if len(converted) == 1:
                return {"outputs": next(iter(converted.values()))}
            return {"outputs": converted}
        return {"predictions": _row_predictions(outputs, signature.name)}


def _parse_json(body: bytes) -> Dict[str, Any]:
    if not body:
        raise _bad_request("empty request body; expected a JSON object")
    try:
        request = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _bad_request(f"JSON Parse error: the body is not UTF-8 ({e})") from e
    except json.JSONDecodeError as e:
        raise _bad_request(f"JSON Parse error: {e}") from e
    except RecursionError as e:
        raise _bad_request("JSON Parse error: nested too deeply") from e
    if not isinstance(request, dict):
        raise _bad_request("JSON Parse error: the request must be a JSON object")
    return request


def _row_columns(instances: Any, signature: Signature) -> Dict[str, List[Any]]:
    if not isinstance(instances, list):
        raise _bad_request("'instances' must be a list (one entry per example)")
    if not instances:
        raise _bad_request("'instances' is empty")
    named = [isinstance(x, dict) and not _is_b64(x) for x in instances]
    if all(named):
        keys = set(instances[0])
        if any(set(x) != keys for x in instances):
            raise _bad_request("every instance must name the same inputs")
        return {k: [x[k] for x in instances] for k in instances[0]}
    if any(named):
        raise _bad_request("instances mix objects {input name: value} with bare values")
    if len(signature.inputs) != 1:
        raise _bad_request(
            f"signature '{signature.name}' has {len(signature.inputs)} inputs "
            f"({', '.join(sorted(signature.inputs))}); each instance must be an object "
            "{input name: value}")
    return {next(iter(signature.inputs)): instances}


def _columnar_columns(inputs: Any, signature: Signature) -> Dict[str, Any]:
    if isinstance(inputs, dict) and not _is_b64(inputs):
        return dict(inputs)
    if len(signature.inputs) != 1:
        raise _bad_request(
            f"signature '{signature.name}' has {len(signature.inputs)} inputs "
            f"({', '.join(sorted(signature.inputs))}); 'inputs' must be an object "
            "{input name: tensor}")
    return {next(iter(signature.inputs)): inputs}


def _check_names(columns: Mapping[str, Any], signature: Signature) -> None:
    expected = sorted(signature.inputs)
    unknown = sorted(set(columns) - set(expected))
    if unknown:
        raise _bad_request(
            f"input tensor alias not found in signature: {', '.join(unknown)}. Inputs expected "
            f"to be in the set {{{', '.join(expected)}}}.")
    missing = sorted(set(expected) - set(columns))
    if missing:
        raise _bad_request(f"missing input(s) {', '.join(missing)}: signature "
                           f"'{signature.name}' takes {{{', '.join(expected)}}}")


def _row_predictions(outputs: Mapping[str, Any], signature_name: str) -> List[Any]:
    sizes = {k: (v.shape[0] if getattr(v, "ndim", 0) else None) for k, v in outputs.items()}
    if any(s is None for s in sizes.values()) or len(set(sizes.values())) > 1:
        raise _bad_request(
            f"signature '{signature_name}' returns outputs without a common 0-th (batch) "
            f"dimension ({', '.join(f'{k}: {s}' for k, s in sizes.items())}); use the columnar "
            "'inputs' format")
    converted = {k: array_to_json(v, k) for k, v in outputs.items()}
    if len(converted) == 1:
        return next(iter(converted.values()))
    batch = next(iter(sizes.values()))
    return [{k: v[i] for k, v in converted.items()} for i in range(batch)]


# ---------------------------------------------------------------------------------- server
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kmm-serve"
    timeout = 120  # seconds a connection may sit idle or mid-request

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._handle()

    def do_POST(self):  # noqa: N802
        self._handle()

    do_PUT = do_DELETE = do_PATCH = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ServingError(411, "chunked request bodies are not supported; send "
                                    "Content-Length")
        header = self.headers.get("Content-Length")
        if header is None:
            return b""
        try:
            length = int(header)
            if length < 0:
                raise ValueError(header)
        except ValueError:
            self.close_connection = True
            raise _bad_request(f"bad Content-Length {header!r}") from None
        limit = self.server.max_request_bytes
        if length > limit:
            self.close_connection = True
            raise ServingError(413, f"request body of {length} bytes exceeds the limit of "
                                    f"{limit} bytes")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise _bad_request(f"request body ended after {len(body)} of {length} bytes")
        return body

    def _handle(self):
        start = time.perf_counter()
        try:
            body = self._read_body()
        except ServingError as e:
            status, payload = e.status, {"error": e.message}
        else:
            status, payload = self.server.api.handle(self.command, self.path, body)
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        logger.info('%s "%s %s" %d %dB %.1fms', self.client_address[0], self.command,
                    self.path, status, len(data), (time.perf_counter() - start) * 1e3)

    def log_request(self, code="-", size="-"):  # one line per request comes from _handle
        pass

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        logger.warning("%s %s", self.address_string(), format % args)


class ModelServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` serving ``RestApi`` and polling the models' version folders."""

    daemon_threads = True

    def __init__(self, address: Tuple[str, int], models: Sequence[ServedModel], *,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 poll_seconds: float = 1.0):
        self.api = RestApi(models)
        self.max_request_bytes = int(max_request_bytes)
        self._stop = threading.Event()
        self._poller: Optional[threading.Thread] = None
        super().__init__(address, _Handler)
        if poll_seconds and poll_seconds > 0:
            self._poller = threading.Thread(target=self._poll, args=(float(poll_seconds),),
                                            name="kmm-serve-poll", daemon=True)
            self._poller.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def _poll(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            for model in self.api.models.values():
                try:
                    model.refresh()
                except Exception as e:  # noqa: BLE001 - e.g. the folder vanished; keep serving
                    logger.warning("model %s: polling %s failed: %s", model.name,
                                   model.base_path, e)

    def shutdown(self) -> None:
        self._stop.set()
        super().shutdown()

    def server_close(self) -> None:
        self._stop.set()
        super().server_close()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join(timeout=30)


def build_server(model_name: Optional[str] = None, model_base_path: Optional[str] = None,
                 host: str = "127.0.0.1", port: int = 8501, *,
                 model_config_file: Optional[str] = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 file_system_poll_wait_seconds: float = 1.0
                 ) -> Tuple[ModelServer, threading.Thread]:
    """Loads the model(s) and starts serving in a daemon thread.

    Give either ``model_name`` + ``model_base_path`` or ``model_config_file``. Port 0 picks a
    free port (read it from ``server.server_address`` or ``server.url``). Stop with
    ``server.shutdown(); server.server_close()``.

    Raises:
      FileNotFoundError / ValueError: no base path, no version folder, bad config.
      RuntimeError: no version of a model could be loaded (the load error is in the message).
      OSError: the address is in use.
    """
    if model_config_file is not None:
        if model_base_path is not None:
            raise ValueError("give either a model config file or a model base path, not both")
        models = read_model_config(model_config_file)
    else:
        if not model_base_path:
            raise ValueError("need a model base path (or a model config file)")
        models = [ServedModel(model_name or "default", model_base_path)]
    for model in models:
        available = version_folders(model.base_path)
        if not available:
            raise ValueError(f"model {model.name}: no version folder with a SavedModel under "
                             f"{model.base_path} (expected {model.base_path}/<integer version>/"
                             "saved_model.pb)")
        model.refresh()
        if not model.versions:
            failures = "; ".join(f"version {s['version']}: {s['status']['error_message']}"
                                 for s in model.status())
            raise RuntimeError(f"model {model.name}: no version could be loaded ({failures})")
    server = ModelServer((host, int(port)), models, max_request_bytes=max_request_bytes,
                         poll_seconds=file_system_poll_wait_seconds)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="kmm-serve", daemon=True)
    thread.start()
    return server, thread


# ------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmm serve",
        description="Serve SavedModels over TF Serving's REST API, for development and tests "
                    "(production: the tensorflow/serving docker image, see "
                    "saved_models/README.md). Flags are named as tensorflow_model_server's.")
    parser.add_argument("--model_name", default="default",
                        help="model name in the URLs /v1/models/<name> (default: default)")
    parser.add_argument("--model_base_path",
                        help="folder of integer version folders; the newest is served")
    parser.add_argument("--model_config_file",
                        help="ModelServerConfig text proto listing models (instead of "
                             "--model_name/--model_base_path)")
    parser.add_argument("--rest_api_port", type=int, default=8501,
                        help="REST port (default 8501; 0 picks a free one)")
    parser.add_argument("--rest_api_host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                        help="seconds between checks for new versions (0: never)")
    parser.add_argument("--max_request_bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help=f"largest request body accepted (default {DEFAULT_MAX_REQUEST_BYTES})")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if (args.model_base_path is None) == (args.model_config_file is None):
        parser.error("give --model_base_path (with --model_name) or --model_config_file")
    if not 0 <= args.rest_api_port <= 65535:
        parser.error(f"--rest_api_port must be in 0..65535, got {args.rest_api_port}")
    if args.max_request_bytes < 1:
        parser.error("--max_request_bytes must be positive")
    if args.file_system_poll_wait_seconds < 0:
        parser.error("--file_system_poll_wait_seconds must be >= 0")
    return args


def run(argv: Optional[Sequence[str]] = None) -> None:
    """``kmm serve [flags]``: serves until interrupted (Ctrl-C)."""
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    server, thread = build_server(
        args.model_name, args.model_base_path, args.rest_api_host, args.rest_api_port,
        model_config_file=args.model_config_file, max_request_bytes=args.max_request_bytes,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds)
    for model in server.api.models.values():
        print(f"kmm serve: {model.name} version {model.versions[-1]} at "
              f"{server.url}/v1/models/{model.name} (development server; production: "
              "tensorflow/serving)", flush=True)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # `docker stop` / kill send SIGTERM: stop cleanly, as on Ctrl-C.
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        while thread.is_alive() and not stop.wait(0.5):
            pass
        print("kmm serve: stopping", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("kmm serve: stopping", file=sys.stderr, flush=True)
    finally:
        server.shutdown()
        server.server_close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Like :func:`run`, with one-line errors and an exit status (2 on errors): ``kmm serve``."""
    from keras_mm import cli

    return cli.main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
