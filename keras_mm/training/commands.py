"""``kmm train``, ``kmm eval`` and ``kmm export``: argv -> a run summary dict.

    kmm train --recipe siglip_digits --set data.folder=runs/digits --set train.steps=600
    kmm eval --run runs/demo/siglip_digits [--set eval.split=validation]
    kmm export --run runs/demo/siglip_digits [--name siglip_digits] [--version 3]
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from keras_mm.beam_jobs.job_flags import ArgParser, FlagError
from keras_mm.recipes import config as config_lib


def _config_parser(prog: str, description: str, run_required: bool):
    parser = ArgParser(prog=prog, description=description)
    if run_required:
        parser.add_argument("--run", required=True,
                            help="run folder of a `kmm train` (holds checkpoints/config.json)")
    else:
        parser.add_argument("--recipe", default="siglip_digits",
                            help=f"named recipe: {', '.join(config_lib.recipe_names())}")
        parser.add_argument("--config", default=None,
                            help="a config JSON file (e.g. a run's checkpoints/config.json) "
                                 "instead of --recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="PATH=VALUE",
                        help="override any config field, e.g. --set train.steps=200 (repeatable)")
    return parser


def _resolve(args, run_required: bool):
    from keras_mm.training import trainer

    try:
        if run_required:
            cfg = trainer.load_run_config(args.run)
        elif args.config:
            cfg = config_lib.load(args.config)
        else:
            cfg = config_lib.get_recipe(args.recipe)
        return config_lib.override(cfg, args.overrides)
    except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
        raise FlagError(str(e)) from e


def train(argv: Optional[Sequence[str]] = None) -> Dict:
    """Train (resuming after a kill) and evaluate; writes <out_dir>/summary.json."""
    from keras_mm.training import trainer

    parser = _config_parser("kmm train", "Train a recipe; resumes from its last checkpoint.",
                            run_required=False)
    args = parser.parse_args(list(argv) if argv is not None else None)
    cfg = _resolve(args, run_required=False)
    summary, _ = trainer.train(cfg)
    return {"out_dir": cfg.train.out_dir, **summary}


def evaluate(argv: Optional[Sequence[str]] = None) -> Dict:
    """Evaluate a run's newest checkpoint; merges the metrics into its summary.json."""
    from keras_mm.training import trainer

    parser = _config_parser("kmm eval", "Zero-shot / retrieval evaluation of a trained run.",
                            run_required=True)
    args = parser.parse_args(list(argv) if argv is not None else None)
    cfg = _resolve(args, run_required=True)
    metrics = trainer.evaluate(cfg)
    return trainer.write_summary(cfg, train_seconds=_previous(cfg, "train_seconds", 0.0),
                                 metrics=metrics)


def _previous(cfg, key, default):
    import json

    path = os.path.join(cfg.train.out_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f).get(key, default)
    return default


def next_version(base: str) -> int:
    """1 + the largest integer version folder under ``base`` (TF Serving layout)."""
    versions = [int(v) for v in os.listdir(base) if v.isdigit()] if os.path.isdir(base) else []
    return max(versions, default=0) + 1


def export_model(model, tokenizer, input_config, templates, export_dir, class_names=None,
                 captioner=None):
    """The SavedModel of a trained model of any family: CLIPPO renders text in the graph,
    captioners (CoCa, CapPa, MaMMUT, PaLI-style) generate captions in it with the search of
    ``captioner`` (a ``CaptionerConfig``: decode, beam_size, length_penalty, max_decode_len;
    default greedy), the others (two-tower, LIMoE) tokenize text."""
    from keras_mm.export.captioner import CAPTIONER_FAMILIES

    family = getattr(model, "family", None)
    search = {} if captioner is None else dict(
        method=captioner.decode, beam_size=captioner.beam_size,
        length_penalty=captioner.length_penalty, max_length=captioner.max_decode_len)
    if family == "mvgpt" or getattr(model, "visual_key", "image") == "video":
        from keras_mm.export.video import export_video

        return export_video(model, tokenizer, input_config, export_dir, **search)
    if family in CAPTIONER_FAMILIES:
        from keras_mm.export.captioner import export_captioner

        return export_captioner(model, tokenizer, input_config, export_dir,
                                eval_templates=templates, class_names=class_names, **search)
    if family == "clippo":
        from keras_mm.export.clippo import export_clippo as write
    else:
        from keras_mm.export.two_tower import export_two_tower as write
    return write(model, tokenizer, input_config, templates, export_dir, class_names=class_names)


def export(argv: Optional[Sequence[str]] = None) -> Dict:
    """SavedModel of a run at <base_dir>/<name>/<version>/ with the serving signatures."""
    import dataclasses

    from tensorflow.io.gfile import exists as tf_exists

    from keras_mm.evaluation.zero_shot import (CLASSNAMES_FILE, TEMPLATES_EVAL_FILE,
                                               load_class_names, load_eval_templates)
    from keras_mm.export.two_tower import read_export_info
    from keras_mm.training import trainer

    parser = _config_parser("kmm export", "Export a trained run as a TF Serving SavedModel.",
                            run_required=True)
    parser.add_argument("--name", default=None, help="model name (default: the recipe's)")
    parser.add_argument("--base_dir", default=None, help="default: the config's export.base_dir")
    parser.add_argument("--version", type=int, default=None, help="default: next integer")
    args = parser.parse_args(list(argv) if argv is not None else None)
    cfg = _resolve(args, run_required=True)
    name = args.name or cfg.export.name or cfg.name
    base = os.path.join(args.base_dir or cfg.export.base_dir, name)
    version = args.version or cfg.export.version or next_version(base)
    if version < 1:
        raise FlagError(f"--version must be a positive integer, got {version}")
    export_dir = os.path.join(base, str(version))
    tokenizer = trainer.load_tokenizer(cfg)
    model = trainer.restore(cfg, tokenizer)
    folder = cfg.eval.folder or cfg.data.folder
    class_names = (load_class_names(folder) if tf_exists(os.path.join(folder, CLASSNAMES_FILE))
                   else None)
    # Label-as-text folders carry eval templates; image-text ones (the captioners') do not:
    # then `classify` embeds each label as given.
    templates = (load_eval_templates(folder)
                 if tf_exists(os.path.join(folder, TEMPLATES_EVAL_FILE)) else ["{}"])
    export_model(model, tokenizer, dataclasses.replace(cfg.data.input), templates, export_dir,
                 class_names=class_names, captioner=cfg.model.captioner)
    summary = trainer.write_summary(cfg, train_seconds=_previous(cfg, "train_seconds", 0.0),
                                    metrics={}, export_dir=export_dir)
    return {"export_dir": export_dir, "name": name, "version": version,
            "signatures": sorted(read_export_info(export_dir)["signatures"]),
            "summary": os.path.join(cfg.train.out_dir, "summary.json"), **summary}


def serve(argv: Optional[List[str]] = None) -> None:
    from keras_mm.export import serve as serve_lib

    serve_lib.run(argv)
