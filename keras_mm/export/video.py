"""SavedModel export of the video models (issue 7), DESIGN.md's SavedModel contract.

    from keras_mm.export.video import export_video
    export_video(model, tokenizer, input_config, "saved_models/tubevit_moving_digits/1")

Clips arrive as ``frames`` string ``[N, T]``, one encoded JPEG (or PNG / GIF / BMP) a frame, as
the video records store them. Inside the graph each clip goes through the eval pipeline's own
video ops (``eval_video_ops(input_config)``): ``num_frames`` frames taken with
``eval_temporal_sampling``, decoded, resized / cropped to ``image_size``, value range. So a
client may send clips of any length T >= 1 (shorter clips repeat their last frame, as in the
pipeline) and gets exactly what evaluation computed.

================  =========================================  ===================================
signature         inputs                                     outputs
================  =========================================  ===================================
embed_video       ``frames`` string[N, T]                    ``embedding`` float32[N, D],
(contrastive)                                                L2-normalised
embed_text        ``text`` string[N]                         ``embedding`` float32[N, D]
(contrastive)
caption_video     ``frames`` string[N, T]                    ``caption`` string[N]
(MaMMUT video)
next_utterance    ``frames`` string[N, T],                   ``utterance`` string[N]
(MV-GPT)          ``transcript`` string[N] (what was said)
serving_default   caption_video, else next_utterance, else embed_video
================  =========================================  ===================================

Generation uses the in-graph search of the captioners (greedy or beam, fixed at export time, in
``keras_mm_export.json``). Bad inputs (an empty or non-image frame, a clip with no frame, an empty
text) fail with ``InvalidArgumentError`` naming the problem; the loaded model keeps working. The
export loads with ``tensorflow`` and ``tensorflow_text`` only.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import tensorflow as tf

from keras_mm.export import two_tower
from keras_mm.export.captioner import _describe_table, decode_settings
from keras_mm.pipelines.datasets import InputConfig, eval_video_ops
from keras_mm.pipelines.features import VIDEO_FRAMES

_FRAMES = ("string", [None, None])
_STRINGS = ("string", [None])
EMBED_VIDEO = ({"frames": _FRAMES}, {"embedding": ("float32", [None, "D"])})
EMBED_TEXT = ({"text": _STRINGS}, {"embedding": ("float32", [None, "D"])})
CAPTION_VIDEO = ({"frames": _FRAMES}, {"caption": _STRINGS})
NEXT_UTTERANCE = ({"frames": _FRAMES, "transcript": _STRINGS}, {"utterance": _STRINGS})


def _model_kind(model) -> str:
    family = getattr(model, "family", None)
    if family == "mvgpt":
        return "mvgpt"
    if getattr(model, "visual_key", "image") != "video":
        raise ValueError(f"not a video model: family {family!r} reads {model.visual_key!r} "
                         "batches (export image models with keras_mm.export.two_tower / "
                         "captioner)")
    return {"two_tower": "video_two_tower", "mammut": "video_mammut"}.get(family, family)


class VideoExportModule(tf.Module):
    """The saved tf.Module of a video model.

    Args:
      model: a video ``TwoTowerModel`` / ``MaMMUTModel`` (``visual_key="video"``) or an
        ``MVGPTModel``.
      tokenizer: its :class:`~keras_mm.pipelines.tokenizer.Tokenizer` (saved with the export).
      input_config: the eval ``InputConfig`` (frame size and preprocessing, ``num_frames``, text
        length and BOS setting, ``max_current_len`` for MV-GPT's transcript).
      decode: :func:`~keras_mm.export.captioner.decode_settings` (generating models).
    """

    _check_texts = two_tower.TwoTowerExportModule._check_texts
    _token_ids = two_tower.TwoTowerExportModule._token_ids

    def __init__(self, model, tokenizer, input_config: InputConfig,
                 decode: Optional[Dict[str, Any]] = None, name: str = "video_export"):
        super().__init__(name=name)
        self.kind = _model_kind(model)
        self._model = two_tower._Hidden(model)
        self._config = two_tower._Hidden(input_config)
        self.image_size = int(input_config.image_size)
        self.num_frames = int(input_config.num_frames)
        self.max_len = int(input_config.max_text_len)
        self.max_prompt_len = int(input_config.max_current_len)
        self.add_bos = bool(input_config.add_bos)
        self._video_ops = eval_video_ops(input_config)
        self.tokenizer = tokenizer
        self.contrastive = self.kind in ("video_two_tower", "video_mammut")
        self.generates = self.kind in ("video_mammut", "mvgpt")
        self.decode = dict(decode or {}) if self.generates else {}
        if self.generates and not self.decode:
            raise ValueError(f"a {self.kind} export needs decode settings")
        self.embedding_dim = self._build(model)
        self.model_variables = list(model.variables)

        frames = tf.TensorSpec([None, None], tf.string, name="frames")
        text = tf.TensorSpec([None], tf.string, name="text")
        if self.contrastive:
            self.embed_video = tf.function(self._embed_video, input_signature=[frames])
            self.embed_text = tf.function(self._embed_text, input_signature=[text])
        if self.kind == "video_mammut":
            self.caption_video = tf.function(self._caption_video, input_signature=[frames])
        if self.kind == "mvgpt":
            self.next_utterance = tf.function(
                self._next_utterance,
                input_signature=[frames, tf.TensorSpec([None], tf.string, name="transcript")])

    # ------------------------------------------------------------------ building
    def _dummy_video(self):
        return tf.zeros([1, self.num_frames, self.image_size, self.image_size, 3])

    def _build(self, model) -> int:
        """Creates every variable on dummy inputs; returns the embedding width (0: none)."""
        video = self._dummy_video()
        ids = tf.ones([1, self.max_len], tf.int32)
        try:
            if self.kind == "mvgpt":
                model({"video": video, "current": tf.ones([1, self.max_prompt_len], tf.int32),
                       "future": ids})
                return 0
            model({"video": video, "text": ids})
            return int(model.embed_image(video).shape[-1])
        except Exception as e:
            raise ValueError(f"the model does not take [1, {self.num_frames}, {self.image_size}, "
                             f"{self.image_size}, 3] clips and [1, {self.max_len}] token ids "
                             f"(input_config.num_frames / image_size / max_text_len): {e}") from e

    # ------------------------------------------------------------------ graph pieces
    def _decode_clips(self, frames):
        """string [N, T] -> float32 [N, num_frames, S, S, 3] (checked, preprocessed, sampled)."""
        shape = tf.shape(frames)
        n, t = shape[0], shape[1]
        has_frames = tf.logical_or(tf.equal(n, 0), tf.greater(t, 0))
        frames = two_tower._check(has_frames[tf.newaxis], tf.constant(
            "frames has no frame (shape [N, 0]): send at least one frame a clip"), frames)
        flat = tf.reshape(frames, [-1])                                        # [N * T]
        ok = two_tower.is_encoded_image(flat)
        bad = two_tower._first_bad(ok)
        t_safe = tf.maximum(t, 1)
        message = tf.strings.format(
            "frames[{}, {}] is empty or not a JPEG/PNG/GIF/BMP image (send the encoded frame "
            "bytes, base64 over REST)", (bad // t_safe, bad % t_safe))
        frames = tf.reshape(two_tower._check(ok, message, flat), tf.shape(frames))
        size = self.image_size

        def preprocess(clip):                                   # string [T] -> [n, S, S, 3]
            return self._video_ops({VIDEO_FRAMES: clip})["video"]

        return tf.map_fn(preprocess, frames, fn_output_signature=tf.TensorSpec(
            [self.num_frames, size, size, 3], tf.float32))

    def _text(self, tokens):
        return tf.strings.strip(self.tokenizer.detokenize(tokens))

    # ------------------------------------------------------------------ signatures
    def _embed_video(self, frames):
        return {"embedding": self._model.obj.embed_image(self._decode_clips(frames),
                                                         training=False)}

    def _embed_text(self, text):
        text = self._check_texts(text, "text")
        return {"embedding": self._model.obj.embed_text(self._token_ids(text), training=False)}

    def _caption_video(self, frames):
        return {"caption": self._text(self._model.obj.generate(self._decode_clips(frames),
                                                               **self.decode))}

    def _next_utterance(self, frames, transcript):
        n_clips, n_texts = tf.shape(frames)[0], tf.size(transcript)
        message = tf.strings.format("next_utterance takes one transcript per clip: frames has "
                                    "{} clips, transcript {}", (n_clips, n_texts))
        transcript = two_tower._check(tf.equal(n_clips, n_texts)[tf.newaxis], message,
                                      transcript)
        current = self.tokenizer.tokenize(transcript, self.max_prompt_len, add_bos=False,
                                          add_eos=True)
        tokens = self._model.obj.generate(self._decode_clips(frames), current, **self.decode)
        return {"utterance": self._text(tokens)}

    # ------------------------------------------------------------------ description
    def _table(self):
        table = {}
        if self.contrastive:
            table.update(embed_video=EMBED_VIDEO, embed_text=EMBED_TEXT)
        if self.kind == "video_mammut":
            table["caption_video"] = CAPTION_VIDEO
        if self.kind == "mvgpt":
            table["next_utterance"] = NEXT_UTTERANCE
        return table

    @property
    def default_signature(self) -> str:
        return {"video_mammut": "caption_video", "mvgpt": "next_utterance"}.get(
            self.kind, "embed_video")

    def signatures(self) -> Dict[str, Any]:
        """name -> concrete function, plus ``serving_default``."""
        signatures = {name: getattr(self, name).get_concrete_function()
                      for name in self._table()}
        signatures["serving_default"] = signatures[self.default_signature]
        return signatures

    def info(self) -> Dict[str, Any]:
        """The ``keras_mm_export.json`` content."""
        config = self._config.obj
        table = _describe_table(self._table())
        for spec in table.values():
            for tensor in spec["outputs"].values():
                tensor["shape"] = [self.embedding_dim if d == "D" else d
                                   for d in tensor["shape"]]
        return {
            "format_version": two_tower.FORMAT_VERSION,
            "model": self.kind,
            "image_size": self.image_size,
            "num_frames": self.num_frames,
            "eval_mode": config.eval_mode,
            "value_range": config.value_range,
            "max_len": self.max_len,
            "max_prompt_len": self.max_prompt_len,
            "add_bos": self.add_bos,
            "vocab_size": int(self.tokenizer.vocab_size),
            "lowercase": bool(self.tokenizer.lowercase),
            "embedding_dim": int(self.embedding_dim),
            "decode": dict(self.decode),
            "default_signature": self.default_signature,
            "signatures": table,
        }


def export_video(model, tokenizer, input_config: InputConfig, export_dir: str, *,
                 method: str = "greedy", beam_size: int = 4, length_penalty: float = 0.6,
                 max_length: Optional[int] = None, warmup: bool = True,
                 overwrite: bool = False) -> str:
    """Writes a video model as a TF Serving SavedModel version folder; returns its path.

    Raises:
      FileExistsError: ``export_dir`` is a file, or a non-empty folder without ``overwrite``.
      ValueError: not a video model, bad decode settings, a model that does not fit the
        config's shapes, or a Keras backend other than TensorFlow.
    """
    two_tower._check_backend()
    kind = _model_kind(model)
    decode = None
    if kind in ("video_mammut", "mvgpt"):
        decode = decode_settings(model, method, beam_size, length_penalty, max_length)
    module = VideoExportModule(model, tokenizer, input_config, decode)
    return two_tower.write_export(module, export_dir, warmup=warmup, overwrite=overwrite)
