"""THE feature spec of every record kind (DESIGN.md, data contract).

Beam jobs build records with :func:`serialize`, tf.data parses them with :func:`parse`, and
:func:`tfds_features` describes the same records to tensorflow-datasets so that
``tfds.builder_from_directory`` can read any dataset folder this project writes.

Record kinds and their ``tf.train.Example`` keys:

image_text
    ``image/encoded``  bytes, one JPEG or PNG, always 3-channel RGB (jobs canonicalise)
    ``image/height``   int64
    ``image/width``    int64
    ``texts``          bytes list, one or more normalised captions (UTF-8)
    ``id``             bytes, a stable id unique in the dataset
    ``questions``      bytes list, optional: questions about the image (PaLI-style QA)
    ``answers``        bytes list, optional: one short answer per question (same length);
                       records without them parse to empty lists (absent, not written)
label_as_text
    image_text keys plus ``label`` (int64) and ``label/name`` (bytes)
video_tubes
    ``video/frames``   bytes list, one JPEG a frame, T frames
    ``video/fps``      float
    ``texts``, ``id``  as above
    ``transcript/current``, ``transcript/future``  bytes, optional (MV-GPT); empty when absent
    ``label``          int64, optional: the clip's class (moving-digits: the primary digit's
                       motion direction, for the motion probe); -1 when absent
    ``label/name``     bytes, optional: the class name ("left"); empty when absent

Optional scalars are always written (their default when absent), so every record of a kind has
the same scalar keys; optional lists are left out when empty and parse back as ``[]``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

IMAGE_TEXT = "image_text"
LABEL_AS_TEXT = "label_as_text"
VIDEO_TUBES = "video_tubes"
KINDS = (IMAGE_TEXT, LABEL_AS_TEXT, VIDEO_TUBES)

# Keys, so no other module spells them.
IMAGE_ENCODED = "image/encoded"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
TEXTS = "texts"
ID = "id"
LABEL = "label"
LABEL_NAME = "label/name"
VIDEO_FRAMES = "video/frames"
VIDEO_FPS = "video/fps"
TRANSCRIPT_CURRENT = "transcript/current"
TRANSCRIPT_FUTURE = "transcript/future"
QUESTIONS = "questions"
ANSWERS = "answers"

# key -> (python type, is_list). The single source for serialize / parse / tfds / validation.
_SCHEMA: Dict[str, Dict[str, tuple]] = {
    IMAGE_TEXT: {
        IMAGE_ENCODED: (bytes, False),
        IMAGE_HEIGHT: (int, False),
        IMAGE_WIDTH: (int, False),
        TEXTS: (str, True),
        ID: (str, False),
        QUESTIONS: (str, True),
        ANSWERS: (str, True),
    },
}
_SCHEMA[LABEL_AS_TEXT] = {**_SCHEMA[IMAGE_TEXT], LABEL: (int, False), LABEL_NAME: (str, False)}
_SCHEMA[VIDEO_TUBES] = {
    VIDEO_FRAMES: (bytes, True),
    VIDEO_FPS: (float, False),
    TEXTS: (str, True),
    ID: (str, False),
    TRANSCRIPT_CURRENT: (str, False),
    TRANSCRIPT_FUTURE: (str, False),
    LABEL: (int, False),
    LABEL_NAME: (str, False),
}
# Optional keys per kind -> their default. Scalars are written as the default when absent; lists
# are not written when empty. (``label`` is required in label_as_text, optional in video_tubes.)
NO_LABEL = -1
_OPTIONAL: Dict[str, Dict[str, Any]] = {
    IMAGE_TEXT: {QUESTIONS: [], ANSWERS: []},
    LABEL_AS_TEXT: {QUESTIONS: [], ANSWERS: []},
    VIDEO_TUBES: {TRANSCRIPT_CURRENT: "", TRANSCRIPT_FUTURE: "", LABEL: NO_LABEL,
                  LABEL_NAME: ""},
}


def optional_defaults(kind: str) -> Dict[str, Any]:
    """``{key: default}`` of the optional keys of a record kind."""
    _schema(kind)
    return dict(_OPTIONAL[kind])


def keys(kind: str) -> Sequence[str]:
    """The feature keys of a record kind, in a fixed order."""
    return tuple(_schema(kind))


def _schema(kind: str) -> Dict[str, tuple]:
    if kind not in _SCHEMA:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    return _SCHEMA[kind]


def _check(kind: str, record: Mapping[str, Any]) -> None:
    schema = _schema(kind)
    missing = [k for k in schema if k not in record and k not in _OPTIONAL[kind]]
    extra = [k for k in record if k not in schema]
    if missing or extra:
        raise ValueError(f"{kind} record: missing keys {missing}, unexpected keys {extra}")
    if TEXTS in record:
        texts = record[TEXTS]
        if isinstance(texts, (str, bytes)) or not len(texts):
            raise ValueError(f"{kind} record {record.get(ID)!r}: 'texts' must be a non-empty list")
    if len(record.get(QUESTIONS, ())) != len(record.get(ANSWERS, ())):
        raise ValueError(f"{kind} record {record.get(ID)!r}: 'questions' and 'answers' must "
                         "have the same length")


def _to_bytes(value) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def serialize(record: Mapping[str, Any], kind: str) -> bytes:
    """Python dict -> serialized ``tf.train.Example`` (bytes). Validates keys and types."""
    from tensorflow.core.example import example_pb2, feature_pb2  # protos only, no TF runtime

    _check(kind, record)
    optional = _OPTIONAL[kind]
    feature = {}
    for key, (typ, is_list) in _schema(kind).items():
        value = record.get(key, optional.get(key))
        values = list(value) if is_list else [value]
        if is_list and key in optional and not values:
            continue  # absent optional list: parses back as []
        if typ in (bytes, str):
            feature[key] = feature_pb2.Feature(
                bytes_list=feature_pb2.BytesList(value=[_to_bytes(v) for v in values]))
        elif typ is int:
            feature[key] = feature_pb2.Feature(
                int64_list=feature_pb2.Int64List(value=[int(v) for v in values]))
        else:
            feature[key] = feature_pb2.Feature(
                float_list=feature_pb2.FloatList(value=[float(v) for v in values]))
    example = example_pb2.Example(features=feature_pb2.Features(feature=feature))
    return example.SerializeToString(deterministic=True)  # map keys sorted: same bytes everywhere


def deserialize(serialized: bytes, kind: str) -> Dict[str, Any]:
    """Serialized ``tf.train.Example`` -> Python dict (the inverse of :func:`serialize`)."""
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example.FromString(serialized)
    optional = _OPTIONAL[kind]
    out: Dict[str, Any] = {}
    for key, (typ, is_list) in _schema(kind).items():
        if key not in example.features.feature:
            if key in optional:
                out[key] = list(optional[key]) if is_list else optional[key]
                continue
            raise ValueError(f"{kind} record is missing feature {key!r}")
        feat = example.features.feature[key]
        if typ is bytes:
            values = list(feat.bytes_list.value)
        elif typ is str:
            values = [v.decode("utf-8") for v in feat.bytes_list.value]
        elif typ is int:
            values = list(feat.int64_list.value)
        else:
            values = list(feat.float_list.value)
        out[key] = values if is_list else values[0]
    return out


def parse_spec(kind: str) -> Dict[str, Any]:
    """Feature spec for ``tf.io.parse_example`` / ``parse_single_example``.

    List features are ``tf.io.RaggedFeature``: a 1-D tensor for one record, a RaggedTensor
    ``[batch, None]`` for a batch of records.
    """
    import tensorflow as tf

    optional = _OPTIONAL[kind] if kind in _OPTIONAL else {}
    spec = {}
    for key, (typ, is_list) in _schema(kind).items():
        dtype = {bytes: tf.string, str: tf.string, int: tf.int64, float: tf.float32}[typ]
        if is_list:
            spec[key] = tf.io.RaggedFeature(dtype)
        else:
            default = optional.get(key)
            spec[key] = tf.io.FixedLenFeature([], dtype, default_value=default)
    return spec


def parse(serialized, kind: str):
    """Parse one serialized record (scalar string tensor) into a dict of tensors.

    Shapes: scalars ``[]``; ``texts`` ``[num_texts]``; ``video/frames`` ``[T]``.
    """
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, parse_spec(kind))


def tfds_features(kind: str, class_names: Optional[Sequence[str]] = None):
    """The same records described as a ``tfds.features.FeaturesDict``.

    tfds flattens nested dicts with "/", so ``{"image": {"encoded": ...}}`` is the key
    ``image/encoded``. ``tfds.builder_from_directory(folder).as_dataset()`` then yields decoded
    ``uint8 [H, W, 3]`` images under ``image/encoded``.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    f = tfds.features
    texts = f.Tensor(shape=(None,), dtype=tf.string)
    if kind in (IMAGE_TEXT, LABEL_AS_TEXT):
        spec = {
            "image": {
                "encoded": f.Image(shape=(None, None, 3)),
                "height": f.Tensor(shape=(), dtype=tf.int64),
                "width": f.Tensor(shape=(), dtype=tf.int64),
            },
            TEXTS: texts,
            ID: f.Tensor(shape=(), dtype=tf.string),
            QUESTIONS: f.Tensor(shape=(None,), dtype=tf.string),
            ANSWERS: f.Tensor(shape=(None,), dtype=tf.string),
        }
        if kind == LABEL_AS_TEXT:
            if not class_names:
                raise ValueError("label_as_text features need the class names")
            spec[LABEL] = f.ClassLabel(names=list(class_names))
            # "label/name" cannot nest under the ClassLabel "label", so it is a flat key.
            spec[LABEL_NAME] = f.Tensor(shape=(), dtype=tf.string)
        return f.FeaturesDict(spec)
    if kind == VIDEO_TUBES:
        return f.FeaturesDict({
            "video": {
                "frames": f.Tensor(shape=(None,), dtype=tf.string),
                "fps": f.Tensor(shape=(), dtype=tf.float32),
            },
            TEXTS: texts,
            ID: f.Tensor(shape=(), dtype=tf.string),
            "transcript": {
                "current": f.Tensor(shape=(), dtype=tf.string),
                "future": f.Tensor(shape=(), dtype=tf.string),
            },
            # flat keys, as in label_as_text: "label/name" cannot nest under the tensor "label"
            LABEL: f.Tensor(shape=(), dtype=tf.int64),
            LABEL_NAME: f.Tensor(shape=(), dtype=tf.string),
        })
    raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
