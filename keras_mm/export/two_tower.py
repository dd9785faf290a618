"""SavedModel export of a two-tower model (CLIP / SigLIP / LiT), DESIGN.md's SavedModel contract.

    from keras_mm.export.two_tower import export_two_tower
    export_two_tower(model, tokenizer, input_config, eval_templates,
                     "saved_models/siglip_digits/1")

writes a TF Serving version folder whose signatures take raw inputs and run everything in-graph
(image decoding, the eval resize / crop and value range of ``eval_image_ops(input_config)``,
text normalisation and SentencePiece tokenization with the :class:`Tokenizer` module):

================  =========================================  =====================================
signature         inputs                                     outputs
================  =========================================  =====================================
embed_image       ``image_bytes`` string[N] (JPEG/PNG/GIF/   ``embedding`` float32[N, D],
                  BMP bytes; images may differ in size)      L2-normalised
embed_text        ``text`` string[N] (used as given)         ``embedding`` float32[N, D],
                                                             L2-normalised
classify          ``image_bytes`` string[N],                 ``scores`` float32[N, K]
                  ``labels`` string[K]
classify_classes  ``image_bytes`` string[N]                  ``scores`` float32[N, K],
(with             (over the K class names stored with the    ``class_index`` int64[N],
``class_names``)  export)                                    ``class_name`` string[N]
serving_default   = classify
================  =========================================  =====================================

``classify`` fills every label into each eval template stored with the export (``{}`` marks the
label; the templates are graph constants), embeds the K x T prompts, averages the normalised
prompt embeddings per label and re-normalises them (CLIP's prompt ensembling, as
``keras_mm.evaluation.zero_shot``), and returns sigmoid(t * cos + b) for sigmoid-trained models,
softmax over the K labels of t * cos for softmax-trained ones. ``classify_classes`` does the same
against class names fixed at export time: their prompt-ensembled embeddings are computed once and
stored in the SavedModel, so a request carries only images, every input and output has the batch
dimension N first, and TF Serving's server-side batching can merge its requests (it cannot merge
``classify``'s, whose ``labels`` has another first dimension).

The export needs only ``tensorflow`` and ``tensorflow_text`` to load (import ``tensorflow_text``
first, for the SentencePiece ops): no keras_mm, no Keras custom objects. The Keras variables are
tracked explicitly (as ``keras.export.ExportArchive`` does); the Keras objects themselves are not
saved.

Bad inputs fail with ``InvalidArgumentError`` naming the problem: an empty or non-image element of
``image_bytes`` ("image_bytes[i] is not a JPEG/PNG/GIF/BMP image"), an empty (or whitespace-only)
``text`` or ``labels`` element, or an empty ``labels``. The loaded model keeps working afterwards.

Besides the SavedModel the folder holds ``assets.extra/tf_serving_warmup_requests`` (one request a
signature, :mod:`keras_mm.export.warmup`) and ``assets.extra/keras_mm_export.json`` (model kind,
loss, preprocessing, max_len, templates, embedding dim, signatures).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Dict, List, Optional, Sequence

import tensorflow as tf

from keras_mm.models.two_tower import l2_normalize
from keras_mm.pipelines.datasets import InputConfig, eval_image_ops

EXPORT_INFO_FILE = os.path.join("assets.extra", "keras_mm_export.json")
MODEL_KIND = "two_tower"
FORMAT_VERSION = 1
DEFAULT_SIGNATURE = "classify"
PLACEHOLDER = "{}"

# The four leading-byte checks of tf.io.decode_image (JPEG, PNG, GIF, BMP).
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF", b"BM")


def is_encoded_image(data):
    """bool tensor: which of the strings ``data`` (any shape) start as a JPEG, PNG, GIF or BMP
    file (the leading bytes ``tf.io.decode_image`` checks); false for empty strings."""
    ok = tf.zeros_like(data, dtype=tf.bool)
    for magic in _IMAGE_MAGIC:
        ok = tf.logical_or(ok, tf.equal(tf.strings.substr(data, 0, len(magic)), magic))
    return ok

# Documented signatures: name -> ({input: (dtype, shape)}, {output: (dtype, shape)}); None is an
# unknown dimension (N images or texts, K labels), "D" the embedding dimension.
SIGNATURES = {
    "embed_image": ({"image_bytes": ("string", [None])},
                    {"embedding": ("float32", [None, "D"])}),
    "embed_text": ({"text": ("string", [None])},
                   {"embedding": ("float32", [None, "D"])}),
    "classify": ({"image_bytes": ("string", [None]), "labels": ("string", [None])},
                 {"scores": ("float32", [None, None])}),
}
# Only in exports given class names ("K" = their number).
CLASSIFY_CLASSES = ({"image_bytes": ("string", [None])},
                    {"scores": ("float32", [None, "K"]), "class_index": ("int64", [None]),
                     "class_name": ("string", [None])})


def split_templates(templates: Sequence[str]) -> List[tuple]:
    """Templates with exactly one ``{}`` -> ``[(prefix, suffix)]``.

    ``prefix + label + suffix`` equals ``template.replace("{}", label)`` (the zero-shot
    evaluation's literal fill; braces elsewhere are kept).

    Raises:
      ValueError: no templates, a non-string, or a template without exactly one ``{}``.
    """
    templates = list(templates)
    if not templates:
        raise ValueError("export needs at least one eval template (one '{}' each)")
    bad = [t for t in templates if not isinstance(t, str) or t.count(PLACEHOLDER) != 1]
    if bad:
        raise ValueError(f"every eval template needs exactly one '{{}}' for the label, bad: "
                         f"{bad[:3]}")
    return [tuple(t.split(PLACEHOLDER)) for t in templates]


def _first_bad(ok):
    """ok bool [N] -> int32 index of the first False (N when all hold; also for N = 0)."""
    bad = tf.cast(tf.logical_not(ok), tf.int32)
    return tf.argmax(tf.concat([bad, [1]], axis=0), output_type=tf.int32)


def _check(ok, message, tensor):
    """``tensor`` once every element of ``ok`` (bool [N]) holds; else InvalidArgumentError
    "assertion failed: [<message>]" (``message``: a string scalar tensor)."""
    assertion = tf.debugging.Assert(tf.reduce_all(ok), [message])
    with tf.control_dependencies([assertion]):
        return tf.identity(tensor)


class _Hidden:
    """Holds an object out of SavedModel object tracking (tf.Module tracks only trackables)."""

    def __init__(self, obj):
        self.obj = obj


class TwoTowerExportModule(tf.Module):
    """The tf.Module that is saved: raw-input signatures around a Keras ``TwoTowerModel``.

    Args:
      model: a built or unbuilt ``TwoTowerModel`` (``embed_image``, ``embed_text``, ``logits``).
      tokenizer: the :class:`~keras_mm.pipelines.tokenizer.Tokenizer` the model was trained with
        (tracked: its SentencePiece model is saved with the export).
      input_config: the ``InputConfig`` whose eval preprocessing and text settings
        (``image_size``, ``eval_mode``, ``eval_resize_ratio``, ``value_range``,
        ``resize_antialias``, ``max_text_len``, ``add_bos``) the export applies.
      eval_templates: the eval templates ``classify`` ensembles over (one ``{}`` each).
      class_names: optional class names for ``classify_classes`` (embedded once, here).
    """

    def __init__(self, model, tokenizer, input_config: InputConfig,
                 eval_templates: Sequence[str], name: str = "two_tower_export",
                 class_names: Optional[Sequence[str]] = None):
        super().__init__(name=name)
        parts = split_templates(eval_templates)
        self._model = _Hidden(model)
        self._config = _Hidden(input_config)
        self.templates = [p + PLACEHOLDER + s for p, s in parts]
        self._prefixes = [p for p, _ in parts]
        self._suffixes = [s for _, s in parts]
        self.image_size = int(input_config.image_size)
        self.max_len = int(input_config.max_text_len)
        self.add_bos = bool(input_config.add_bos)
        self.loss_type = model.logits.loss_type
        self._preprocess = eval_image_ops(input_config)

        # Tracked children: the tokenizer (SentencePiece resource) and the Keras variables.
        self.tokenizer = tokenizer
        self.embedding_dim = self._build(model)
        self.model_variables = list(model.variables)

        self.embed_image = tf.function(
            self._embed_image,
            input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        self.embed_text = tf.function(
            self._embed_text, input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        self.classify = tf.function(
            self._classify,
            input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"),
                             tf.TensorSpec([None], tf.string, name="labels")])
        self.class_names = [str(c) for c in class_names] if class_names else []
        if class_names is not None and not self.class_names:
            raise ValueError("class_names is empty: give at least one class name, or None")
        if self.class_names:
            # [K, D], computed once with the same graph pieces as classify's labels.
            self.class_embeddings = tf.Variable(
                self._label_embeddings(tf.constant(self.class_names)), trainable=False,
                name="class_embeddings")
            self.classify_classes = tf.function(
                self._classify_classes,
                input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])

    def _build(self, model) -> int:
        """Builds the model on dummy inputs of the export's shapes; returns D.

        Raises:
          ValueError: the towers do not take these shapes or disagree on D.
        """
        size = self.image_size
        try:
            image_dim = int(model.embed_image(tf.zeros([1, size, size, 3])).shape[-1])
        except Exception as e:
            raise ValueError(f"the image tower does not take [1, {size}, {size}, 3] images "
                             f"(input_config.image_size={size}): {e}") from e
        try:
            ids = tf.zeros([1, self.max_len], tf.int32)
            text_dim = int(model.embed_text(ids).shape[-1])
        except Exception as e:
            raise ValueError(f"the text tower does not take [1, {self.max_len}] token ids "
                             f"(input_config.max_text_len={self.max_len}): {e}") from e
        if image_dim != text_dim:
            raise ValueError(f"image embeddings have {image_dim} dims, text embeddings "
                             f"{text_dim}")
        return image_dim

    # ------------------------------------------------------------------ graph pieces
    def _token_ids(self, text):
        """string [N] -> int32 [N, L], exactly as the eval pipeline tokenizes."""
        return self.tokenizer.tokenize(text, self.max_len, add_bos=self.add_bos, add_eos=True)

    def _decode_images(self, image_bytes):
        """string [N] -> float32 [N, S, S, 3], eval preprocessing per image (sizes differ)."""
        empty = tf.equal(tf.strings.length(image_bytes), 0)
        is_image = is_encoded_image(image_bytes)
        index = _first_bad(is_image)
        was_empty = tf.reduce_any(tf.logical_and(empty, tf.equal(tf.range(tf.size(empty)),
                                                                 index)))
        message = tf.where(
            was_empty,
            tf.strings.format("image_bytes[{}] is empty: every element must be an encoded "
                              "JPEG/PNG/GIF/BMP image", index),
            tf.strings.format("image_bytes[{}] is not a JPEG/PNG/GIF/BMP image (send the "
                              "encoded file bytes, base64 over REST)", index))
        image_bytes = _check(is_image, message, image_bytes)
        size = self.image_size

        def preprocess(data):
            return self._preprocess({"image/encoded": data})["image"]

        return tf.map_fn(preprocess, image_bytes,
                         fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))

    def _check_texts(self, text, name: str):
        ok = tf.strings.length(self.tokenizer.normalize(text)) > 0
        message = tf.strings.format(f"{name}[{{}}] is empty (or only whitespace)",
                                    _first_bad(ok))
        return _check(ok, message, text)

    def _image_embedding(self, image_bytes):
        images = self._decode_images(image_bytes)
        return self._model.obj.embed_image(images, training=False)         # [N, D]

    def _text_embedding(self, text):
        return self._model.obj.embed_text(self._token_ids(text), training=False)  # [N, D]

    def _label_embeddings(self, labels):
        """labels string [K] -> prompt-ensembled label embeddings float32 [K, D]."""
        labels = self._check_texts(labels, "labels")
        not_empty = tf.debugging.assert_greater(
            tf.size(labels), 0, message="labels is empty: classify needs at least one label")
        with tf.control_dependencies([not_empty]):
            labels = tf.identity(labels)
        k = tf.shape(labels)[0]
        t = len(self.templates)
        shape = tf.stack([k, t])
        prompts = tf.strings.join([
            tf.broadcast_to(tf.constant(self._prefixes)[tf.newaxis, :], shape),
            tf.broadcast_to(labels[:, tf.newaxis], shape),
            tf.broadcast_to(tf.constant(self._suffixes)[tf.newaxis, :], shape)])  # [K, T]
        emb = self._text_embedding(tf.reshape(prompts, [-1]))              # [K * T, D]
        emb = tf.reshape(emb, [k, t, self.embedding_dim])
        return l2_normalize(tf.reduce_mean(l2_normalize(emb), axis=1))     # [K, D]

    # ------------------------------------------------------------------ signatures
    def _embed_image(self, image_bytes):
        return {"embedding": self._image_embedding(image_bytes)}

    def _embed_text(self, text):
        return {"embedding": self._text_embedding(self._check_texts(text, "text"))}

    def _scores(self, image_bytes, label_emb):
        image_emb = self._image_embedding(image_bytes)                     # [N, D]
        head = self._model.obj.logits
        return tf.cast(head.probabilities(head(image_emb, label_emb)), tf.float32)  # [N, K]

    def _classify(self, image_bytes, labels):
        return {"scores": self._scores(image_bytes, self._label_embeddings(labels))}

    def _classify_classes(self, image_bytes):
        scores = self._scores(image_bytes, tf.convert_to_tensor(self.class_embeddings))
        index = tf.argmax(scores, axis=1)                                  # [N] int64
        return {"scores": scores, "class_index": index,
                "class_name": tf.gather(tf.constant(self.class_names), index)}

    def _signature_table(self):
        table = dict(SIGNATURES)
        if self.class_names:
            table["classify_classes"] = CLASSIFY_CLASSES
        return table

    def signatures(self) -> Dict[str, Any]:
        """name -> concrete function, ``serving_default`` = ``classify``."""
        signatures = {"embed_image": self.embed_image.get_concrete_function(),
                      "embed_text": self.embed_text.get_concrete_function(),
                      "classify": self.classify.get_concrete_function()}
        if self.class_names:
            signatures["classify_classes"] = self.classify_classes.get_concrete_function()
        signatures["serving_default"] = signatures[DEFAULT_SIGNATURE]
        return signatures

    def info(self) -> Dict[str, Any]:
        """The ``keras_mm_export.json`` content."""
        config = self._config.obj
        head = self._model.obj.logits
        return {
            "format_version": FORMAT_VERSION,
            "model": getattr(self._model.obj, "family", MODEL_KIND),
            "loss": self.loss_type,
            "image_size": self.image_size,
            "eval_mode": config.eval_mode,
            "eval_resize_ratio": float(config.eval_resize_ratio),
            "value_range": config.value_range,
            "resize_antialias": bool(config.resize_antialias),
            "max_len": self.max_len,
            "add_bos": self.add_bos,
            **self._text_info(),
            "templates": list(self.templates),
            "class_names": list(self.class_names),
            "embedding_dim": int(self.embedding_dim),
            "logit_scale": float(head.scale.numpy()),
            "logit_bias": None if head.bias is None else float(tf.convert_to_tensor(head.bias)),
            "default_signature": DEFAULT_SIGNATURE,
            "signatures": {name: {"inputs": self._describe(inputs),
                                  "outputs": self._describe(outputs)}
                           for name, (inputs, outputs) in self._signature_table().items()},
        }

    def _text_info(self) -> Dict[str, Any]:
        """How text becomes model input, for keras_mm_export.json."""
        return {"vocab_size": int(self.tokenizer.vocab_size),
                "lowercase": bool(self.tokenizer.lowercase)}

    def _describe(self, tensors):
        sizes = {"D": self.embedding_dim, "K": len(self.class_names)}
        return {name: {"dtype": dtype, "shape": [sizes.get(d, d) for d in shape]}
                for name, (dtype, shape) in tensors.items()}


def _is_local(path: str) -> bool:
    return "://" not in path


def _check_target(export_dir: str, overwrite: bool) -> None:
    if tf.io.gfile.exists(export_dir):
        if not tf.io.gfile.isdir(export_dir):
            raise FileExistsError(f"{export_dir} exists and is not a folder")
        if tf.io.gfile.listdir(export_dir) and not overwrite:
            raise FileExistsError(f"{export_dir} exists and is not empty; export to a new "
                                  f"version folder or pass overwrite=True")


def _write_warmup(export_dir: str) -> None:
    """TF Serving warm-up requests (one a signature); verified against the export."""
    from keras_mm.export import warmup as warmup_lib

    warmup_lib.write_warmup_requests(export_dir)


def export_two_tower(model, tokenizer, input_config: InputConfig, eval_templates: Sequence[str],
                     export_dir: str, *, class_names: Optional[Sequence[str]] = None,
                     warmup: bool = True, overwrite: bool = False) -> str:
    """Writes a two-tower model as a TF Serving SavedModel version folder; returns its path.

    Args:
      model: a ``TwoTowerModel`` (sigmoid or softmax head).
      tokenizer: the model's :class:`~keras_mm.pipelines.tokenizer.Tokenizer`.
      input_config: the ``InputConfig`` of evaluation (image size and eval preprocessing, text
        length and BOS setting).
      eval_templates: templates with one ``{}`` each (``templates_eval.txt``), stored with the
        export for ``classify``.
      class_names: also add ``classify_classes`` over these names (e.g. ``classnames.txt``).
      export_dir: ``saved_models/<name>/<version>``; it must not exist or be empty, unless
        ``overwrite``.
      warmup: also write ``assets.extra/tf_serving_warmup_requests`` (replayed once against the
        export to check it).
      overwrite: replace a non-empty ``export_dir``.

    Local exports are written to a sibling staging folder and renamed into place at the end, so
    a server polling ``saved_models/<name>`` never sees half a version.

    Raises:
      FileExistsError: ``export_dir`` is a file, or a non-empty folder without ``overwrite``.
      ValueError: bad templates, towers that do not fit the config's shapes, or a Keras backend
        other than TensorFlow.
    """
    _check_backend()
    module = TwoTowerExportModule(model, tokenizer, input_config, eval_templates,
                                  class_names=class_names)
    return write_export(module, export_dir, warmup=warmup, overwrite=overwrite)


def _check_backend():
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"SavedModel export needs the TensorFlow backend (KERAS_BACKEND="
                         f"tensorflow), this process runs {keras.backend.backend()!r}")


def write_export(module, export_dir: str, *, warmup: bool = True,
                 overwrite: bool = False) -> str:
    """Saves an export module (its ``signatures()`` and ``info()``) as a TF Serving version folder,
    atomically for local paths, with warm-up requests; returns ``export_dir``."""
    _check_backend()
    export_dir = os.fspath(export_dir).rstrip("/")
    _check_target(export_dir, overwrite)
    signatures = module.signatures()

    local = _is_local(export_dir)
    if local:
        parent = os.path.dirname(os.path.abspath(export_dir))
        os.makedirs(parent, exist_ok=True)
        target = os.path.join(parent, f".{os.path.basename(export_dir)}.tmp-{uuid.uuid4().hex}")
    else:
        target = export_dir
        if tf.io.gfile.exists(target):
            tf.io.gfile.rmtree(target)
    try:
        tf.saved_model.save(module, target, signatures=signatures)
        info_path = os.path.join(target, EXPORT_INFO_FILE)
        tf.io.gfile.makedirs(os.path.dirname(info_path))
        with tf.io.gfile.GFile(info_path, "w") as f:
            f.write(json.dumps(module.info(), indent=2) + "\n")
        if warmup:
            _write_warmup(target)
        if local:
            if os.path.exists(export_dir):
                shutil.rmtree(export_dir)
            os.rename(target, export_dir)
    except BaseException:
        if local and os.path.exists(target):
            shutil.rmtree(target, ignore_errors=True)
        raise
    return export_dir


def read_export_info(export_dir: str) -> Dict[str, Any]:
    """``assets.extra/keras_mm_export.json`` of an export."""
    path = os.path.join(export_dir, EXPORT_INFO_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found (not a keras-mm export?)")
    with tf.io.gfile.GFile(path, "r") as f:
        return json.loads(f.read())
