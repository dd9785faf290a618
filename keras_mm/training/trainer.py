"""Train, evaluate and export a two-tower experiment from its typed config (``kmm train/eval``).

    cfg = recipes.get_recipe("siglip_digits"); cfg = override(cfg, ["data.folder=runs/digits"])
    summary, model = train(cfg)     # resumes from <out_dir>/checkpoints after a kill
    metrics = evaluate(cfg)         # zero-shot + retrieval on cfg.eval.split

Run folder (``cfg.train.out_dir``): ``checkpoints/`` (+ ``config.json``, the resolved config),
``tensorboard/`` (train scalars: loss, pair accuracy, t, b, learning rate, examples/s; eval
metrics under ``eval/``), ``summary.json`` (DESIGN.md run summary contract).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Dict, List, Optional

import keras

from keras_mm.recipes import config as config_lib
from keras_mm.training import callbacks as cb

LOG = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"
CAPTIONER_KINDS = ("coca", "cappa", "mammut", "pali")
VIDEO_KINDS = ("video_two_tower", "video_mammut", "mvgpt")
MODEL_KINDS = ("two_tower", "limoe", "clippo") + CAPTIONER_KINDS + VIDEO_KINDS
CONTRACT_METRICS = (
    "cider", "bleu4", "meteor", "rouge_l", "vqa_accuracy",
    "motion_probe_top1", "motion_probe_frame_average_top1",
    "zero_shot_top1", "zero_shot_top5", "retrieval_i2t_r1", "retrieval_i2t_r5",
    "retrieval_i2t_r10", "retrieval_t2i_r1", "retrieval_t2i_r5", "retrieval_t2i_r10",
    "routing_success_image", "routing_success_text")


def checkpoint_dir(cfg) -> str:
    return os.path.join(cfg.train.out_dir, "checkpoints")


def load_tokenizer(cfg):
    """The dataset's tokenizer, padded / truncated to the model's text length."""
    from keras_mm.pipelines import datasets

    if cfg.model.kind == "clippo":   # CLIPPO: the text renderer stands in for the tokenizer
        return datasets.text_renderer(cfg.data.input)
    return datasets.load_tokenizer(cfg.data.folder, cfg.data.input)


def build_model(cfg, tokenizer):
    """The TwoTowerModel of ``cfg.model`` sized for the tokenizer and the input config."""
    from keras_mm.models.two_tower import build_two_tower, locked_image_tower

    m = cfg.model
    if m.kind not in MODEL_KINDS:
        raise config_lib.ConfigError(f"model.kind {m.kind!r}: valid kinds: "
                                     f"{', '.join(MODEL_KINDS)}")
    if cfg.data.input.contrastive_caption and m.kind not in ("coca", "mammut"):
        raise config_lib.ConfigError(
            "data.input.contrastive_caption is for captioners with a contrastive head (coca, "
            f"mammut), not model.kind {m.kind!r}")
    if m.kind == "limoe":
        model = _build_limoe(cfg, tokenizer)
        _build_on_zeros(model, cfg)
        return model
    if m.kind == "clippo":
        return _build_clippo(cfg)
    if m.kind in CAPTIONER_KINDS:
        model = _build_captioner(cfg, tokenizer)
        _build_on_zeros(model, cfg)
        return model
    if m.kind in VIDEO_KINDS:
        model = _build_video(cfg, tokenizer)
        _build_on_zeros(model, cfg)
        return model
    if m.lit and not m.init_checkpoint:
        raise config_lib.ConfigError("model.lit needs model.init_checkpoint (a .keras image "
                                     "encoder or classifier)")
    image_overrides = {"image_size": cfg.data.input.image_size, "remat": m.remat,
                       **_stem_overrides(m)}
    text_overrides = {"remat": m.remat}
    if m.embed_dim:
        image_overrides["output_dim"] = m.embed_dim
        text_overrides["output_dim"] = m.embed_dim
    tower = locked_image_tower(m.init_checkpoint) if m.lit else None
    model = build_two_tower(m.preset, m.loss, vocab_size=tokenizer.vocab_size,
                            max_len=cfg.data.input.max_text_len, chunked=m.chunked,
                            image_overrides=image_overrides, text_overrides=text_overrides,
                            image_tower=tower)
    _build_on_zeros(model, cfg)
    return model


def _build_on_zeros(model, cfg):
    size, data = cfg.data.input.image_size, cfg.data.input
    if cfg.model.kind in VIDEO_KINDS:
        video = keras.ops.zeros((1, data.num_frames, size, size, 3))
        text = keras.ops.ones((1, data.max_text_len), "int32")
        if cfg.model.kind == "mvgpt":
            model({"video": video, "current": keras.ops.ones((1, data.max_current_len), "int32"),
                   "future": text})
        else:
            model({"video": video, "text": text})
        return
    inputs = {"image": keras.ops.zeros((1, size, size, 3)),
              "text": keras.ops.ones((1, cfg.data.input.max_text_len), "int32")}
    if cfg.data.input.prompt_mixture:
        inputs["prompt"] = keras.ops.ones((1, cfg.data.input.max_prompt_len), "int32")
    model(inputs)


def _build_captioner(cfg, tokenizer):
    """A captioner (CoCa, CapPa, MaMMUT, PaLI-style) of ``model.preset`` with the
    ``model.captioner`` settings that are set."""
    from keras_mm.models.captioners import build_captioner

    m, c, data = cfg.model, cfg.model.captioner, cfg.data.input
    if m.lit or m.chunked or m.init_checkpoint:
        raise config_lib.ConfigError(f"model.kind {m.kind!r} has no LiT / chunked / "
                                     "init_checkpoint mode")
    if not data.add_bos:
        raise config_lib.ConfigError(f"model.kind {m.kind!r} decodes from BOS: set "
                                     "data.input.add_bos=true")
    if (m.kind == "pali") != bool(data.prompt_mixture):
        raise config_lib.ConfigError("model.kind 'pali' needs data.input.prompt_mixture="
                                     "caption_qa, and only it takes prompts")
    kwargs = {"blind": c.blind, "label_smoothing": c.label_smoothing}
    if m.kind in ("coca", "mammut"):
        for name in ("contrastive_weight", "caption_weight"):
            if getattr(c, name) is not None:
                kwargs[name] = getattr(c, name)
        if m.embed_dim:
            kwargs["embed_dim"] = m.embed_dim
    if m.kind == "coca":
        kwargs["loss"] = m.loss
        if c.num_caption_queries is not None:
            kwargs["num_caption_queries"] = c.num_caption_queries
    elif c.num_caption_queries is not None:
        raise config_lib.ConfigError("model.captioner.num_caption_queries is CoCa's option")
    if m.kind == "mammut":
        kwargs.update(contrastive=c.contrastive, focal_gamma=c.focal_gamma)
    if m.kind == "cappa" and c.parallel_fraction is not None:
        kwargs["parallel_fraction"] = c.parallel_fraction
    if m.kind == "pali":
        kwargs["max_prompt_len"] = data.max_prompt_len
    image_overrides = {"image_size": data.image_size, "remat": m.remat, **_stem_overrides(m)}
    if c.position_crop:
        if m.kind != "mammut":
            raise config_lib.ConfigError("model.captioner.position_crop is MaMMUT's option")
        image_overrides["position_crop"] = c.position_crop
    return build_captioner(m.kind, m.preset, vocab_size=tokenizer.vocab_size,
                           max_len=data.max_text_len, image_overrides=image_overrides,
                           **kwargs)


def _build_video(cfg, tokenizer):
    """A video model: the two-tower model with a video tower, MaMMUT on clips, or MV-GPT; the
    video tower of ``model.video.encoder`` (TubeViT or the frame-averaging baseline)."""
    from keras_mm.models import video as video_models

    m, v, data = cfg.model, cfg.model.video, cfg.data.input
    if m.lit or m.chunked:
        raise config_lib.ConfigError(f"model.kind {m.kind!r} has no LiT / chunked mode")
    if m.kind != "video_two_tower" and not data.add_bos:
        raise config_lib.ConfigError(f"model.kind {m.kind!r} decodes from BOS: set "
                                     "data.input.add_bos=true")
    if m.embed_dim or m.stem != "patch" or m.patch_size:
        raise config_lib.ConfigError(f"model.kind {m.kind!r}: embed_dim, stem and patch_size "
                                     "do not apply (the video tower's tubes set its tokens)")
    video_overrides = {"video_size": [data.num_frames, data.image_size, data.image_size],
                       "remat": m.remat}
    if v.image_position_embedding:
        if v.encoder != "tubevit":
            raise config_lib.ConfigError("model.video.image_position_embedding is a TubeViT "
                                         "option (model.video.encoder=tubevit)")
        video_overrides["image_position_embedding"] = True
    if v.position_gate_init:
        if v.encoder != "tubevit" or not (v.image_position_embedding
                                          or m.kind == "video_mammut"):
            raise config_lib.ConfigError(
                "model.video.position_gate_init is the gate of TubeViT's image position "
                "variant: set model.video.image_position_embedding=true (video_mammut has it)")
        video_overrides["position_gate_init"] = v.position_gate_init
    if v.tubes:
        from keras_mm.encoders import presets

        try:
            video_overrides["tubes"] = presets.tube_set(v.tubes)
        except ValueError as e:
            raise config_lib.ConfigError(f"model.video.tubes: {e}") from e
    common = dict(encoder=v.encoder, vocab_size=tokenizer.vocab_size, max_len=data.max_text_len,
                  video_overrides=video_overrides)
    if m.kind == "video_two_tower":
        return video_models.build_video_two_tower(m.preset, m.loss,
                                                  text_overrides={"remat": m.remat}, **common)
    c = m.captioner
    if m.kind == "video_mammut":
        kwargs = {k: getattr(c, k) for k in ("contrastive_weight", "caption_weight")
                  if getattr(c, k) is not None}
        return video_models.build_video_mammut(
            m.preset, contrastive=c.contrastive, focal_gamma=c.focal_gamma, blind=c.blind,
            label_smoothing=c.label_smoothing, **kwargs, **common)
    return video_models.build_mvgpt(
        m.preset, backward=v.mvgpt_backward, use_frames=v.mvgpt_use_frames,
        backward_weight=v.mvgpt_backward_weight, max_current_len=data.max_current_len,
        label_smoothing=c.label_smoothing, **common)


def _init_video_tower(cfg, model):
    """A fresh video run starts from ``model.init_checkpoint`` (image-to-video for TubeViT)."""
    from keras_mm.models import video as video_models
    from keras_mm.training import checkpoint

    path = cfg.model.init_checkpoint
    try:
        report = video_models.initialize_video_tower(
            model, checkpoint.read_model_variables(path),
            position_table=cfg.model.video.init_position_table)
    except (ValueError, checkpoint.CheckpointError) as e:
        raise config_lib.ConfigError(f"model.init_checkpoint: {e}") from e
    LOG.info("initialised from %s: %d variables copied, %d tube kernels / biases inflated from "
             "the 2-D patch embedding, %d kept at their initialisation (%s), %d dropped", path,
             len(report["copied"]), len(report["inflated"]), len(report["kept"]),
             ", ".join(p.split("/", 1)[-1] for p in report["kept"][:6]) or "none",
             len(report["dropped"]))
    return report


def _stem_overrides(m):
    """Image-encoder kwargs of ``model.stem`` / ``model.patch_size`` (none when unset, so the
    configs of runs without them are unchanged)."""
    out = {}
    if m.stem != "patch":
        out["stem"] = m.stem
    if m.patch_size:
        out["patch_size"] = m.patch_size
    return out


def _build_clippo(cfg):
    """A CLIPPOModel: one ViT of ``model.preset`` for images and rendered text."""
    from keras_mm.models.clippo import build_clippo

    m, size = cfg.model, cfg.data.input.image_size
    if not cfg.data.input.render_text:
        raise config_lib.ConfigError("model.kind 'clippo' needs data.input.render_text=true")
    if m.lit or m.init_checkpoint:
        raise config_lib.ConfigError("model.kind 'clippo' has no LiT / init_checkpoint mode")
    model = build_clippo(m.preset, m.loss, image_size=size, embed_dim=m.embed_dim,
                         chunked=m.chunked, encoder_overrides={"remat": m.remat})
    zeros = keras.ops.zeros((1, size, size, 3))
    model({"image": zeros, "text_images": zeros})
    return model


def _build_limoe(cfg, tokenizer):
    """A LIMoEModel: the LIMoE preset, with ``model.moe`` fields that are set replacing it."""
    import dataclasses

    from keras_mm.encoders import presets
    from keras_mm.models.limoe import build_limoe

    m = cfg.model
    if m.lit or m.chunked:
        raise config_lib.ConfigError("model.kind 'limoe' has no LiT / chunked mode")
    moe = dataclasses.asdict(m.moe)
    weights = {k: v for k, v in moe.items() if k in (
        "local_entropy_weight", "global_entropy_weight", "global_entropy_tau",
        "importance_weight", "load_weight") and v is not None}
    overrides = {k: v for k, v in moe.items() if k in (
        "num_experts", "moe_every", "capacity_factor", "group_size", "bpr", "noise_std")
        and v is not None}
    overrides.update(image_size=cfg.data.input.image_size, remat=m.remat)
    if m.embed_dim:
        overrides["output_dim"] = m.embed_dim
    presets.limoe_config(m.preset)   # a clear error for an unknown preset
    return build_limoe(m.preset, m.loss, vocab_size=tokenizer.vocab_size,
                       max_len=cfg.data.input.max_text_len, encoder_overrides=overrides,
                       **weights)


def _check_data(cfg):
    from keras_mm.pipelines import datasets

    if not cfg.data.folder:
        raise config_lib.ConfigError("data.folder is empty: set it, e.g. --set data.folder=DIR")
    datasets.split_files(cfg.data.folder, cfg.data.train_split)  # clear error when missing


def train(cfg, *, extra_callbacks=(), verbose="auto"):
    """Trains (or resumes) ``cfg``; evaluates at the end; writes summary.json.

    Returns ``(summary dict, trained model)``."""
    import tensorflow as tf

    from keras_mm.pipelines import datasets
    from keras_mm.training import checkpoint, mixed_precision, optimizer, strategy

    _check_data(cfg)
    keras.utils.set_random_seed(cfg.train.seed)  # before the tokenizer (tensorflow-text resource)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    mixed_precision.set_precision(cfg.train.precision)
    backend = keras.backend.backend()
    dist = None
    if backend == "tensorflow":
        dist = strategy.make_strategy(cfg.train.strategy, tpu=cfg.train.tpu,
                                      devices=cfg.train.devices)
    elif backend == "jax" and cfg.train.strategy != "one_device":
        keras.distribution.set_distribution(strategy.make_jax_distribution(cfg.train.strategy))
    ckpt = checkpoint.Checkpointer(checkpoint_dir(cfg), keep=cfg.train.keep)
    ckpt.write_config(cfg)
    initial_step = ckpt.latest_step() or 0
    tokenizer = load_tokenizer(cfg)

    make_train = (datasets.video_train_dataset if cfg.model.kind in VIDEO_KINDS
                  else datasets.train_dataset)

    def dataset_fn(ctx=None):
        # String features (the record ids) stay out of the train step: XLA (jit_compile)
        # cannot take them, and no model uses them.
        return checkpoint.resumable_dataset(
            lambda: make_train(cfg.data.folder, cfg.data.input, tokenizer=tokenizer,
                               input_context=ctx, split=cfg.data.train_split).map(
                lambda b: {k: v for k, v in b.items() if v.dtype != tf.string}),
            skip_batches=initial_step * checkpoint.batches_per_step(ctx))

    if dist is not None and dist.num_replicas_in_sync > 1:
        ds = dist.distribute_datasets_from_function(dataset_fn)
    else:
        ds = dataset_fn()
    scope = dist.scope() if dist is not None else _nullcontext()
    with scope:
        model = build_model(cfg, tokenizer)
        model.compile(optimizer=optimizer.make_optimizer(cfg.optimizer, cfg.train.steps,
                                                         precision=cfg.train.precision),
                      jit_compile=cfg.train.jit_compile,
                      steps_per_execution=cfg.train.steps_per_execution)
    if initial_step == 0 and cfg.model.kind in VIDEO_KINDS and cfg.model.init_checkpoint:
        _init_video_tower(cfg, model)
    log_dir = os.path.join(cfg.train.out_dir, "tensorboard")
    callbacks = cb.training_callbacks(ckpt, initial_step, cfg.train.checkpoint_every,
                                      log_dir=log_dir, log_every=cfg.train.log_every,
                                      global_batch_size=cfg.data.input.batch_size)
    if cfg.eval.every_steps:
        callbacks = list(callbacks) + [PeriodicEval(cfg, tokenizer, callbacks[1], initial_step)]
    if hasattr(model, "routing_terms"):   # MoE: expert load per layer and modality, figures
        from keras_mm.training.routing_monitor import RoutingMonitor

        probe = next(iter(datasets.eval_dataset(cfg.eval.folder or cfg.data.folder,
                                                cfg.eval.split, cfg.data.input,
                                                tokenizer=tokenizer)))
        callbacks = list(callbacks) + [RoutingMonitor(
            {"image": probe["image"], "text": probe["text"]}, callbacks[1],
            cfg.train.log_every, figure_dir=cfg.train.out_dir, initial_step=initial_step)]
    if verbose == "auto":  # a progress bar on a terminal, one line per epoch in logs / CI
        import sys

        verbose = 1 if sys.stdout.isatty() else 2
    start = time.time()
    if initial_step < cfg.train.steps:
        if initial_step:
            LOG.info("resuming from step %d of %d", initial_step, cfg.train.steps)
        model.fit(ds, callbacks=list(callbacks) + list(extra_callbacks), verbose=verbose,
                  **checkpoint.resume_fit_kwargs(initial_step, cfg.train.steps,
                                                 cfg.train.steps_per_epoch))
    else:
        ckpt.restore_latest(model, model.optimizer)
    train_seconds = time.time() - start
    metrics = evaluate(cfg, model=model, tokenizer=tokenizer)
    callbacks[1].log_scalars(metrics, step=cfg.train.steps, split="eval")
    summary = write_summary(cfg, train_seconds=train_seconds, metrics=metrics)
    return summary, model


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def restore(cfg, tokenizer=None):
    """The trained model of a run folder (newest complete checkpoint)."""
    from keras_mm.training import checkpoint

    tokenizer = tokenizer or load_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    step = checkpoint.restore_latest(model, None, checkpoint_dir(cfg))
    if not step:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(cfg)}")
    return model


def load_run_config(run_dir: str):
    path = os.path.join(run_dir, "checkpoints", "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir!r} is not a run folder (no checkpoints/config.json)")
    return config_lib.load(path)


def embed_functions(model):
    """(embed_image, embed_text) callables over numpy batches, compiled once."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        image_fn = tf.function(lambda x: model.embed_image(x), reduce_retracing=True)
        text_fn = tf.function(lambda x: model.embed_text(x), reduce_retracing=True)
        return (lambda x: image_fn(x).numpy()), (lambda x: text_fn(x).numpy())
    return (lambda x: keras.ops.convert_to_numpy(model.embed_image(x)),
            lambda x: keras.ops.convert_to_numpy(model.embed_text(x)))


def reported(name: str) -> bool:
    """Whether an evaluator's output is a summary metric: the DESIGN.md contract names plus the
    probes' ``linear_probe_top1`` and ``few_shot_{k}shot_top1``."""
    return name in CONTRACT_METRICS or name == "linear_probe_top1" or bool(
        re.fullmatch(r"few_shot_\d+shot_top1", name))


def evaluate(cfg, model=None, tokenizer=None) -> Dict[str, float]:
    """The summary metrics of ``cfg.eval.tasks`` on ``cfg.eval.split``."""
    import dataclasses

    from keras_mm.evaluation import linear_probe, retrieval, zero_shot
    from keras_mm.pipelines import datasets

    folder = cfg.eval.folder or cfg.data.folder
    tokenizer = tokenizer or load_tokenizer(cfg)
    model = model or restore(cfg, tokenizer)
    if cfg.model.kind in VIDEO_KINDS:
        return evaluate_video(cfg, model, tokenizer)
    if cfg.model.kind in ("cappa", "pali"):     # no contrastive head: no embeddings
        embed_image = embed_text = None
    elif cfg.model.kind == "clippo":
        from keras_mm.evaluation.clippo import clippo_embed_functions

        embed_image, embed_text = clippo_embed_functions(model, tokenizer)
    else:
        embed_image, embed_text = embed_functions(model)
    input_cfg = dataclasses.replace(cfg.data.input, batch_size=cfg.eval.batch_size)

    def split(name):
        return datasets.eval_dataset(folder, name, input_cfg, tokenizer=tokenizer)

    metrics: Dict[str, float] = {}
    for task in cfg.eval.tasks:
        if embed_image is None and task in ("zero_shot", "retrieval", "linear_probe",
                                            "few_shot"):
            raise config_lib.ConfigError(f"eval.tasks: {task!r} needs a contrastive head; "
                                         f"model.kind {cfg.model.kind!r} has none")
        if task in ("captioning", "vqa"):
            out = caption_tasks(cfg, model, tokenizer, task, input_cfg, folder)
        elif task == "zero_shot":
            out = zero_shot.evaluate_zero_shot_folder(
                embed_image, embed_text, folder, cfg.eval.split, input_cfg, tokenizer,
                max_examples=cfg.eval.max_examples)
        elif task == "retrieval":
            out = retrieval.evaluate_retrieval_folder(embed_image, embed_text, folder,
                                                      cfg.eval.split, input_cfg, tokenizer)
        elif task == "linear_probe":
            out = linear_probe.evaluate_linear_probe(
                embed_image, split(cfg.eval.probe_train_split), split(cfg.eval.probe_val_split),
                split(cfg.eval.split))
        elif task == "few_shot":
            out = linear_probe.evaluate_few_shot(
                embed_image, split(cfg.eval.probe_train_split), split(cfg.eval.split),
                val_dataset=split(cfg.eval.probe_val_split), shots=cfg.eval.shots,
                seed=cfg.train.seed)
        else:
            raise config_lib.ConfigError(
                f"eval.tasks: unknown task {task!r}; valid: {', '.join(config_lib.EVAL_TASKS)}")
        metrics.update({k: float(v) for k, v in out.items() if reported(k)})
    if hasattr(model, "routing_terms"):   # MoE models: routing success on the eval split
        metrics.update(routing_metrics(model, split(cfg.eval.split), cfg.eval.max_examples))
    return metrics


VIDEO_TASKS = {"video_two_tower": ("retrieval", "motion_probe"),
               "video_mammut": ("retrieval", "motion_probe", "captioning"),
               "mvgpt": ("next_utterance",)}


def evaluate_video(cfg, model, tokenizer) -> Dict[str, float]:
    """The summary metrics of a video run (``keras_mm.evaluation.video``): retrieval on the
    ``eval.gallery_size``-clip gallery, the motion probe (and, with ``eval.baseline_run``, the
    same probe and retrieval of the frame-averaging baseline run), video captioning, MV-GPT's
    next-utterance generation."""
    import dataclasses

    from keras_mm.evaluation import video as video_eval
    from keras_mm.pipelines import datasets

    folder = cfg.eval.folder or cfg.data.folder
    kind = cfg.model.kind
    bad = [t for t in cfg.eval.tasks if t not in VIDEO_TASKS[kind]]
    if bad:
        raise config_lib.ConfigError(f"eval.tasks: {bad} do not apply to model.kind {kind!r}; "
                                     f"valid: {', '.join(VIDEO_TASKS[kind])}")
    input_cfg = dataclasses.replace(cfg.data.input, batch_size=cfg.eval.batch_size)

    def split(name, **overrides):
        return datasets.video_eval_dataset(folder, name,
                                           dataclasses.replace(input_cfg, **overrides),
                                           tokenizer=tokenizer)

    def run_tasks(model, prefix=""):
        out: Dict[str, float] = {}
        embed_video, embed_text = (embed_functions(model) if kind != "mvgpt"
                                   else (None, None))
        for task in cfg.eval.tasks:
            if task == "retrieval":
                got = video_eval.evaluate_video_retrieval(
                    embed_video, embed_text, split(cfg.eval.split, eval_texts="all"),
                    gallery_size=cfg.eval.gallery_size)
                if not prefix and _is_moving_digits(folder):
                    got["retrieval_t2i_r1_frame_average_ceiling"] = _frame_average_ceiling(
                        split(cfg.eval.split, eval_texts="all"), tokenizer,
                        cfg.eval.gallery_size)
            elif task == "motion_probe":
                got = video_eval.evaluate_motion_probe(
                    embed_video if cfg.eval.probe_features == "embedding"
                    else pooled_video_features(model), split(cfg.eval.probe_train_split),
                    split(cfg.eval.probe_val_split), split(cfg.eval.split),
                    max_train=cfg.eval.probe_max_train)
            elif task == "captioning":
                if prefix:
                    continue
                got = _video_captions(cfg, model, tokenizer, input_cfg, folder)
            else:   # next_utterance
                got = video_eval.evaluate_next_utterance(
                    _next_utterance_fn(cfg, model), datasets.video_caption_eval_dataset(
                        folder, cfg.eval.split, input_cfg, tokenizer=tokenizer),
                    tokenizer, max_examples=cfg.eval.max_examples)
            out.update({prefix + k: float(v) for k, v in got.items()})
        return out

    metrics = run_tasks(model)
    if cfg.eval.baseline_run:
        base_cfg = load_run_config(cfg.eval.baseline_run)
        base_cfg = dataclasses.replace(base_cfg, eval=dataclasses.replace(
            cfg.eval, baseline_run=None, tasks=tuple(
                t for t in cfg.eval.tasks if t in ("retrieval", "motion_probe"))))
        base = restore(base_cfg, tokenizer)
        got = run_tasks(base, prefix="frame_average_")
        metrics.update(got)
        if "frame_average_motion_probe_top1" in got:
            metrics["motion_probe_frame_average_top1"] = got["frame_average_motion_probe_top1"]
    return {k: v for k, v in metrics.items()
            if reported(k) or k.startswith(("frame_average_retrieval", "next_"))
            or k == "retrieval_t2i_r1_frame_average_ceiling"}


def _is_moving_digits(folder):
    import tensorflow as tf

    return tf.io.gfile.exists(os.path.join(folder, "moving_digits.json"))


def _frame_average_ceiling(dataset, tokenizer, gallery_size):
    """``blind_retrieval_r1_ceiling`` of the first ``gallery_size`` clips' captions with
    moving-digits' time reversal: the best text -> video R@1 a frame-averaging model can get."""
    import numpy as np

    from keras_mm.beam_jobs.moving_digits import time_reversed_caption
    from keras_mm.evaluation import video as video_eval

    clips = []
    for batch in dataset:
        for texts, n in zip(np.asarray(batch["texts"]), np.asarray(batch["num_texts"])):
            strings = tokenizer.detokenize(texts[:int(n)]).numpy()
            clips.append([t.decode() if isinstance(t, bytes) else str(t) for t in strings])
        if gallery_size is not None and len(clips) >= gallery_size:
            break
    return video_eval.blind_retrieval_r1_ceiling(clips[:gallery_size], time_reversed_caption)


def pooled_video_features(model):
    """``video -> [B, width]`` numpy: the video tower's pooled features before its projection
    head (the motion probe's default features), compiled once on TF."""
    tower = getattr(model, "image_encoder_model", None) or model.image_encoder

    def run(video):
        return tower(video, training=False, pre_head=True)

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(run, reduce_retracing=True)
        return lambda video: compiled(video).numpy()
    return lambda video: keras.ops.convert_to_numpy(run(video))


def _next_utterance_fn(cfg, model):
    """(video, current ids) -> generated future-utterance ids (numpy), compiled once on TF."""
    from keras_mm.evaluation import caption_eval

    c = cfg.model.captioner
    return caption_eval.generate_function(
        model, method=c.decode, beam_size=c.beam_size, length_penalty=c.length_penalty,
        max_length=c.max_decode_len, with_prompt=True, prompt_key="current")


def _video_captions(cfg, model, tokenizer, input_cfg, folder) -> Dict[str, float]:
    """Caption metrics of a video captioner's greedy (or configured) captions of the clips."""
    from keras_mm.evaluation import caption_eval
    from keras_mm.evaluation.video import as_image_batches
    from keras_mm.pipelines import datasets

    c = cfg.model.captioner
    dataset = datasets.video_caption_eval_dataset(folder, cfg.eval.split, input_cfg)
    metrics, samples = caption_eval.evaluate_captions(
        model, as_image_batches(dataset), tokenizer, method=c.decode, beam_size=c.beam_size,
        length_penalty=c.length_penalty, max_length=c.max_decode_len,
        max_examples=cfg.eval.max_examples)
    if samples is not None:
        from keras_mm.evaluation.caption_samples import write_caption_samples

        clips = samples["images"]                               # [B, T, H, W, 3]
        write_caption_samples(os.path.join(cfg.train.out_dir, "tensorboard", "eval"),
                              cfg.train.steps, clips[:, clips.shape[1] // 2],
                              samples["predictions"], samples["references"])
    return metrics


def caption_tasks(cfg, model, tokenizer, task, input_cfg, folder) -> Dict[str, float]:
    """The captioning metrics (and TensorBoard samples) or the VQA accuracy of a captioner."""
    from keras_mm.evaluation import caption_eval
    from keras_mm.pipelines import datasets

    if cfg.model.kind not in CAPTIONER_KINDS:
        raise config_lib.ConfigError(f"eval.tasks: {task!r} needs a captioner; model.kind "
                                     f"{cfg.model.kind!r} is not one")
    c = cfg.model.captioner
    dataset = datasets.caption_eval_dataset(folder, cfg.eval.split, input_cfg)
    if task == "vqa":
        if cfg.model.kind != "pali":
            raise config_lib.ConfigError("eval.tasks: 'vqa' needs model.kind 'pali'")
        return caption_eval.evaluate_vqa(model, dataset, tokenizer,
                                         max_prompt_len=input_cfg.max_prompt_len,
                                         max_length=c.max_decode_len,
                                         max_examples=cfg.eval.max_examples)
    prompt = input_cfg.caption_prompt if cfg.model.kind == "pali" else None
    metrics, samples = caption_eval.evaluate_captions(
        model, dataset, tokenizer, method=c.decode, beam_size=c.beam_size,
        length_penalty=c.length_penalty, max_length=c.max_decode_len, prompt=prompt,
        max_prompt_len=input_cfg.max_prompt_len, max_examples=cfg.eval.max_examples)
    if samples is not None:
        from keras_mm.evaluation.caption_samples import write_caption_samples

        write_caption_samples(os.path.join(cfg.train.out_dir, "tensorboard", "eval"),
                              cfg.train.steps, samples["images"], samples["predictions"],
                              samples["references"])
    return metrics


def routing_metrics(model, dataset, max_examples=None) -> Dict[str, float]:
    """``routing_success_<m>`` and ``gate_entropy_<m>`` of an MoE model over eval batches
    (inference capacity), weighted by batch size."""
    import numpy as np

    names = [f"{s}_{m}" for m in ("image", "text") for s in ("routing_success", "gate_entropy")]
    sums, count = dict.fromkeys(names, 0.0), 0
    for batch in dataset:
        n = int(batch["image"].shape[0])
        out = model({"image": batch["image"], "text": batch["text"]}, training=False)
        for name in names:
            sums[name] += n * float(np.asarray(keras.ops.convert_to_numpy(out[name])))
        count += n
        if max_examples and count >= max_examples:
            break
    return {name: value / max(count, 1) for name, value in sums.items()}


class PeriodicEval(cb._GlobalStepCallback):
    """Runs :func:`evaluate` every ``cfg.eval.every_steps`` global steps during training (the
    final evaluation runs after training anyway) and logs the metrics as TensorBoard ``eval``
    scalars through the run's ScalarLogger."""

    def __init__(self, cfg, tokenizer, scalar_logger, initial_step=0):
        super().__init__(initial_step)
        self.cfg, self.tokenizer, self.scalar_logger = cfg, tokenizer, scalar_logger
        self.every = int(cfg.eval.every_steps)
        self.history: List[Dict] = []

    def on_train_batch_end(self, batch, logs=None):
        before = self._advance(batch)
        if cb._crossed(before, self.global_step, self.every) and (
                self.global_step < self.cfg.train.steps):
            metrics = evaluate(self.cfg, model=self.model, tokenizer=self.tokenizer)
            self.scalar_logger.log_scalars(metrics, step=self.global_step, split="eval")
            self.history.append({"step": self.global_step, **metrics})
            LOG.info("step %d eval: %s", self.global_step,
                     ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))


def model_name(cfg) -> str:
    """The summary's model name: ``two_tower_sigmoid``, ``two_tower_softmax_lit``, ``coca``,
    ``mammut_focal``, ``cappa_blind``..."""
    m = cfg.model
    if m.kind == "mvgpt":
        return "mvgpt" + ("" if m.video.mvgpt_backward else "_forward_only") + (
            "" if m.video.mvgpt_use_frames else "_no_frames")
    if m.kind in VIDEO_KINDS:
        name = m.kind + ("_frame_average" if m.video.encoder == "frame_average" else "")
        return name + (f"_{m.loss}" if m.kind == "video_two_tower" else "")
    if m.kind in CAPTIONER_KINDS:
        name = m.kind + ("_focal" if m.kind == "mammut" and
                         m.captioner.contrastive == "focal" else "")
        return name + ("_blind" if m.captioner.blind else "")
    return f"{m.kind}_{m.loss}" + ("_lit" if m.lit else "")


def write_summary(cfg, *, train_seconds: float, metrics: Dict[str, float],
                  export_dir: str = "") -> Dict:
    """``<out_dir>/summary.json`` per DESIGN.md (merged with an existing one)."""
    path = os.path.join(cfg.train.out_dir, SUMMARY_FILE)
    summary = {}
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    summary.update({
        "model": model_name(cfg),
        "preset": cfg.model.preset,
        "train_seconds": round(float(train_seconds), 3),
        "train_steps": int(cfg.train.steps),
        "export_dir": export_dir or summary.get("export_dir", ""),
        "metrics": {**summary.get("metrics", {}), **metrics},
    })
    os.makedirs(cfg.train.out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary
