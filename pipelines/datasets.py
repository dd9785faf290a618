"""Train / eval ``tf.data`` pipelines from a dataset folder (DESIGN.md, data contract) and a config.

A dataset folder holds ``{split}.tfrecord-{i:05d}-of-{n:05d}`` shards of image-text or
label-as-text records (label-as-text folders also hold ``classnames.txt``) and usually
``tokenizer.model``. Batches are dicts:

==========  ==============================  ==================================================
key         dtype / shape                   what
==========  ==============================  ==================================================
image       float32 ``[B, S, S, 3]``        preprocessed image (``InputConfig.value_range``)
text        int32 ``[B, L]``                one caption (train: ``train_caption``; eval: first)
texts       int32 ``[B, K, L]``             eval with ``eval_texts="all"``: K =
                                            ``eval_max_texts`` captions, missing ones all PAD
num_texts   int32 ``[B]``                   eval with ``eval_texts="all"``: captions present
id          string ``[B]``                  record id
label       int64 ``[B]``                   label-as-text datasets only
==========  ==============================  ==================================================

With ``InputConfig.hard_negatives`` training batches also hold ``text_negative`` (int32
``[B, L]``: the chosen caption with one word of a configured group swapped, NegCLIP) and
``negative_valid`` (bool ``[B]``); with ``InputConfig.contrastive_caption`` they hold
``text_contrastive`` (int32 ``[B, L]``: a second caption, for a captioner's contrastive head).

With ``InputConfig.render_text`` (CLIPPO: captions rendered as images by
:class:`~keras_mm.pipelines.ops.render_text.TextRenderer`, no tokenizer needed):

===========  ==============================  =================================================
key          dtype / shape                   what
===========  ==============================  =================================================
text_images  float32 ``[B, S, S, 3]``        the caption rendered (train: ``train_caption``,
                                             eval: first), ``value_range`` like ``image``;
                                             replaces the training ``text``
text         int32 ``[B, M]``                eval only: the first caption's Unicode code
                                             points (M = the renderer's ``max_chars``, 0-padded)
texts        int32 ``[B, K, M]``             eval with ``eval_texts="all"``: code points
===========  ==============================  =================================================

The renderer is then the "tokenizer" of the datasets and of the evaluators (its ``tokenize``
gives code points; see :func:`text_renderer`).

Video folders (``video_tubes`` records; :class:`VideoInputConfig`, :func:`video_train_dataset`,
:func:`video_eval_dataset`, :func:`video_caption_eval_dataset`):

==========  ==============================  ==================================================
key         dtype / shape                   what
==========  ==============================  ==================================================
video       float32 ``[B, T, S, S, 3]``     T = ``num_frames`` sampled frames, one crop (and
                                            flip) per clip, ``value_range`` like ``image``
text        int32 ``[B, L]``                one caption (train: ``train_caption``; eval: first)
texts       int32 ``[B, K, L]``             eval with ``eval_texts="all"`` (as for images)
num_texts   int32 ``[B]``                   eval with ``eval_texts="all"``
label       int64 ``[B]``                   motion class, -1 when the record has none
id          string ``[B]``                  record id
current     int32 ``[B, P]``                ``transcripts``: current utterance, no BOS,
                                            EOS-terminated, PAD 0 (P = ``max_current_len``)
future      int32 ``[B, L]``                ``transcripts``: future utterance,
                                            ``BOS .. EOS PAD..`` (the captioners' layout)
==========  ==============================  ==================================================

Everything in the map functions is TensorFlow ops (no ``py_function``). Random augmentation is
stateless, from a per-example seed ``_seed`` derived from ``InputConfig.seed``, the input
pipeline id and the example's position in the (shuffled) stream.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import tensorflow as tf

from keras_mm.pipelines import features as F
from keras_mm.pipelines.ops import augment as augment_ops
from keras_mm.pipelines.ops import image as image_ops
from keras_mm.pipelines.ops import render_text as render_ops
from keras_mm.pipelines.ops import text as text_ops
from keras_mm.pipelines.ops import video as video_ops
from keras_mm.pipelines.tokenizer import PAD_ID, Tokenizer

AUTOTUNE = tf.data.AUTOTUNE
TOKENIZER_FILE = "tokenizer.model"
CLASSNAMES_FILE = "classnames.txt"

AUGMENTS = ("none", "crop_flip", "randaugment")
EVAL_MODES = ("center_crop", "resize")
VALUE_RANGES = ("-1_1", "0_1", "imagenet")
PROMPT_MIXTURES = ("", "caption_qa")
QUESTIONS, ANSWERS = "questions", "answers"   # optional features of image-text records


SAMPLINGS_TRAIN = ("random", "uniform")
SAMPLINGS_EVAL = ("uniform", "center")
VIDEO_AUGMENTS = ("none", "crop")


@dataclasses.dataclass
class InputConfig:
    """How to turn a dataset folder into batches (recipes embed one).

    Attributes:
      image_size: output side S of the square images.
      augment: training image transform: "none" (plain resize; digits must not be cropped or
        flipped), "crop_flip" (random resized crop + horizontal flip), "randaugment"
        (crop_flip, then RandAugment).
      randaugment_layers, randaugment_magnitude: RandAugment N and M (M in [0, 10]).
      crop_scale: area fraction range of the random resized crop.
      crop_ratio: aspect ratio (width / height) range of the random resized crop.
      eval_mode: "center_crop" (resize the short side to S / eval_resize_ratio, crop the central
        S x S) or "resize" (plain resize to S x S).
      eval_resize_ratio: see eval_mode (0.875 is the usual ImageNet choice; 1 crops the largest
        central square).
      value_range: "-1_1", "0_1" (uint8 scaled linearly) or "imagenet" (ImageNet mean / std).
      max_text_len: token sequence length L.
      add_bos: start token sequences with BOS (decoders); EOS always ends them.
      train_caption: "random" (one caption per example, uniformly) or "first".
      contrastive_caption: "" (a contrastive head uses ``text``) or a caption mode ("random",
        "first") for a second caption, drawn independently of ``text``: training batches then
        also hold ``text_contrastive`` (tokenized like ``text``). For captioners with a
        contrastive head (CoCa, MaMMUT): they caption ``text`` and contrast
        ``text_contrastive``, and identical captions in a batch are left out of each other's
        softmax instead of being negatives (``softmax_contrastive_loss(text_ids=...)``).
        Image-text datasets with tokenized text only.
      hard_negatives: word groups for hard negative captions (NegCLIP; ``""``: none), groups
        separated by "|", words by spaces, e.g. ``"0 1 2 3 4 5 6 7 8 9|small large|left
        right"``: training batches then also hold ``text_negative`` (the chosen caption with
        one grouped word swapped for another of its group, :func:`text_ops.hard_negative`,
        tokenized like ``text``) and ``negative_valid`` (bool ``[B]``, false when the caption
        has no grouped word). Image-text datasets with tokenized text only.
      eval_texts: "first" (``text`` [B, L]) or "all" (``texts`` [B, K, L] + ``num_texts``).
      eval_max_texts: K for eval_texts="all".
      batch_size: global batch size (per replica: divided by the replicas of an input context).
      shuffle_buffer: examples in the shuffle buffer (training).
      seed: seed of file order, shuffling and augmentation.
      cycle_length: files read concurrently (training).
      block_length: consecutive records taken from each file (training).
      num_parallel_calls: parallel map calls (-1 = AUTOTUNE).
      drop_remainder: drop the last incomplete training batch (eval always keeps it).
      cache: cache the raw serialized records in memory after the first pass.
      repeat: repeat the training data forever.
      resize_antialias: antialias when downscaling (better for large photos, slower).
      deterministic: training batches in a reproducible order (exact resume after a kill, tests);
        False lets tf.data reorder for speed.
      render_text: CLIPPO: captions become ``text_images`` rendered at ``image_size`` in
        ``value_range`` (:func:`text_renderer`) instead of token ids; no tokenizer is needed.
      render_background: grey level (0..255) of the paper the text is rendered on (the text is
        black): 255 white; big_vision's CLIPPO config renders on 127.
      prompt_mixture: "" (none) or "caption_qa" (the PaLI-style model): every training example
        becomes a (prompt, target) pair, a question and its answer (records' ``questions`` /
        ``answers``) with probability ``qa_fraction``, else ``caption_prompt`` and a caption;
        the batch gets ``prompt`` int32 ``[B, max_prompt_len]`` (no BOS, EOS-terminated) and
        the target as ``text``.
      qa_fraction: see prompt_mixture (records without questions are always captioning).
      caption_prompt: the captioning task's prompt.
      max_prompt_len: prompt token length P.
      num_frames: video: frames per clip, T (``image_size`` is the frame side S).
      frame_stride: video: frame step of the "random" (training) and "center" (eval) windows.
      temporal_sampling: video training frames: "random" (a random contiguous window of
        ``num_frames`` frames ``frame_stride`` apart) or "uniform" (the middle frame of each of
        ``num_frames`` equal segments); see :mod:`keras_mm.pipelines.ops.video`.
      eval_temporal_sampling: video eval frames: "uniform" or "center" (the central window).
      video_augment: video training crop: "none" (every frame resized to S x S) or "crop" (one
        random resized crop for the clip, ``crop_scale`` / ``crop_ratio``, resized to S x S).
        Eval uses ``eval_mode`` / ``eval_resize_ratio`` like images.
      video_flip: video: mirror the clip left-right with probability 1/2 and swap "left" /
        "right" in its captions (and transcripts). Off by default: motion data describes (and
        labels) horizontal direction, which a flip would contradict for the label.
      transcripts: video: add ``current`` / ``future`` token ids of the transcript (MV-GPT).
      max_current_len: video: token length P of ``current``; ``future`` has ``max_text_len``.
      (``augment``, ``render_text`` and ``prompt_mixture`` do not apply to video.)
    """

    image_size: int = 224
    augment: str = "crop_flip"
    randaugment_layers: int = 2
    randaugment_magnitude: float = 10.0
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    eval_mode: str = "center_crop"
    eval_resize_ratio: float = 0.875
    value_range: str = "-1_1"
    max_text_len: int = 64
    add_bos: bool = False
    train_caption: str = "random"
    contrastive_caption: str = ""
    hard_negatives: str = ""
    eval_texts: str = "first"
    eval_max_texts: int = 5
    batch_size: int = 256
    shuffle_buffer: int = 10_000
    seed: int = 0
    cycle_length: int = 16
    block_length: int = 1
    num_parallel_calls: int = -1
    drop_remainder: bool = True
    cache: bool = False
    repeat: bool = True
    resize_antialias: bool = False
    deterministic: bool = False
    render_text: bool = False
    render_background: int = 255
    prompt_mixture: str = ""
    qa_fraction: float = 0.5
    caption_prompt: str = "caption en"
    max_prompt_len: int = 16

    num_frames: int = 8
    frame_stride: int = 1
    temporal_sampling: str = "random"
    eval_temporal_sampling: str = "uniform"
    video_augment: str = "crop"
    video_flip: bool = False
    transcripts: bool = False
    max_current_len: int = 32

    def __post_init__(self):
        self.crop_scale = tuple(self.crop_scale)
        self.crop_ratio = tuple(self.crop_ratio)
        checks = [
            (self.augment in AUGMENTS, f"augment must be one of {AUGMENTS}, got {self.augment!r}"),
            (self.eval_mode in EVAL_MODES,
             f"eval_mode must be one of {EVAL_MODES}, got {self.eval_mode!r}"),
            (self.value_range in VALUE_RANGES,
             f"value_range must be one of {VALUE_RANGES}, got {self.value_range!r}"),
            (self.train_caption in ("random", "first"),
             f"train_caption must be 'random' or 'first', got {self.train_caption!r}"),
            (self.contrastive_caption in ("", "random", "first"),
             f"contrastive_caption must be '', 'random' or 'first', got "
             f"{self.contrastive_caption!r}"),
            (self.eval_texts in ("first", "all"),
             f"eval_texts must be 'first' or 'all', got {self.eval_texts!r}"),
            (self.image_size > 0, f"image_size must be positive, got {self.image_size}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.max_text_len >= 2 + int(self.add_bos),
             f"max_text_len={self.max_text_len} is too short"),
            (self.eval_max_texts > 0, "eval_max_texts must be positive"),
            (0.0 < self.eval_resize_ratio <= 1.0, "eval_resize_ratio must be in (0, 1]"),
            (0.0 <= self.randaugment_magnitude <= 10.0, "randaugment_magnitude must be in [0, 10]"),
            (len(self.crop_scale) == 2 and 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0,
             f"crop_scale must be (min, max) with 0 < min <= max <= 1, got {self.crop_scale}"),
            (len(self.crop_ratio) == 2 and 0.0 < self.crop_ratio[0] <= self.crop_ratio[1],
             f"crop_ratio must be (min, max) with 0 < min <= max, got {self.crop_ratio}"),
            (self.shuffle_buffer >= 1, "shuffle_buffer must be >= 1"),
            (0 <= self.render_background <= 255, "render_background must be in [0, 255]"),
            (self.prompt_mixture in PROMPT_MIXTURES,
             f"prompt_mixture must be one of {PROMPT_MIXTURES}, got {self.prompt_mixture!r}"),
            (0.0 <= self.qa_fraction <= 1.0, "qa_fraction must be in [0, 1]"),
            (self.max_prompt_len >= 2, "max_prompt_len must be >= 2"),
            (self.num_frames >= 1, f"num_frames must be >= 1, got {self.num_frames}"),
            (self.frame_stride >= 1, f"frame_stride must be >= 1, got {self.frame_stride}"),
            (self.temporal_sampling in SAMPLINGS_TRAIN,
             f"temporal_sampling must be one of {SAMPLINGS_TRAIN}, got "
             f"{self.temporal_sampling!r}"),
            (self.eval_temporal_sampling in SAMPLINGS_EVAL,
             f"eval_temporal_sampling must be one of {SAMPLINGS_EVAL}, got "
             f"{self.eval_temporal_sampling!r}"),
            (self.video_augment in VIDEO_AUGMENTS,
             f"video_augment must be one of {VIDEO_AUGMENTS}, got {self.video_augment!r}"),
            (self.max_current_len >= 2, "max_current_len must be >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"InputConfig: {message}")
        if self.contrastive_caption and (self.render_text or self.prompt_mixture):
            raise ValueError("InputConfig: contrastive_caption needs tokenized captions (no "
                             "render_text / prompt_mixture)")
        if self.hard_negatives:
            if self.render_text or self.prompt_mixture:
                raise ValueError("InputConfig: hard_negatives needs tokenized captions (no "
                                 "render_text / prompt_mixture)")
            try:
                self.negative_groups()
            except ValueError as e:
                raise ValueError(f"InputConfig: hard_negatives: {e}") from e

    def negative_groups(self) -> Tuple[Tuple[str, ...], ...]:
        """The parsed ``hard_negatives`` word groups (empty: none)."""
        if not self.hard_negatives.strip():
            return ()
        return text_ops.parse_word_groups(self.hard_negatives.split("|"))


# ------------------------------------------------------------------------------ folder access


def split_files(folder: str, split: str) -> List[str]:
    """The sorted shard paths of ``split`` in ``folder``.

    Raises:
      FileNotFoundError: the folder does not exist.
      ValueError: the split has no shard.
    """
    if not tf.io.gfile.isdir(folder):
        raise FileNotFoundError(f"dataset folder {folder!r} does not exist")
    files = sorted(tf.io.gfile.glob(os.path.join(folder, f"{split}.tfrecord-*")))
    if not files:
        raise ValueError(f"dataset folder {folder!r} has no shard of split {split!r} "
                         f"(expected {split}.tfrecord-00000-of-000NN files)")
    return files


def detect_kind(folder: str) -> str:
    """``video_tubes`` when the folder's records hold ``video/frames`` (the first record of the
    first shard is read), else ``label_as_text`` when the folder holds ``classnames.txt``
    (video folders may hold one too, for their motion classes), else ``image_text``."""
    if F.VIDEO_FRAMES in _first_record_keys(folder):
        return F.VIDEO_TUBES
    if tf.io.gfile.exists(os.path.join(folder, CLASSNAMES_FILE)):
        return F.LABEL_AS_TEXT
    return F.IMAGE_TEXT


def _first_record_keys(folder: str) -> Tuple[str, ...]:
    """Feature keys of the first record of the first non-empty shard (any split); () if none."""
    with tf.init_scope():     # eager even when called while a tf.function / dataset traces
        for path in sorted(tf.io.gfile.glob(os.path.join(folder, "*.tfrecord-*"))):
            for serialized in tf.data.TFRecordDataset(path).take(1):
                example = tf.train.Example.FromString(serialized.numpy())
                return tuple(example.features.feature.keys())
    return ()


def text_renderer(config: InputConfig) -> render_ops.TextRenderer:
    """The CLIPPO text renderer of a config: ``image_size`` images in ``value_range``, black
    text on ``render_background``, the default layout of that size (see
    :mod:`keras_mm.pipelines.ops.render_text`)."""
    return render_ops.TextRenderer(config.image_size, value_range=config.value_range,
                                   background=config.render_background)


def _text_encoder(folder: str, config: InputConfig, tokenizer):
    """The given tokenizer, or the folder's; with ``render_text`` a TextRenderer (given or
    built from the config)."""
    if not config.render_text:
        return tokenizer or load_tokenizer(folder, config)
    if tokenizer is None:
        return text_renderer(config)
    if not isinstance(tokenizer, render_ops.TextRenderer):
        raise TypeError(f"InputConfig.render_text needs a TextRenderer (or None), got "
                        f"{type(tokenizer).__name__}; see datasets.text_renderer(config)")
    return tokenizer


def load_tokenizer(folder: str, config: InputConfig) -> Tokenizer:
    """``<folder>/tokenizer.model`` with the config's sequence settings."""
    path = os.path.join(folder, TOKENIZER_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"dataset folder {folder!r} has no {TOKENIZER_FILE}; train one "
            f"(python -m keras_mm.beam_jobs.tokenizer --dataset {folder}) or pass a tokenizer")
    return Tokenizer.from_file(path, max_len=config.max_text_len, add_bos=config.add_bos,
                               add_eos=True)


# ------------------------------------------------------------------------------ preprocessing


def _value_range_op(config: InputConfig, ops_module=image_ops):
    """``config.value_range`` as an op of ``ops_module`` (``image_ops``, or ``video_ops`` for
    ``video``)."""
    if config.value_range == "imagenet":
        return ops_module.normalize_imagenet()
    if config.value_range == "0_1":
        return ops_module.value_range(0.0, 1.0)
    return ops_module.value_range(-1.0, 1.0)


def _eval_resize_ops(config: InputConfig, ops_module=image_ops) -> list:
    """Evaluation's resize (``eval_mode="resize"``) or resize + centre crop, then the value
    range, as ops of ``ops_module`` (``image_ops`` or ``video_ops``)."""
    size, antialias = config.image_size, config.resize_antialias
    if config.eval_mode == "resize":
        resize = ops_module.resize(size, antialias=antialias)
    else:
        resize = ops_module.resize_center_crop(size, config.eval_resize_ratio,
                                               antialias=antialias)
    return [resize, _value_range_op(config, ops_module)]


def train_image_ops(config: InputConfig) -> image_ops.Op:
    """``image/encoded`` -> ``image`` float32 ``[S, S, 3]`` for training (needs ``_seed``)."""
    size = config.image_size
    antialias = config.resize_antialias
    ops = [image_ops.decode()]
    if config.augment == "none":
        ops.append(image_ops.resize(size, antialias=antialias))
    else:
        ops.append(image_ops.random_resized_crop(size, scale=config.crop_scale,
                                                 ratio=config.crop_ratio, antialias=antialias))
        ops.append(image_ops.random_flip_lr())
        if config.augment == "randaugment":
            ops.append(augment_ops.randaugment(config.randaugment_layers,
                                               config.randaugment_magnitude))
    ops.append(_value_range_op(config))
    return image_ops.compose(*ops)


def eval_image_ops(config: InputConfig) -> image_ops.Op:
    """``image/encoded`` -> ``image`` float32 ``[S, S, 3]`` for evaluation (deterministic)."""
    return image_ops.compose(image_ops.decode(), *_eval_resize_ops(config))


def _select(features: Dict[str, tf.Tensor], kind: str, extra: Tuple[str, ...] = (),
            text_keys: Tuple[str, ...] = ("text",)):
    keys = ("image",) + text_keys + (F.ID,) + extra
    if kind == F.LABEL_AS_TEXT:
        keys += (F.LABEL,)
    return {k: features[k] for k in keys}


def _train_preprocess(kind: str, config: InputConfig, tokenizer: Tokenizer):
    images = train_image_ops(config)
    caption = text_ops.choose_caption(config.train_caption, key=F.TEXTS, out_key="text")
    if config.render_text:
        text_op = render_ops.render_caption(tokenizer, key="text", out_key="text_images")
        text_keys = ("text_images",)
    else:
        text_op = text_ops.tokenize(tokenizer, config.max_text_len, key="text",
                                    add_bos=config.add_bos, add_eos=True)
        text_keys = ("text",)

    prompts = prompt_mixture_op(config, tokenizer) if config.prompt_mixture else None

    contrastive = None
    if config.contrastive_caption:
        contrastive = image_ops.compose(
            _derived_seed(CONTRASTIVE_SEED_KEY, CONTRASTIVE_CAPTION_SALT),
            text_ops.choose_caption(config.contrastive_caption, key=F.TEXTS,
                                    out_key="text_contrastive", seed_key=CONTRASTIVE_SEED_KEY),
            text_ops.tokenize(tokenizer, config.max_text_len, key="text_contrastive",
                              add_bos=config.add_bos, add_eos=True))
        text_keys = text_keys + ("text_contrastive",)

    negatives = None
    if config.negative_groups():
        negative = text_ops.hard_negative(config.negative_groups(), key="text",
                                          out_key="text_negative")
        negative_ids = text_ops.tokenize(tokenizer, config.max_text_len, key="text_negative",
                                         add_bos=config.add_bos, add_eos=True)
        text_keys = text_keys + ("text_negative", "negative_valid")
        negatives = image_ops.compose(negative, negative_ids)

    def fn(seed, serialized):
        features = dict(F.parse(serialized, kind))
        features[image_ops.SEED_KEY] = seed
        features = caption(images(features))
        if contrastive is not None:
            features = contrastive(features)
        if negatives is not None:
            features = negatives(features)
        if prompts is not None:
            features = prompts(features)
            text_keys_here = text_keys + ("prompt",)
        else:
            text_keys_here = text_keys
        return _select(text_op(features), kind, text_keys=text_keys_here)

    return fn


CONTRASTIVE_SEED_KEY = "_contrastive_seed"
CONTRASTIVE_CAPTION_SALT = 0x636F6E74        # "cont": its draw is independent of ``text``'s


def _derived_seed(out_key: str, salt: int):
    """An op adding ``features[out_key]``: the example's seed folded with ``salt``."""

    def op(features):
        features = dict(features)
        features[out_key] = tf.random.experimental.stateless_fold_in(
            tf.cast(features[image_ops.SEED_KEY], tf.int64), salt)
        return features

    return op


def prompt_mixture_op(config: InputConfig, tokenizer: Tokenizer):
    """``caption_qa``: replaces ``text`` (the chosen caption, a string) by the target of a
    randomly drawn task and adds its tokenized ``prompt`` ``[max_prompt_len]`` (see
    ``InputConfig.prompt_mixture``). The draw is stateless, from the example's seed."""

    def op(features):
        features = dict(features)
        questions = features.get(QUESTIONS, tf.zeros([0], tf.string))
        answers = features.get(ANSWERS, tf.zeros([0], tf.string))
        count = tf.minimum(tf.shape(questions, out_type=tf.int64)[0],
                           tf.shape(answers, out_type=tf.int64)[0])
        seed = tf.random.experimental.stateless_fold_in(
            tf.cast(features[image_ops.SEED_KEY], tf.int64), _PROMPT_SALT)
        draw = tf.random.stateless_uniform([], seed)
        index = tf.random.stateless_uniform([], seed + 1, minval=0,
                                            maxval=tf.maximum(count, 1), dtype=tf.int64)
        qa = tf.logical_and(count > 0, draw < config.qa_fraction)
        safe = tf.minimum(index, tf.maximum(count - 1, 0))
        prompt = tf.cond(qa, lambda: questions[safe], lambda: tf.constant(config.caption_prompt))
        features["text"] = tf.cond(qa, lambda: answers[safe], lambda: features["text"])
        features["prompt"] = tokenizer.tokenize(prompt, config.max_prompt_len, add_bos=False,
                                                add_eos=True)
        return features

    return op


_PROMPT_SALT = 0x9a11


def _eval_preprocess(kind: str, config: InputConfig, tokenizer: Tokenizer):
    images = eval_image_ops(config)
    # render_text: the renderer's code points, as many as it draws.
    max_len = tokenizer.max_chars if config.render_text else config.max_text_len
    text_keys = ("text", "text_images") if config.render_text else ("text",)

    def _rendered(features):
        if config.render_text:                  # the first caption, drawn: [S, S, 3]
            features["text_images"] = tokenizer.render_codepoints(features["text"])
        return features

    def fn(serialized):
        features = images(dict(F.parse(serialized, kind)))
        texts = features[F.TEXTS]                                          # [K0]
        if config.eval_texts == "first":
            features["text"] = tokenizer.tokenize(texts[0], max_len, add_bos=config.add_bos,
                                                  add_eos=True)            # [L]
            return _select(_rendered(features), kind, text_keys=text_keys)
        k = config.eval_max_texts
        num = tf.minimum(tf.shape(texts)[0], k)
        ids = tokenizer.tokenize(texts[:k], max_len, add_bos=config.add_bos, add_eos=True)
        ids = tf.pad(ids, [[0, k - num], [0, 0]], constant_values=PAD_ID)  # [K, L]
        features["texts"] = tf.ensure_shape(ids, [k, max_len])
        features["num_texts"] = num
        features["text"] = ids[0]
        return _select(_rendered(features), kind, ("texts", "num_texts"), text_keys=text_keys)

    return fn


# ------------------------------------------------------------------------------ datasets


def train_dataset(folder: str, config: InputConfig, tokenizer: Optional[Tokenizer] = None,
                  input_context: Optional[tf.distribute.InputContext] = None,
                  split: str = "train") -> tf.data.Dataset:
    """Shuffled, augmented, (by default) repeated training batches.

    With ``input_context`` (``strategy.distribute_datasets_from_function``) this pipeline reads
    only the shard files ``input_pipeline_id::num_input_pipelines`` (records
    ``input_pipeline_id::num_input_pipelines`` when there are fewer files than pipelines) and
    yields per-replica batches of ``config.batch_size / num_replicas_in_sync``; tf.data
    auto-sharding is off then.

    Returns:
      batches ``{"image": float32 [B, S, S, 3], "text": int32 [B, L], "id": string [B]
      (, "label": int64 [B])}``.
    """
    files = split_files(folder, split)
    kind = detect_kind(folder)
    tokenizer = _text_encoder(folder, config, tokenizer)
    return _train_batches(files, config, _train_preprocess(kind, config, tokenizer),
                          input_context)


def _train_batches(files: List[str], config: InputConfig, preprocess,
                   input_context: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
    """The training stream of every record kind: files (sharded by ``input_context``) shuffled,
    interleaved, cached / repeated / shuffled per ``config``, each record paired with its seed
    (``[seed, pipeline id]`` folded with its position in the stream), mapped by
    ``preprocess(seed, serialized)``, batched (per replica with ``input_context``), prefetched."""
    batch_size = config.batch_size
    pipeline_id, num_pipelines = 0, 1
    shard_records = False
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(config.batch_size)
        pipeline_id = input_context.input_pipeline_id
        num_pipelines = input_context.num_input_pipelines
        if len(files) >= num_pipelines:
            files = files[pipeline_id::num_pipelines]
        else:
            shard_records = num_pipelines > 1

    ds = tf.data.Dataset.from_tensor_slices(files)
    ds = ds.shuffle(len(files), seed=config.seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=max(1, min(config.cycle_length, len(files))),
        block_length=config.block_length,
        num_parallel_calls=AUTOTUNE,
        deterministic=config.deterministic)
    if shard_records:
        ds = ds.shard(num_pipelines, pipeline_id)
    if config.cache:
        ds = ds.cache()
    if config.repeat:
        ds = ds.repeat()
    ds = ds.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)

    base_seed = tf.constant([config.seed, pipeline_id], tf.int64)

    def with_seed(index, serialized):
        return tf.random.experimental.stateless_fold_in(base_seed, index), serialized

    ds = ds.enumerate().map(with_seed)
    ds = ds.map(preprocess,
                num_parallel_calls=config.num_parallel_calls, deterministic=config.deterministic)
    ds = ds.batch(batch_size, drop_remainder=config.drop_remainder)
    ds = ds.prefetch(AUTOTUNE)

    options = tf.data.Options()
    options.deterministic = config.deterministic
    if input_context is not None:
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def eval_dataset(folder: str, split: str, config: InputConfig,
                 tokenizer: Optional[Tokenizer] = None) -> tf.data.Dataset:
    """Evaluation batches in a fixed order (shards sorted, records in file order), no shuffle,
    no repeat, last batch kept (it may be smaller than ``config.batch_size``).

    Returns:
      batches ``{"image": float32 [B, S, S, 3], "text": int32 [B, L], "id": string [B]
      (, "label": int64 [B]) (, "texts": int32 [B, K, L], "num_texts": int32 [B])}``.
    """
    files = split_files(folder, split)
    kind = detect_kind(folder)
    tokenizer = _text_encoder(folder, config, tokenizer)
    ds = tf.data.TFRecordDataset(files)
    if config.cache:
        ds = ds.cache()
    ds = ds.map(_eval_preprocess(kind, config, tokenizer),
                num_parallel_calls=config.num_parallel_calls, deterministic=True)
    ds = ds.batch(config.batch_size, drop_remainder=False)
    ds = ds.prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def caption_eval_dataset(folder: str, split: str, config: InputConfig) -> tf.data.Dataset:
    """Evaluation batches for captioners, in file order: ``{"image": float32 [B, S, S, 3],
    "id": string [B], "texts": string [B, K] (every reference, normalised; "" pads rows with
    fewer), "questions" / "answers": string [B, Q] ("" pads; Q = 0 when the records have
    none)}``. The strings stay raw: metrics tokenize them their own way (pycocoevalcap)."""
    files = split_files(folder, split)
    kind = detect_kind(folder)
    images = eval_image_ops(config)

    def fn(serialized):
        features = images(dict(F.parse(serialized, kind)))
        out = {"image": features["image"], F.ID: features[F.ID],
               F.TEXTS: text_ops.normalize_text(features[F.TEXTS])}
        for key in (QUESTIONS, ANSWERS):
            out[key] = features.get(key, tf.zeros([0], tf.string))
        return out

    ds = tf.data.TFRecordDataset(files).map(fn, num_parallel_calls=config.num_parallel_calls,
                                            deterministic=True)
    ds = ds.padded_batch(config.batch_size, drop_remainder=False)
    return ds.prefetch(AUTOTUNE)


# ------------------------------------------------------------------------------ video

NO_LABEL = -1            # the label of a video record without one (as features.py writes it)


# Video fields live in InputConfig (one ``data.input`` section for every recipe); the name
# stays for readability at call sites.
VideoInputConfig = InputConfig


def _flip_text_keys(config: VideoInputConfig) -> Tuple[str, ...]:
    keys = (F.TEXTS,)
    if config.transcripts:
        keys += (F.TRANSCRIPT_CURRENT, F.TRANSCRIPT_FUTURE)
    return keys


def _sample_and_decode(config: VideoInputConfig, mode: str) -> List[image_ops.Op]:
    """Ops keeping ``num_frames`` of the encoded frames (``mode`` sampling), then decoding only
    those into ``video`` uint8 ``[T, H, W, 3]``."""
    return [video_ops.sample_frames(config.num_frames, mode, stride=config.frame_stride,
                                    key=F.VIDEO_FRAMES),
            video_ops.decode_frames(F.VIDEO_FRAMES, "video")]


def train_video_ops(config: VideoInputConfig) -> image_ops.Op:
    """``video/frames`` -> ``video`` float32 ``[T, S, S, 3]`` for training (needs ``_seed``):
    sample ``num_frames`` of the encoded frames, decode only those, crop, optionally flip (with
    the captions' / transcripts' left-right swap), value range."""
    size = config.image_size
    ops = _sample_and_decode(config, config.temporal_sampling)
    if config.video_augment == "none":
        ops.append(video_ops.resize(size, antialias=config.resize_antialias))
    else:
        ops.append(video_ops.random_resized_crop(size, scale=config.crop_scale,
                                                 ratio=config.crop_ratio,
                                                 antialias=config.resize_antialias))
    if config.video_flip:
        ops.append(video_ops.random_flip(text_keys=_flip_text_keys(config)))
    ops.append(_value_range_op(config, video_ops))
    return image_ops.compose(*ops)


def eval_video_ops(config: VideoInputConfig) -> image_ops.Op:
    """``video/frames`` -> ``video`` float32 ``[T, S, S, 3]`` for evaluation (deterministic)."""
    return image_ops.compose(*_sample_and_decode(config, config.eval_temporal_sampling),
                             *_eval_resize_ops(config, video_ops))


def _check_video_config(config) -> None:
    """The settings that cannot apply to video (ValueError), on top of InputConfig's checks."""
    if not isinstance(config, InputConfig):
        raise TypeError(f"video datasets need an InputConfig, got {type(config).__name__}")
    checks = [
        (not config.transcripts or config.max_text_len >= 3,
         "max_text_len must be >= 3 for the BOS + EOS future transcript"),
        (not config.render_text, "render_text does not apply to video"),
        (not config.prompt_mixture, "prompt_mixture does not apply to video"),
        (not config.hard_negatives, "hard_negatives does not apply to video (yet)"),
        (not config.contrastive_caption, "contrastive_caption does not apply to video (yet)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"InputConfig (video): {message}")


def _video_files(folder: str, split: str) -> List[str]:
    files = split_files(folder, split)
    kind = detect_kind(folder)
    if kind != F.VIDEO_TUBES:
        raise ValueError(f"dataset folder {folder!r} holds {kind} records, not video_tubes "
                         "(use train_dataset / eval_dataset)")
    return files


def _video_label(features) -> tf.Tensor:
    """int64 ``[]``: the record's motion class, -1 when absent (or not in the spec)."""
    label = features.get(F.LABEL)
    if label is None:
        return tf.constant(NO_LABEL, tf.int64)
    return tf.cast(label, tf.int64)


def _transcript_ids(features, config: VideoInputConfig, tokenizer: Tokenizer):
    """``current``: int32 ``[P]`` ``t_1 .. t_n EOS PAD..`` (no BOS); ``future``: int32 ``[L]``
    ``BOS t_1 .. t_n EOS PAD..`` (the captioners' layout). An empty transcript gives ``EOS`` /
    ``BOS EOS``."""
    return {
        "current": tokenizer.tokenize(features[F.TRANSCRIPT_CURRENT], config.max_current_len,
                                      add_bos=False, add_eos=True),
        "future": tokenizer.tokenize(features[F.TRANSCRIPT_FUTURE], config.max_text_len,
                                     add_bos=True, add_eos=True),
    }


def _video_train_preprocess(config: VideoInputConfig, tokenizer: Tokenizer):
    video = train_video_ops(config)
    caption = text_ops.choose_caption(config.train_caption, key=F.TEXTS, out_key="text")

    def fn(seed, serialized):
        features = dict(F.parse(serialized, F.VIDEO_TUBES))
        features[image_ops.SEED_KEY] = seed
        features = caption(video(features))             # flip (if any) swaps before choosing
        out = {"video": features["video"],
               "text": tokenizer.tokenize(features["text"], config.max_text_len,
                                          add_bos=config.add_bos, add_eos=True),
               F.ID: features[F.ID],
               F.LABEL: _video_label(features)}
        if config.transcripts:
            out.update(_transcript_ids(features, config, tokenizer))
        return out

    return fn


def _video_eval_preprocess(config: VideoInputConfig, tokenizer: Tokenizer):
    video = eval_video_ops(config)
    max_len = config.max_text_len

    def fn(serialized):
        features = video(dict(F.parse(serialized, F.VIDEO_TUBES)))
        texts = features[F.TEXTS]                                          # [K0]
        out = {"video": features["video"], F.ID: features[F.ID],
               F.LABEL: _video_label(features)}
        if config.eval_texts == "first":
            out["text"] = tokenizer.tokenize(texts[0], max_len, add_bos=config.add_bos,
                                             add_eos=True)                 # [L]
        else:
            k = config.eval_max_texts
            num = tf.minimum(tf.shape(texts)[0], k)
            ids = tokenizer.tokenize(texts[:k], max_len, add_bos=config.add_bos, add_eos=True)
            ids = tf.pad(ids, [[0, k - num], [0, 0]], constant_values=PAD_ID)  # [K, L]
            out["texts"] = tf.ensure_shape(ids, [k, max_len])
            out["num_texts"] = num
            out["text"] = ids[0]
        if config.transcripts:
            out.update(_transcript_ids(features, config, tokenizer))
        return out

    return fn


def video_train_dataset(folder: str, config: VideoInputConfig,
                        tokenizer: Optional[Tokenizer] = None,
                        input_context: Optional[tf.distribute.InputContext] = None,
                        split: str = "train") -> tf.data.Dataset:
    """Shuffled, augmented, (by default) repeated training batches of a video_tubes folder;
    files, shuffling, seeds and ``input_context`` exactly as :func:`train_dataset`.

    Returns:
      batches ``{"video": float32 [B, T, S, S, 3], "text": int32 [B, L] (one caption,
      ``train_caption``), "id": string [B], "label": int64 [B] (-1 when absent)
      (, "current": int32 [B, P], "future": int32 [B, L] with ``transcripts``)}``.
    """
    _check_video_config(config)
    files = _video_files(folder, split)
    tokenizer = tokenizer or load_tokenizer(folder, config)
    return _train_batches(files, config, _video_train_preprocess(config, tokenizer),
                          input_context)


def video_eval_dataset(folder: str, split: str, config: VideoInputConfig,
                       tokenizer: Optional[Tokenizer] = None) -> tf.data.Dataset:
    """Evaluation batches of a video_tubes folder in a fixed order (as :func:`eval_dataset`:
    sorted shards, file order, no shuffle, no repeat, last batch kept).

    Returns:
      batches ``{"video": float32 [B, T, S, S, 3], "text": int32 [B, L] (the first caption),
      "id": string [B], "label": int64 [B] (-1 when absent) (, "texts": int32 [B, K, L],
      "num_texts": int32 [B] with ``eval_texts="all"``) (, "current": int32 [B, P],
      "future": int32 [B, L] with ``transcripts``)}``.
    """
    _check_video_config(config)
    files = _video_files(folder, split)
    tokenizer = tokenizer or load_tokenizer(folder, config)
    ds = tf.data.TFRecordDataset(files)
    if config.cache:
        ds = ds.cache()
    ds = ds.map(_video_eval_preprocess(config, tokenizer),
                num_parallel_calls=config.num_parallel_calls, deterministic=True)
    ds = ds.batch(config.batch_size, drop_remainder=False)
    ds = ds.prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def video_caption_eval_dataset(folder: str, split: str, config: VideoInputConfig,
                               tokenizer: Optional[Tokenizer] = None) -> tf.data.Dataset:
    """Evaluation batches for video captioners, in file order: ``{"video": float32
    [B, T, S, S, 3], "id": string [B], "label": int64 [B], "texts": string [B, K] (every
    reference, normalised; "" pads rows with fewer)}``; with ``transcripts`` also
    ``"current": int32 [B, P]`` (the model's input, as in training) and the raw normalised
    ``"transcript/current"`` / ``"transcript/future"``: string [B] (the future utterance is
    the reference of MV-GPT's generation). The tokenizer is only needed with ``transcripts``."""
    _check_video_config(config)
    files = _video_files(folder, split)
    if config.transcripts:
        tokenizer = tokenizer or load_tokenizer(folder, config)
    video = eval_video_ops(config)

    def fn(serialized):
        features = video(dict(F.parse(serialized, F.VIDEO_TUBES)))
        out = {"video": features["video"], F.ID: features[F.ID],
               F.LABEL: _video_label(features),
               F.TEXTS: text_ops.normalize_text(features[F.TEXTS])}
        if config.transcripts:
            out["current"] = tokenizer.tokenize(features[F.TRANSCRIPT_CURRENT],
                                                config.max_current_len, add_bos=False,
                                                add_eos=True)
            for key in (F.TRANSCRIPT_CURRENT, F.TRANSCRIPT_FUTURE):
                out[key] = text_ops.normalize_text(features[key])
        return out

    ds = tf.data.TFRecordDataset(files).map(fn, num_parallel_calls=config.num_parallel_calls,
                                            deterministic=True)
    ds = ds.padded_batch(config.batch_size, drop_remainder=False)
    return ds.prefetch(AUTOTUNE)


def benchmark_dataset(dataset: tf.data.Dataset, num_batches: int = 100,
                      warmup: int = 10) -> Dict[str, Any]:
    """Iterates ``warmup`` batches untimed, then times ``num_batches`` batches (fewer if the
    dataset ends).

    Returns:
      ``{"examples_per_second", "batches_per_second", "examples", "batches", "seconds"}``;
      examples are counted from the leading dimension of the batch's first tensor.
    """
    if num_batches < 1 or warmup < 0:
        raise ValueError("benchmark_dataset needs num_batches >= 1 and warmup >= 0")
    iterator = iter(dataset)
    for _ in range(warmup):
        try:
            next(iterator)
        except StopIteration:
            raise ValueError(f"dataset ended during the {warmup} warm-up batches") from None
    examples = batches = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        first = tf.nest.flatten(batch)[0]
        examples += int(first.shape[0]) if first.shape.rank else 1
        batches += 1
    seconds = time.perf_counter() - start
    if batches == 0:
        raise ValueError("dataset yielded no batch after the warm-up")
    return {
        "examples_per_second": examples / seconds if seconds > 0 else float("inf"),
        "batches_per_second": batches / seconds if seconds > 0 else float("inf"),
        "examples": examples,
        "batches": batches,
        "seconds": seconds,
    }
