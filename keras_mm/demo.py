"""``kmm demo``: the whole contrastive path on the bundled digits, offline, on a laptop CPU.

1. label-as-text Beam job on scikit-learn's real handwritten digits (+ SentencePiece tokenizer),
2. training of the tiny preset: SigLIP two towers (``--model two_tower``, recipe
   ``siglip_digits``) or one LIMoE sparse mixture-of-experts transformer (``--model limoe``,
   ``limoe_digits``; also writes routing figures next to the run) or one CLIPPO ViT for images
   and text rendered as images (``--model clippo``, ``clippo_digits``),
3. zero-shot classification of the test digits with the eval templates (never trained on),
   and image <-> text retrieval,
4. export to a TF Serving SavedModel (``<out>/saved_models/siglip_digits/1``),
5. a fresh Python process that imports only tensorflow and tensorflow_text loads the export and
   classifies the test digits from their encoded PNG bytes.

Writes ``<out>/summary.json`` (DESIGN.md contract) and prints a summary table.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Dict, Optional, Sequence

from keras_mm.beam_jobs.job_flags import ArgParser

LOG = logging.getLogger("keras_mm.demo")

# Runs in a fresh process: tensorflow + tensorflow_text only (what a TF Serving client has).
CHECK_EXPORT = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # noqa: F401  registers the SentencePiece ops
export_dir, dataset_dir = sys.argv[1], sys.argv[2]
loaded = tf.saved_model.load(export_dir)
classify = loaded.signatures["classify"]
names = [l.strip() for l in open(dataset_dir + "/classnames.txt") if l.strip()]
files = sorted(tf.io.gfile.glob(dataset_dir + "/test.tfrecord-*"))
spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64)}
correct = total = 0
for batch in tf.data.TFRecordDataset(files).map(
        lambda r: tf.io.parse_single_example(r, spec)).batch(64):
    scores = classify(image_bytes=batch["image/encoded"], labels=tf.constant(names))["scores"]
    correct += int(tf.reduce_sum(tf.cast(tf.argmax(scores, -1) == batch["label"], tf.int32)))
    total += int(batch["label"].shape[0])
print(json.dumps({"export_top1": correct / total, "examples": total,
                  "keras_mm_imported": "keras_mm" in sys.modules}))
"""


DEMO_RECIPES = {"two_tower": "siglip_digits", "limoe": "limoe_digits",
                "clippo": "clippo_digits"}


def build_parser():
    parser = ArgParser(prog="kmm demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder for everything the demo makes")
    parser.add_argument("--model", default="two_tower", choices=sorted(DEMO_RECIPES),
                        help="model family (its digits recipe: "
                             + ", ".join(f"{k}: {v}" for k, v in sorted(DEMO_RECIPES.items()))
                             + ")")
    parser.add_argument("--recipe", default=None, help="recipe to train (default: the model's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="PATH=VALUE", help="override a recipe field (repeatable)")
    parser.add_argument("--vocab_size", type=int, default=400, help="tokenizer vocabulary")
    return parser


def _stage(number: int, text: str) -> None:
    print(f"[{number}/5] {text}", flush=True)


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    from keras_mm.beam_jobs import label_as_text
    from keras_mm.evaluation.zero_shot import load_class_names, load_eval_templates
    from keras_mm.training.commands import export_model
    from keras_mm.recipes import config as config_lib
    from keras_mm.training import trainer

    args = build_parser().parse_args(list(argv) if argv is not None else None)
    args.recipe = args.recipe or DEMO_RECIPES[args.model]
    start = time.time()
    out = os.path.abspath(args.out)
    data_dir = os.path.join(out, "digits")
    run_dir = os.path.join(out, "run")

    _stage(1, f"label-as-text Beam job on the digits -> {data_dir}")
    if os.path.exists(os.path.join(data_dir, "tokenizer.model")):
        data = {"written": "reused"}
    else:
        data = label_as_text.run(["--source", "digits", "--out", data_dir,
                                  "--vocab_size", str(args.vocab_size)])

    _stage(2, f"training recipe {args.recipe} -> {run_dir} (resumes if interrupted)")
    cfg = config_lib.override(config_lib.get_recipe(args.recipe),
                              [f"data.folder={data_dir}", f"train.out_dir={run_dir}"]
                              + list(args.overrides))
    summary, model = trainer.train(cfg)

    _stage(3, "zero-shot evaluation with the eval templates on the test digits: "
              f"top-1 {summary['metrics'].get('zero_shot_top1', float('nan')):.3f}")

    name = cfg.export.name or cfg.name
    export_dir = os.path.join(out, "saved_models", name, "1")
    _stage(4, f"export -> {export_dir}")
    if os.path.exists(export_dir):
        import shutil

        shutil.rmtree(export_dir)
    export_model(model, trainer.load_tokenizer(cfg), cfg.data.input,
                 load_eval_templates(data_dir), export_dir,
                 class_names=load_class_names(data_dir))

    _stage(5, "classifying the test digits with the export in a fresh process "
              "(tensorflow + tensorflow_text only)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", CHECK_EXPORT, export_dir, data_dir],
                            capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"the export failed in a fresh process: {result.stderr[-2000:]}")
    check = json.loads(result.stdout.strip().splitlines()[-1])

    final = trainer.write_summary(cfg, train_seconds=summary["train_seconds"], metrics={},
                                  export_dir=export_dir)
    # Not a contract metric: the export's own zero-shot top-1, from a fresh TF-only process.
    final["export_check"] = {"zero_shot_top1": check["export_top1"],
                             "examples": check["examples"],
                             "keras_mm_imported": check["keras_mm_imported"]}
    final["demo_seconds"] = round(time.time() - start, 1)
    final["records_written"] = data.get("written")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(final, f, indent=2, sort_keys=True)
    return final
