"""SavedModel export of a captioner (CoCa, CapPa, MaMMUT, the PaLI-style model), DESIGN.md's
SavedModel contract.

    from keras_mm.export.captioner import export_captioner
    export_captioner(model, tokenizer, input_config, "saved_models/coca_scenes/1",
                     eval_templates=templates, method="beam", beam_size=4)

The caption is generated inside the graph: the image bytes are decoded and preprocessed as the
eval pipeline does (``eval_image_ops(input_config)``, the image checks of
:class:`~keras_mm.export.two_tower.TwoTowerExportModule`), ``model.generate`` runs its in-graph
search (:mod:`keras_mm.decoders.search`, a while loop over a dynamic batch) and the token ids are
detokenized with the model's SentencePiece :class:`~keras_mm.pipelines.tokenizer.Tokenizer`
(everything from the first EOS on is dropped, then surrounding whitespace).

================  ======================================  ==================================
signature         inputs                                  outputs
================  ======================================  ==================================
caption           ``image_bytes`` string[N]               ``caption`` string[N]
caption_parallel  ``image_bytes`` string[N]               ``caption`` string[N]
(CapPa)           (one decoder pass over mask tokens)
answer            ``image_bytes`` string[N],              ``answer`` string[N]
(PaLI-style)      ``question`` string[N] (one per image)
embed_image,      as the two-tower export                 as the two-tower export
embed_text,
classify(,
classify_classes)
(CoCa, MaMMUT)
serving_default   = caption
================  ======================================  ==================================

The search (``method`` "greedy" or "beam", ``beam_size``, ``length_penalty``, ``max_length``) is
fixed at export time and recorded in ``keras_mm_export.json`` (``"decode"``); sampling is not
exported (a served caption should not change from one request to the next). ``answer`` uses
the same settings.

The PaLI-style model is prompted as it was trained (``pipelines.datasets.prompt_mixture_op``):
``caption`` with ``input_config.caption_prompt`` (the pipeline's "caption en"), ``answer`` with
the question; both tokenized without BOS, EOS-terminated, to ``input_config.max_prompt_len``
tokens (longer questions are cut to keep their EOS).

CoCa and MaMMUT are two-tower models as well (their contrastive towers are views of the
captioner), so their exports carry the two-tower signatures too (``classify`` fills each label
into ``eval_templates``; without templates, the label itself is the prompt: ``["{}"]``).

Bad inputs fail with ``InvalidArgumentError`` naming the problem (an empty or non-image
``image_bytes`` element, an empty ``question``, not one question per image) and the loaded
model keeps working. The export loads with ``tensorflow`` and ``tensorflow_text`` only.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import tensorflow as tf

from keras_mm.export import two_tower
from keras_mm.pipelines.datasets import InputConfig, eval_image_ops

CAPTIONER_FAMILIES = ("coca", "cappa", "mammut", "pali")
CONTRASTIVE_FAMILIES = ("coca", "mammut")       # also TwoTowerModels: two-tower signatures too
PROMPTED_FAMILIES = ("pali",)                    # generate(images, prompt=ids)
PARALLEL_FAMILIES = ("cappa",)                   # parallel_decode(images)
DECODE_METHODS = ("greedy", "beam")
DEFAULT_SIGNATURE = "caption"
# Without eval templates, classify embeds every label as given.
DEFAULT_TEMPLATES = ("{}",)

_STRINGS = ("string", [None])
CAPTION = ({"image_bytes": _STRINGS}, {"caption": _STRINGS})
ANSWER = ({"image_bytes": _STRINGS, "question": _STRINGS}, {"answer": _STRINGS})


def decode_settings(model, method: str = "greedy", beam_size: int = 4,
                    length_penalty: float = 0.6,
                    max_length: Optional[int] = None) -> Dict[str, Any]:
    """The validated search settings of an export (``model.generate`` kwargs).

    ``max_length`` None is the model's longest caption (``model.max_caption_length``).

    Raises:
      ValueError: an unknown or unexported method, beam_size < 1, or a max_length outside
        ``[1, model.max_caption_length]``.
    """
    if method == "sample":
        raise ValueError("method='sample' is not exported (a served caption must not change "
                         "between identical requests); use 'greedy' or 'beam'")
    if method not in DECODE_METHODS:
        raise ValueError(f"method must be one of {DECODE_METHODS}, got {method!r}")
    if int(beam_size) < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    longest = int(model.max_caption_length)
    max_length = longest if max_length is None else int(max_length)
    if not 1 <= max_length <= longest:
        raise ValueError(f"max_length must be in [1, {longest}] (the model's longest caption), "
                         f"got {max_length}")
    return {"method": method, "beam_size": int(beam_size),
            "length_penalty": float(length_penalty), "max_length": max_length}


class _CaptionSignatures:
    """The captioning half of an export module (mixed into a ``tf.Module`` that provides
    ``_model``, ``_config``, ``tokenizer``, ``_decode_images`` and ``_check_texts``)."""

    def _init_caption(self, model, tokenizer, input_config: InputConfig,
                      decode: Dict[str, Any]) -> None:
        family = getattr(model, "family", None)
        if family not in CAPTIONER_FAMILIES:
            raise ValueError(f"not a captioner: model family {family!r} (captioners: "
                             f"{', '.join(CAPTIONER_FAMILIES)})")
        vocab = int(model.decoder.vocab_size)
        if vocab > int(tokenizer.vocab_size):
            raise ValueError(f"the decoder predicts {vocab} token ids, the tokenizer has only "
                             f"{tokenizer.vocab_size}: not the model's tokenizer")
        self.family = family
        self.decode = dict(decode)
        self.prompted = family in PROMPTED_FAMILIES
        self.parallel = family in PARALLEL_FAMILIES
        if self.prompted:
            self.caption_prompt = str(input_config.caption_prompt)
            self.max_prompt_len = int(input_config.max_prompt_len)
            if self.max_prompt_len > int(model.max_prompt_len):
                raise ValueError(f"input_config.max_prompt_len={self.max_prompt_len} exceeds "
                                 f"the model's max_prompt_len={model.max_prompt_len}")
            # [1, P]: the captioning prompt's ids, as the training pipeline makes them.
            self._caption_prompt_ids = two_tower._Hidden(
                self._prompt_ids(tf.constant([self.caption_prompt])).numpy())

        image_spec = tf.TensorSpec([None], tf.string, name="image_bytes")
        self.caption = tf.function(self._caption, input_signature=[image_spec])
        if self.parallel:
            self.caption_parallel = tf.function(self._caption_parallel,
                                                input_signature=[image_spec])
        if self.prompted:
            self.answer = tf.function(
                self._answer,
                input_signature=[image_spec, tf.TensorSpec([None], tf.string, name="question")])

    def _build_captioner(self, model) -> None:
        """Creates every variable of the model (a teacher-forced pass on dummy inputs), so the
        traced signatures create none.

        Raises:
          ValueError: the model does not take the export's shapes.
        """
        size, length = self.image_size, self.max_len
        kwargs = {}
        if getattr(model, "family", None) in PROMPTED_FAMILIES:
            kwargs["prompt"] = tf.zeros([1, int(self._config.obj.max_prompt_len)], tf.int32)
        try:
            model.caption_logits(tf.zeros([1, size, size, 3]), tf.zeros([1, length], tf.int32),
                                 **kwargs)
        except Exception as e:
            raise ValueError(f"the captioner does not take [1, {size}, {size}, 3] images and "
                             f"[1, {length}] token ids (input_config.image_size / "
                             f"max_text_len): {e}") from e

    # ------------------------------------------------------------------ graph pieces
    def _prompt_ids(self, text):
        """string [N] -> int32 [N, P]: no BOS, EOS-terminated (``prompt_mixture_op``)."""
        return self.tokenizer.tokenize(text, self.max_prompt_len, add_bos=False, add_eos=True)

    def _generate(self, images, prompt=None):
        """images [N, S, S, 3] -> token ids [N, max_length] with the export's search."""
        kwargs = dict(self.decode)
        if prompt is not None:
            kwargs["prompt"] = prompt
        return self._model.obj.generate(images, **kwargs)

    def _text(self, tokens):
        """ids [N, T] -> string [N]: up to the first EOS, PAD / BOS dropped, stripped."""
        return tf.strings.strip(self.tokenizer.detokenize(tokens))

    # ------------------------------------------------------------------ signatures
    def _caption(self, image_bytes):
        images = self._decode_images(image_bytes)                          # [N, S, S, 3]
        prompt = None
        if self.prompted:
            prompt = tf.tile(tf.constant(self._caption_prompt_ids.obj, tf.int32),
                             tf.stack([tf.shape(images)[0], 1]))             # [N, P]
        return {"caption": self._text(self._generate(images, prompt))}

    def _caption_parallel(self, image_bytes):
        images = self._decode_images(image_bytes)
        tokens = self._model.obj.parallel_decode(images, max_length=self.decode["max_length"])
        return {"caption": self._text(tokens)}

    def _answer(self, image_bytes, question):
        n_images, n_questions = tf.size(image_bytes), tf.size(question)
        message = tf.strings.format("answer takes one question per image: image_bytes has {} "
                                    "elements, question {}", (n_images, n_questions))
        question = two_tower._check(tf.equal(n_images, n_questions)[tf.newaxis], message,
                                    question)
        question = self._check_texts(question, "question")
        images = self._decode_images(image_bytes)
        return {"answer": self._text(self._generate(images, self._prompt_ids(question)))}

    # ------------------------------------------------------------------ description
    def _caption_signature_table(self):
        table = {"caption": CAPTION}
        if self.parallel:
            table["caption_parallel"] = CAPTION
        if self.prompted:
            table["answer"] = ANSWER
        return table

    def _caption_signatures(self) -> Dict[str, Any]:
        signatures = {"caption": self.caption.get_concrete_function()}
        if self.parallel:
            signatures["caption_parallel"] = self.caption_parallel.get_concrete_function()
        if self.prompted:
            signatures["answer"] = self.answer.get_concrete_function()
        return signatures

    def _caption_info(self) -> Dict[str, Any]:
        info = {"decode": dict(self.decode), "default_signature": DEFAULT_SIGNATURE}
        if self.prompted:
            info.update(caption_prompt=self.caption_prompt, max_prompt_len=self.max_prompt_len)
        return info


class CaptionerExportModule(_CaptionSignatures, tf.Module):
    """The saved tf.Module of a captioner without contrastive towers (CapPa, PaLI-style).

    Args:
      model: the captioner (``generate``, ``caption_logits``, ``family``).
      tokenizer: its :class:`~keras_mm.pipelines.tokenizer.Tokenizer` (tracked: saved with the
        export).
      input_config: the eval ``InputConfig`` (image preprocessing, ``max_text_len``, the
        PaLI-style prompt settings).
      decode: :func:`decode_settings`.
    """

    # The image decoding and text checks of the two-tower export (same messages).
    _decode_images = two_tower.TwoTowerExportModule._decode_images
    _check_texts = two_tower.TwoTowerExportModule._check_texts

    def __init__(self, model, tokenizer, input_config: InputConfig, decode: Dict[str, Any],
                 name: str = "captioner_export"):
        super().__init__(name=name)
        self._model = two_tower._Hidden(model)
        self._config = two_tower._Hidden(input_config)
        self.image_size = int(input_config.image_size)
        self.max_len = int(input_config.max_text_len)
        self.add_bos = bool(input_config.add_bos)
        self._preprocess = eval_image_ops(input_config)
        self.tokenizer = tokenizer
        self._init_caption(model, tokenizer, input_config, decode)
        self._build_captioner(model)
        # Tracked: the Keras variables (the Keras objects themselves are not saved).
        self.model_variables = list(model.variables)

    def signatures(self) -> Dict[str, Any]:
        """name -> concrete function, ``serving_default`` = ``caption``."""
        signatures = self._caption_signatures()
        signatures["serving_default"] = signatures[DEFAULT_SIGNATURE]
        return signatures

    def info(self) -> Dict[str, Any]:
        """The ``keras_mm_export.json`` content."""
        config = self._config.obj
        return {
            "format_version": two_tower.FORMAT_VERSION,
            "model": self.family,
            "image_size": self.image_size,
            "eval_mode": config.eval_mode,
            "eval_resize_ratio": float(config.eval_resize_ratio),
            "value_range": config.value_range,
            "resize_antialias": bool(config.resize_antialias),
            "max_len": self.max_len,
            "add_bos": self.add_bos,
            "vocab_size": int(self.tokenizer.vocab_size),
            "lowercase": bool(self.tokenizer.lowercase),
            **self._caption_info(),
            "signatures": _describe_table(self._caption_signature_table()),
        }


class ContrastiveCaptionerExportModule(_CaptionSignatures, two_tower.TwoTowerExportModule):
    """The saved tf.Module of CoCa / MaMMUT: the two-tower signatures plus ``caption``.

    Args: as :class:`CaptionerExportModule`, plus the two-tower export's ``eval_templates`` and
    ``class_names``.
    """

    def __init__(self, model, tokenizer, input_config: InputConfig, decode: Dict[str, Any],
                 eval_templates: Sequence[str] = DEFAULT_TEMPLATES,
                 class_names: Optional[Sequence[str]] = None,
                 name: str = "captioner_export"):
        super().__init__(model, tokenizer, input_config, eval_templates, name=name,
                         class_names=class_names)
        self._init_caption(model, tokenizer, input_config, decode)

    def _build(self, model) -> int:
        dim = super()._build(model)
        self._build_captioner(model)
        return dim

    def _signature_table(self):
        return {**super()._signature_table(), **self._caption_signature_table()}

    def signatures(self) -> Dict[str, Any]:
        signatures = super().signatures()
        signatures.update(self._caption_signatures())
        signatures["serving_default"] = signatures[DEFAULT_SIGNATURE]
        return signatures

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info.update(self._caption_info())
        return info


def _describe_table(table):
    return {name: {"inputs": {k: {"dtype": d, "shape": s} for k, (d, s) in inputs.items()},
                   "outputs": {k: {"dtype": d, "shape": s} for k, (d, s) in outputs.items()}}
            for name, (inputs, outputs) in table.items()}


def export_captioner(model, tokenizer, input_config: InputConfig, export_dir: str, *,
                     eval_templates: Optional[Sequence[str]] = None,
                     class_names: Optional[Sequence[str]] = None, method: str = "greedy",
                     beam_size: int = 4, length_penalty: float = 0.6,
                     max_length: Optional[int] = None, warmup: bool = True,
                     overwrite: bool = False) -> str:
    """Writes a captioner as a TF Serving SavedModel version folder; returns its path.

    Args:
      model: a ``CoCaModel``, ``CapPaModel``, ``MaMMUTModel`` or ``PaLIModel``.
      tokenizer: its :class:`~keras_mm.pipelines.tokenizer.Tokenizer`.
      input_config: the ``InputConfig`` of evaluation (image size and eval preprocessing, text
        length and BOS setting; the PaLI-style ``caption_prompt`` and ``max_prompt_len``).
      export_dir: ``saved_models/<name>/<version>``; it must not exist or be empty, unless
        ``overwrite``.
      eval_templates: CoCa / MaMMUT: ``classify``'s templates (default ``["{}"]``); ignored by
        the others.
      class_names: CoCa / MaMMUT: also add ``classify_classes`` over these names.
      method, beam_size, length_penalty, max_length: the search (:func:`decode_settings`).
      warmup: also write (and replay) ``assets.extra/tf_serving_warmup_requests``.
      overwrite: replace a non-empty ``export_dir``.

    Raises:
      FileExistsError: ``export_dir`` is a file, or a non-empty folder without ``overwrite``.
      ValueError: not a captioner, bad decode settings or templates, a model that does not fit
        the config's shapes, a tokenizer smaller than the decoder's vocabulary, or a Keras
        backend other than TensorFlow.
    """
    two_tower._check_backend()
    family = getattr(model, "family", None)
    if family not in CAPTIONER_FAMILIES:
        raise ValueError(f"not a captioner: model family {family!r} (captioners: "
                         f"{', '.join(CAPTIONER_FAMILIES)}; export two-tower models with "
                         f"keras_mm.export.two_tower)")
    decode = decode_settings(model, method, beam_size, length_penalty, max_length)
    if family in CONTRASTIVE_FAMILIES:
        module = ContrastiveCaptionerExportModule(
            model, tokenizer, input_config, decode,
            eval_templates=list(eval_templates or DEFAULT_TEMPLATES), class_names=class_names)
    else:
        module = CaptionerExportModule(model, tokenizer, input_config, decode)
    return two_tower.write_export(module, export_dir, warmup=warmup, overwrite=overwrite)
