"""Typed experiment configs: nested dataclasses, ``--set path.to.field=value`` overrides, JSON files.

An ``ExperimentConfig`` holds one dataclass per concern::

    ExperimentConfig(name, data: DataConfig(folder, train_split, input: InputConfig),
                     model: ModelConfig, optimizer: OptimizerConfig, train: TrainConfig,
                     eval: EvalConfig, export: ExportConfig)

``InputConfig`` is keras_mm.pipelines.datasets' own. Field types are enforced when a config is built from a
dict, a JSON file or overrides: ``int``, ``float``, ``bool``, ``str``, ``Optional[...]``, ``Literal[...]``
(the valid choices), tuples (fixed length or ``Tuple[X, ...]``), lists, dicts and nested dataclasses.

Overrides (``override(config, ["train.steps=200", "data.input.crop_scale=0.5,1.0"])``) parse the text by
the field's type: booleans ``true/false/yes/no/1/0``; ints ``1000``, ``1_000`` or ``1e3``; ``none`` /
``null`` for Optional fields; tuples ``a,b``, ``(a, b)`` or JSON ``[a, b]``; a section as a JSON object
merged into its current value (``model={"preset": "s16", "lit": true}``); a string as given (quote it,
``'"none"'``, to get the literal word). A bad path or value raises ``ConfigError`` naming the path, the
value, the expected type or choices, and the valid fields. Overrides return a new config; the dataclass
``__post_init__`` checks run once on the result (so their order does not matter).

Named recipes: ``get_recipe(name)``. ``RECIPES`` maps each name to ``"module:function"``; the function
returns an ExperimentConfig and its module is imported only when that recipe is asked for (no registry
filled by import side effects). Add a recipe by adding its line to ``RECIPES``.

Files: ``save(config, path)`` writes JSON (atomically) with the config class under ``"__config__"``;
``load(path)`` rebuilds and type-checks it.
"""

import dataclasses
import importlib
import json
import os
import types
import typing
import uuid
from typing import Any, Literal, Optional, Tuple, Union

from keras_mm.pipelines.datasets import InputConfig

CLASS_KEY = "__config__"
STRATEGIES = ("one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
EVAL_TASKS = ("zero_shot", "retrieval", "linear_probe", "few_shot", "captioning", "vqa",
              "motion_probe", "next_utterance")


class ConfigError(ValueError):
    """A bad config path, value, file or recipe name (the message says which and what is valid)."""


# ------------------------------------------------------------------------------------------ configs
@dataclasses.dataclass
class DataConfig:
    """Training data.

    Attributes:
      folder: dataset folder (DESIGN.md data contract: sharded TFRecords + tokenizer.model...).
      train_split: split trained on.
      input: how the folder becomes batches (``input.batch_size`` is the global batch).
    """

    folder: str = ""
    train_split: str = "train"
    input: InputConfig = dataclasses.field(default_factory=InputConfig)


@dataclasses.dataclass
class MoeConfig:
    """Sparse mixture of experts (``model.kind="limoe"``); None: the LIMoE preset's value.

    Attributes:
      num_experts: experts per MoE block (E).
      moe_every: every n-th block is an MoE block (counted from the last).
      capacity_factor: C = ceil(capacity_factor * k * group_size / E) slots per expert and group.
      group_size: tokens routed together.
      bpr: Batch Priority Routing (slots by descending gate instead of position).
      noise_std: router noise in training (relative, V-MoE).
      local_entropy_weight, global_entropy_weight, global_entropy_tau: LIMoE's auxiliary losses.
      importance_weight, load_weight: V-MoE's balancing losses.
    """

    num_experts: Optional[int] = None
    moe_every: Optional[int] = None
    capacity_factor: float = 1.0
    group_size: Optional[int] = None
    bpr: bool = True
    noise_std: float = 0.0
    local_entropy_weight: Optional[float] = None
    global_entropy_weight: Optional[float] = None
    global_entropy_tau: Optional[float] = None
    importance_weight: float = 0.0
    load_weight: float = 0.0

    def __post_init__(self):
        _check(self.capacity_factor > 0, f"capacity_factor must be > 0, got {self.capacity_factor}")
        _check(self.num_experts is None or self.num_experts >= 1,
               f"num_experts must be >= 1, got {self.num_experts}")


@dataclasses.dataclass
class CaptionerConfig:
    """Captioners (``model.kind`` coca / cappa / mammut / pali); None: the model's default.

    Attributes:
      blind: zero the image context: the same decoder trained without the image (the language-
        model baseline a captioner must beat).
      contrastive_weight, caption_weight: loss weights (CoCa 1 / 2, MaMMUT 1 / 1).
      contrastive: MaMMUT's contrastive loss, "softmax" or "focal" (RO-ViT).
      focal_gamma: gamma of the focal contrastive loss.
      parallel_fraction: CapPa's share of parallel-prediction examples (0.75).
      label_smoothing: of the captioning loss.
      position_crop: MaMMUT's cropped positional embeddings: the upsampling factor of the
        position grid (0: off).
      decode: "greedy", "beam" or "sample" (evaluation and export).
      beam_size, length_penalty: beam search (GNMT length penalty alpha).
      max_decode_len: longest generated caption in tokens; None: the decoder's.
      num_caption_queries: CoCa's captioning queries N (the attentional pooler's outputs the
        multimodal blocks cross-attend to); None: the preset's (tiny 16 for 64 image tokens,
        b16 256 as the paper).
    """

    blind: bool = False
    contrastive_weight: Optional[float] = None
    caption_weight: Optional[float] = None
    contrastive: Literal["softmax", "focal"] = "softmax"
    focal_gamma: float = 2.0
    parallel_fraction: Optional[float] = None
    label_smoothing: float = 0.0
    position_crop: float = 0.0
    decode: Literal["greedy", "beam", "sample"] = "greedy"
    beam_size: int = 4
    length_penalty: float = 0.6
    max_decode_len: Optional[int] = None
    num_caption_queries: Optional[int] = None

    def __post_init__(self):
        _check(self.num_caption_queries is None or self.num_caption_queries >= 1,
               f"num_caption_queries must be >= 1, got {self.num_caption_queries}")
        _check(self.parallel_fraction is None or 0.0 <= self.parallel_fraction <= 1.0,
               f"parallel_fraction must be in [0, 1], got {self.parallel_fraction}")
        _check(self.beam_size >= 1, f"beam_size must be >= 1, got {self.beam_size}")
        _check(self.position_crop == 0 or self.position_crop >= 1,
               f"position_crop must be 0 (off) or an upsampling factor >= 1, "
               f"got {self.position_crop}")


@dataclasses.dataclass
class VideoConfig:
    """Video models (``model.kind`` video_two_tower / video_mammut / mvgpt).

    Attributes:
      encoder: the video tower: "tubevit" (sparse tubes, ``keras_mm.encoders.tubevit``) or
        "frame_average" (the image ViT on every frame, embeddings averaged over time: the
        baseline that sees every frame but not their order).
      tubes: a named tube set of TubeViT (``keras_mm.encoders.presets.TUBE_SETS``: "paper",
        "tiny", "clip8"); None: the preset's.
      mvgpt_backward: MV-GPT's bidirectional objective (also generate the present utterance from
        the frames and the future one, BOS-B); false: the forward-only ablation.
      mvgpt_use_frames: false: the no-frames ablation (the encoder sees only the utterance).
      mvgpt_backward_weight: weight of the backward loss (the forward one has weight 1).
      image_position_embedding: TubeViT with the image model's learned position table on its
        2-D image tube plus the fixed tube embeddings through a gate (the MaMMUT video variant;
        always on for "video_mammut"): what ``model.init_checkpoint`` from a frame-average run
        needs to load that run's position table.
      position_gate_init: that variant's gate ``alpha`` at the start (``tanh(alpha)`` scales the
        fixed tube embeddings, TubeViT's only positions in time); 0 keeps an image model's
        tokens exactly.
      init_position_table: with ``model.init_checkpoint`` from a frame-average run, load its
        learned position table (into the image position variant); false: drop it, so a plain
        TubeViT keeps its fixed 3-D tube positions (in time as well as space) and takes the
        rest of the image model.
    """

    encoder: Literal["tubevit", "frame_average"] = "tubevit"
    tubes: Optional[str] = None
    mvgpt_backward: bool = True
    mvgpt_use_frames: bool = True
    mvgpt_backward_weight: float = 1.0
    image_position_embedding: bool = False
    position_gate_init: float = 0.0
    init_position_table: bool = True


@dataclasses.dataclass
class ModelConfig:
    """The model.

    Attributes:
      kind: model family: "two_tower" (CLIP / SigLIP / LiT), "limoe", "clippo", or a captioner:
        "coca", "cappa", "mammut", "pali".
      preset: size preset of the family ("tiny", "s16", "b16", "l16").
      loss: "sigmoid" (SigLIP) or "softmax" (CLIP).
      chunked: SigLIP's chunked loss (logits in memory stay [local batch, local batch]).
      lit: LiT: lock the image tower (and initialise it from ``init_checkpoint``).
      init_checkpoint: a saved Keras image encoder / classifier to initialise the image tower
        from; for the video models, another video run (its out_dir, checkpoints folder or one
        ckpt-N) whose video tower (a frame-average one is inflated into TubeViT's tubes), text
        tower and logit scale start a fresh run (``models.video.initialize_video_tower``).
      embed_dim: shared embedding width; None: the preset's.
      remat: rematerialise each transformer block in the backward pass.
      stem: the image encoder's stem: "patch" (ViT's patchify convolution), "conv" (Xiao et
        al. 2021's stack of 3x3 stride-2 convolutions, ``keras_mm.layers.conv_stem``) or "cnn"
        (the hybrid ViT's small CNN: stride-1 3x3 convolutions and 2x2 max-pooling), for the
        two-tower models and the captioners.
      patch_size: the image encoder's patch size; None: the preset's.
      moe: the mixture-of-experts settings of "limoe".
      captioner: the settings of the captioners.
      video: the settings of the video models ("video_two_tower": the two-tower model with a
        video tower, "video_mammut": MaMMUT on clips, "mvgpt": MV-GPT).
    """

    kind: str = "two_tower"
    preset: str = "tiny"
    loss: Literal["sigmoid", "softmax"] = "sigmoid"
    chunked: bool = False
    lit: bool = False
    init_checkpoint: Optional[str] = None
    embed_dim: Optional[int] = None
    remat: bool = False
    stem: Literal["patch", "conv", "cnn"] = "patch"
    patch_size: Optional[int] = None
    moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)
    captioner: CaptionerConfig = dataclasses.field(default_factory=CaptionerConfig)
    video: VideoConfig = dataclasses.field(default_factory=VideoConfig)


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW + warmup / cosine schedule (keras_mm.training.optimizer.make_optimizer).

    Step counts are train steps (batches given to fit; see the optimizer module for accumulation).

    Attributes:
      lr: peak learning rate, reached after ``warmup_steps``.
      end_lr: learning rate at ``total_steps`` (the cosine's floor).
      weight_decay: decoupled weight decay, Keras convention (each update: w -= lr * weight_decay * w);
        applies to kernels only (the mask rule of keras_mm.training.optimizer).
      warmup_steps: linear warmup from 0.
      total_steps: end of the cosine; None: TrainConfig.steps.
      clip: global gradient-norm clip; None: no clipping.
      accumulation: micro-batches per update (1: none).
      b1, b2, eps: Adam's beta_1, beta_2, epsilon.
      no_decay: regexes of variable paths that never decay; None: the default rule.
    """

    lr: float = 1e-3
    end_lr: float = 0.0
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    total_steps: Optional[int] = None
    clip: Optional[float] = 1.0
    accumulation: int = 1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    no_decay: Optional[Tuple[str, ...]] = None

    def __post_init__(self):
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 <= self.end_lr <= self.lr, f"end_lr must be in [0, lr={self.lr}], got {self.end_lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.total_steps is None or self.total_steps > self.warmup_steps,
               f"total_steps ({self.total_steps}) must exceed warmup_steps ({self.warmup_steps})")
        _check(self.clip is None or self.clip > 0, f"clip must be > 0 or none, got {self.clip}")
        _check(self.accumulation >= 1, f"accumulation must be >= 1, got {self.accumulation}")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"b1, b2 must be in [0, 1), got {self.b1}, {self.b2}")
        _check(self.eps > 0, f"eps must be > 0, got {self.eps}")


@dataclasses.dataclass
class TrainConfig:
    """The training loop.

    Attributes:
      steps: train steps of the run.
      steps_per_epoch: Keras epoch length (progress bar, epoch summaries, eval periods); None: one epoch
        of all steps. Must divide ``steps`` and ``checkpoint_every``.
      checkpoint_every: save a checkpoint every this many steps (and at the end).
      keep: checkpoints kept.
      log_every: TensorBoard scalars every this many steps.
      seed: ``keras.utils.set_random_seed`` seed (weights, dropout); the data seed is
        ``data.input.seed``.
      deterministic: ``tf.config.experimental.enable_op_determinism()`` (exact resume, slower).
      precision: "float32", "mixed_bfloat16" or "mixed_float16".
      jit_compile: XLA-compile the train step.
      steps_per_execution: train steps per tf.function / jit call; divides steps and the periods
        above (callbacks see the step count jump by it).
      strategy: "one_device", "mirrored", "multi_worker" (TF_CONFIG) or "tpu".
      tpu: TPU name or grpc:// address for strategy "tpu".
      devices: devices of "mirrored" / "one_device"; None: all GPUs, else the CPU.
      out_dir: run folder: checkpoints/ (with config.json), tensorboard/, summary.json.
    """

    steps: int = 1000
    steps_per_epoch: Optional[int] = None
    checkpoint_every: int = 500
    keep: int = 3
    log_every: int = 50
    seed: int = 0
    deterministic: bool = False
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] = "float32"
    jit_compile: bool = False
    steps_per_execution: int = 1
    strategy: Literal["one_device", "mirrored", "multi_worker", "tpu"] = "one_device"
    tpu: Optional[str] = None
    devices: Optional[Tuple[str, ...]] = None
    out_dir: str = "runs/default"

    def __post_init__(self):
        for name in ("steps", "checkpoint_every", "keep", "log_every", "steps_per_execution"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        spe = self.steps_per_epoch
        if spe is not None:
            _check(spe >= 1 and self.steps % spe == 0 and self.checkpoint_every % spe == 0,
                   f"steps_per_epoch ({spe}) must divide steps ({self.steps}) and checkpoint_every "
                   f"({self.checkpoint_every}), so a resumed run starts at an epoch boundary")
        for name in ("steps", "checkpoint_every", "log_every", "steps_per_epoch"):
            if getattr(self, name) is None:
                continue
            _check(getattr(self, name) % self.steps_per_execution == 0,
                   f"steps_per_execution ({self.steps_per_execution}) must divide {name} "
                   f"({getattr(self, name)})")


@dataclasses.dataclass
class EvalConfig:
    """Evaluation (zero-shot, retrieval...).

    Attributes:
      split: evaluated split of ``data.folder`` (or of ``folder``).
      folder: a different dataset folder to evaluate on; None: ``data.folder``.
      batch_size: eval batch size.
      every_steps: evaluate during training every this many steps; None: at the end only.
      tasks: evaluations to run, any of ``EVAL_TASKS``: "zero_shot" (class names x eval templates),
        "retrieval" (R@1/5/10 both ways), "linear_probe" (logistic regression on frozen image
        embeddings of ``probe_train_split``, C chosen on ``probe_val_split``, scored on ``split``),
        "few_shot" (big_vision's k-shot ridge regression, k in ``shots``), "captioning"
        (captioners: CIDEr, BLEU-4, METEOR, ROUGE-L of generated captions against every
        reference), "vqa" (the PaLI-style model: exact-match answers to the scenes' questions),
        "motion_probe" (video: logistic regression of the clips' motion class on frozen clip
        embeddings, fit on ``probe_train_split``, C chosen on ``probe_val_split``; with
        ``baseline_run`` the same probe on that run's model too), "next_utterance" (MV-GPT:
        caption metrics of the generated future utterance against the true one). For video
        models "retrieval" is text <-> video retrieval on a gallery of ``gallery_size`` clips.
      max_examples: cap on evaluated examples (zero-shot); None: the whole split.
      probe_train_split, probe_val_split: the splits the probes fit on and select on.
      shots: examples per class of the few-shot evaluation.
      gallery_size: video retrieval: the first this many clips of ``split`` (None: all).
      probe_max_train: motion probe: at most this many training clips (None: all).
      probe_features: what the motion probe classifies: "pooled" (the video tower's pooled
        features before its projection head, the features CLIP's linear probes use) or
        "embedding" (the normalised contrastive embedding).
      baseline_run: video: a run folder of the frame-averaging baseline, evaluated beside this
        run (its probe accuracy is ``motion_probe_frame_average_top1``, its retrieval
        ``frame_average_retrieval_*``).
    """

    split: str = "test"
    folder: Optional[str] = None
    batch_size: int = 256
    every_steps: Optional[int] = None
    tasks: Tuple[str, ...] = ("zero_shot",)
    max_examples: Optional[int] = None
    probe_train_split: str = "train"
    probe_val_split: str = "validation"
    shots: Tuple[int, ...] = (1, 5, 10)
    gallery_size: Optional[int] = 256
    probe_max_train: Optional[int] = 4096
    probe_features: Literal["pooled", "embedding"] = "pooled"
    baseline_run: Optional[str] = None

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in EVAL_TASKS]
        _check(not unknown, f"eval.tasks: unknown {unknown}; valid: {', '.join(EVAL_TASKS)}")
        _check(self.every_steps is None or self.every_steps > 0,
               f"eval.every_steps must be positive or none, got {self.every_steps}")
        _check(all(k > 0 for k in self.shots), f"eval.shots must be positive, got {self.shots}")


@dataclasses.dataclass
class ExportConfig:
    """SavedModel export (DESIGN.md SavedModel contract).

    Attributes:
      name: model name under ``base_dir``; None: the experiment's name.
      base_dir: TF Serving model base directory.
      version: integer version folder; None: one more than the newest there.
    """

    name: Optional[str] = None
    base_dir: str = "saved_models"
    version: Optional[int] = None


@dataclasses.dataclass
class ExperimentConfig:
    """A whole experiment (a recipe)."""

    name: str = "default"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    def __post_init__(self):
        accumulation = self.optimizer.accumulation
        for name in ("checkpoint_every", "steps_per_epoch"):
            value = getattr(self.train, name)
            _check(value is None or value % accumulation == 0,
                   f"train.{name} ({value}) must be a multiple of optimizer.accumulation "
                   f"({accumulation}) so checkpoints and epochs end on update steps")


def _check(ok, message):
    if not ok:
        raise ValueError(message)


# ------------------------------------------------------------------------------------ recipes
def default_experiment():
    """Every field at its default (the base the named recipes start from)."""
    return ExperimentConfig()


RECIPES = {
    "default": "keras_mm.recipes.config:default_experiment",
    "siglip_digits": "keras_mm.recipes.two_tower:siglip_digits",
    "clip_digits": "keras_mm.recipes.two_tower:clip_digits",
    "siglip_b16": "keras_mm.recipes.two_tower:siglip_b16",
    "limoe_digits": "keras_mm.recipes.limoe:limoe_digits",
    "limoe_b16": "keras_mm.recipes.limoe:limoe_b16",
    "limoe_l16": "keras_mm.recipes.limoe:limoe_l16",
    "clippo_digits": "keras_mm.recipes.clippo:clippo_digits",
    "coca_scenes": "keras_mm.recipes.captioners:coca_scenes",
    "cappa_scenes": "keras_mm.recipes.captioners:cappa_scenes",
    "mammut_scenes": "keras_mm.recipes.captioners:mammut_scenes",
    "pali_scenes": "keras_mm.recipes.captioners:pali_scenes",
    "tubevit_moving_digits": "keras_mm.recipes.video:tubevit_moving_digits",
    "tubevit_from_frames_moving_digits": "keras_mm.recipes.video:tubevit_from_frames_moving_digits",
    "frame_average_moving_digits": "keras_mm.recipes.video:frame_average_moving_digits",
    "mammut_video_moving_digits": "keras_mm.recipes.video:mammut_video_moving_digits",
    "mvgpt_moving_digits": "keras_mm.recipes.video:mvgpt_moving_digits",
}


def recipe_names():
    return sorted(RECIPES)


def get_recipe(name):
    """The ExperimentConfig of a named recipe (imports its module now), type-checked.

    Raises:
      ConfigError: unknown name (the message lists the known ones).
    """
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(recipe_names())}")
    module, _, function = RECIPES[name].partition(":")
    config = getattr(importlib.import_module(module), function)()
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ConfigError(f"recipe {name!r} ({RECIPES[name]}) did not return a config dataclass")
    return validate(config)


# ------------------------------------------------------------------------------------ types
_HINTS = {}


def _fields(cls):
    """{field name: resolved type} of a dataclass (init fields only)."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    return _HINTS[cls]


def _is_union(tp):
    return typing.get_origin(tp) in (Union, types.UnionType)


def _split_optional(tp):
    """(inner type, optional?) of ``Optional[X]`` / ``X | None``."""
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args:
            rest = tuple(a for a in args if a is not type(None))
            return (rest[0] if len(rest) == 1 else Union[rest]), True
    return tp, False


def type_name(tp):
    """A readable name of a field type (for error messages)."""
    inner, optional = _split_optional(tp)
    if optional:
        return f"{type_name(inner)} or none"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple of {type_name(args[0])}"
        return "tuple (" + ", ".join(type_name(a) for a in args) + ")"
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "dict (JSON object)"
    if _is_union(tp):
        return " or ".join(type_name(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return f"{tp.__name__} (JSON object)"
    return getattr(tp, "__name__", str(tp))


def _valid_fields(cls):
    return ", ".join(_fields(cls))


def _bad(path, value, tp, extra=""):
    return ConfigError(f"{path}={value!r}: expected {type_name(tp)}{extra}")


def _coerce(value, tp, path):
    """``value`` (Python / JSON data) checked against and converted to ``tp``."""
    inner, optional = _split_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise _bad(path, value, tp)
    tp = inner
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args and any(type(value) is type(a) for a in args):
            return value
        raise _bad(path, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(path, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad(path, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad(path, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(path, value, tp)
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(path, value, tp)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _bad(path, value, tp, f" ({len(args)} items, got {len(value)})")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _bad(path, value, tp)
        return [_coerce(v, args[0], f"{path}[{i}]") if args else v for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _bad(path, value, tp)
        key_tp, value_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, path): _coerce(v, value_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return from_dict(tp, to_dict(value), path)
        if isinstance(value, dict):
            return from_dict(tp, value, path)
        raise _bad(path, value, tp)
    if _is_union(tp):
        for option in args:
            try:
                return _coerce(value, option, path)
            except ConfigError:
                pass
        raise _bad(path, value, tp)
    if isinstance(value, tp):
        return value
    raise _bad(path, value, tp)


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _unquote(text):
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _split_sequence(text):
    """Elements of ``a,b``, ``(a, b)``, ``[a, b]``: (values, parsed_as_json)."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            values = json.loads(stripped)
            if isinstance(values, list):
                return values, True
        except json.JSONDecodeError:
            pass
    if stripped[:1] in "([" and stripped[-1:] in ")]":
        stripped = stripped[1:-1]
    if not stripped.strip():
        return [], False
    return [part.strip() for part in stripped.split(",")], False


def parse_value(text, tp, path="value"):
    """``text`` (an override's right-hand side) parsed as a value of type ``tp``."""
    inner, optional = _split_optional(tp)
    stripped = text.strip()
    if optional and stripped.lower() in ("none", "null"):
        return None
    tp = inner
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return text
    if origin is Literal:
        for choice in args:
            try:
                candidate = parse_value(text, type(choice), path)
            except ConfigError:
                continue
            if candidate == choice:
                return choice
        raise _bad(path, text, tp)
    if tp is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise _bad(path, text, tp, " (true/false)")
    if tp is int:
        try:
            return int(stripped.replace("_", ""))
        except ValueError:
            pass
        try:
            number = float(stripped)
        except ValueError:
            raise _bad(path, text, tp) from None
        if number.is_integer():
            return int(number)
        raise _bad(path, text, tp)
    if tp is float:
        try:
            return float(stripped.replace("_", ""))
        except ValueError:
            raise _bad(path, text, tp) from None
    if tp is str:
        return _unquote(stripped)
    if origin in (tuple, list) or tp in (tuple, list):
        values, is_json = _split_sequence(text)
        if is_json:
            return _coerce(values, tp, path)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(values) != len(args):
                raise _bad(path, text, tp, f" ({len(args)} items, got {len(values)})")
            return tuple(parse_value(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(values, args)))
        element = args[0] if args else str
        parsed = [parse_value(v, element, f"{path}[{i}]") for i, v in enumerate(values)]
        return parsed if (origin is list or tp is list) else tuple(parsed)
    if dataclasses.is_dataclass(tp) or origin is dict or tp is dict:
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            raise _bad(path, text, tp) from None
        if not isinstance(data, dict):
            raise _bad(path, text, tp)
        return _coerce(data, tp, path)
    if _is_union(tp):
        for option in args:
            try:
                return parse_value(text, option, path)
            except ConfigError:
                pass
        raise _bad(path, text, tp)
    raise ConfigError(f"{path}: fields of type {type_name(tp)} cannot be set from the command line")


# ---------------------------------------------------------------------------------- dict / JSON
def to_dict(config):
    """A nested dict of plain JSON values (tuples as lists) of a config dataclass."""
    def convert(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)


def from_dict(cls, data, path=""):
    """A ``cls`` from a (possibly partial) nested dict; missing fields take their defaults.

    Raises:
      ConfigError: unknown fields, values of the wrong type, or a failed ``__post_init__`` check.
    """
    where = path or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a {cls.__name__} (JSON object), got {data!r}")
    hints = _fields(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise ConfigError(f"{_join(path, unknown[0])}: unknown field of {cls.__name__}; valid fields: "
                          f"{_valid_fields(cls)}")
    values = {name: _coerce(value, hints[name], _join(path, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from None


def _join(path, name):
    return f"{path}.{name}" if path else name


def validate(config):
    """Type-checks every field of a config dataclass (and re-runs its checks); returns it."""
    from_dict(type(config), to_dict(config))
    return config


def dumps(config):
    """JSON text of a config, with its class under ``"__config__"``."""
    cls = type(config)
    data = {CLASS_KEY: f"{cls.__module__}:{cls.__qualname__}", **to_dict(config)}
    return json.dumps(data, indent=2) + "\n"


def loads(text, cls=None):
    """A config from ``dumps`` text; ``cls`` default: the recorded class, else ExperimentConfig."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError("config JSON must be an object")
    reference = data.pop(CLASS_KEY, None)
    if cls is None and reference:
        module, _, name = reference.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            raise ConfigError(f"config class {reference!r} not found") from None
    return from_dict(cls or ExperimentConfig, data)


def save(config, path):
    """Writes ``dumps(config)`` to ``path`` atomically (temporary file + rename)."""
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(dumps(config))
    os.replace(tmp, path)
    return path


def load(path, cls=None):
    """The config saved at ``path``."""
    with open(os.fspath(path)) as f:
        text = f.read()
    try:
        return loads(text, cls)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------- overrides
def override(config, assignments):
    """A copy of ``config`` with ``["path.to.field=value", ...]`` applied (module docstring).

    Each value is parsed by its field's type as it is applied; the config's checks (``__post_init__``)
    run once on the result, so the order of the assignments does not matter.

    Raises:
      ConfigError: a malformed assignment, an unknown path (listing the valid fields there), a value
        that does not parse as the field's type, or a result that fails the config's checks.
    """
    cls = type(config)
    data = to_dict(config)
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"override {assignment!r} is not path.to.field=value")
        path, _, text = assignment.partition("=")
        path = path.strip()
        if not path or any(not part for part in path.split(".")):
            raise ConfigError(f"override {assignment!r}: empty field name in {path!r}")
        _assign(cls, data, path.split("."), text, path, "")
    return from_dict(cls, data)


def _assign(cls, data, parts, text, full, prefix):
    """Sets ``parts`` (a field path below ``cls``) in ``data`` (``to_dict`` form) from ``text``."""
    name = parts[0]
    here = _join(prefix, name)
    hints = _fields(cls)
    if name not in hints:
        where = f" (in {full})" if here != full else ""
        raise ConfigError(f"{here}: unknown field of {cls.__name__}{where}; valid fields: "
                          f"{_valid_fields(cls)}")
    inner, _ = _split_optional(hints[name])
    section = dataclasses.is_dataclass(inner)
    if len(parts) == 1:
        if section and text.strip().startswith("{"):
            # A JSON object merges into the current section.
            try:
                given = json.loads(text)
            except json.JSONDecodeError:
                raise _bad(full, text, hints[name]) from None
            if not isinstance(given, dict):
                raise _bad(full, text, hints[name])
            current = data.get(name)
            data[name] = _merge(current if isinstance(current, dict) else to_dict(inner()), given)
            from_dict(inner, data[name], full)  # report a bad field here, with its path
        else:
            data[name] = to_dict(parse_value(text, hints[name], full))
        return
    if not section:
        raise ConfigError(f"{full}: {here} is a field of type {type_name(hints[name])}, not a "
                          f"section with fields")
    if not isinstance(data.get(name), dict):
        data[name] = to_dict(inner())
    _assign(inner, data[name], parts[1:], text, full, here)


def _merge(base, given):
    """``given`` deep-merged into ``base`` (dicts merge, other values replace)."""
    merged = dict(base)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
