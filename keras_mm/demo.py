"""``kmm demo``: a whole path on bundled data, offline, on a laptop CPU.

Contrastive models (``--model two_tower|limoe|clippo``), on the digits:

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

Captioners (``--model coca|cappa|mammut|pali``, recipes ``<model>_scenes``), on the digit
scenes:

1. digit-scenes Beam job: scenes of 1-3 real digits with grammar captions (+ questions for the
   PaLI-style model) split by source digit, and a SentencePiece tokenizer,
2. training of the tiny captioner,
3. captions of the test scenes scored with CIDEr / BLEU-4 / METEOR / ROUGE-L (+ retrieval for
   CoCa and MaMMUT, VQA accuracy for the PaLI-style model),
4. export with the ``caption`` signature (decoding inside the graph),
5. a fresh tensorflow + tensorflow_text process captions the test scenes and the bundled real
   photos with the export; the captions must equal the Keras model's.

Video (``--model video``, recipes ``tubevit_from_frames_moving_digits`` and the baseline
``frame_average_moving_digits``), on moving digits:

1. moving-digits Beam job: clips of 1-2 real digits moving in one of four directions, captions
   naming digits and motion, transcripts, split by source digit, and a SentencePiece tokenizer,
2. training of the frame-averaging baseline (the image ViT on every frame, averaged: it sees
   every frame but not their order), then of the TubeViT video-text two-tower model started
   from it (image-to-video: the ViT's blocks, head and text tower load as they are, its patch
   embedding is inflated into every tube; ``--recipe tubevit_moving_digits`` trains TubeViT
   from scratch instead),
3. text -> video retrieval on a 256-clip test gallery and the motion probe (a linear classifier
   of the motion direction on frozen clip embeddings), for both,
4. export with the ``embed_video`` / ``embed_text`` signatures,
5. a fresh tensorflow + tensorflow_text process embeds the test clips (JPEG frames) and their
   captions with the export; its text -> video R@1 and embeddings must match the Keras model's.

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

from keras_mm.beam_jobs.job_flags import ArgParser, FlagError

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


# Runs in a fresh process: captions PNG files with the export's `caption` signature.
CAPTION_EXPORT = r"""
import json, sys
import tensorflow as tf
import tensorflow_text  # noqa: F401  registers the SentencePiece ops
export_dir, listing = sys.argv[1], sys.argv[2]
caption = tf.saved_model.load(export_dir).signatures["caption"]
paths = [line.strip() for line in open(listing) if line.strip()]
out = {}
for start in range(0, len(paths), 64):
    chunk = paths[start:start + 64]
    images = tf.constant([tf.io.read_file(p).numpy() for p in chunk])
    texts = caption(image_bytes=images)["caption"].numpy()
    out.update({p: t.decode("utf-8") for p, t in zip(chunk, texts)})
print(json.dumps({"captions": out, "keras_mm_imported": "keras_mm" in sys.modules}))
"""

# Runs in a fresh process: embeds clips and captions with the export's video signatures.
EMBED_VIDEO_EXPORT = r"""
import json, sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  registers the SentencePiece ops
export_dir, dataset_dir, count, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
loaded = tf.saved_model.load(export_dir)
embed_video, embed_text = loaded.signatures["embed_video"], loaded.signatures["embed_text"]
files = sorted(tf.io.gfile.glob(dataset_dir + "/test.tfrecord-*"))
spec = {"video/frames": tf.io.RaggedFeature(tf.string), "texts": tf.io.RaggedFeature(tf.string),
        "id": tf.io.FixedLenFeature([], tf.string)}
records = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(files)]
records = sorted(records, key=lambda r: r["id"].numpy())[:count]
videos, texts, ids = [], [], []
for start in range(0, len(records), 32):
    chunk = records[start:start + 32]
    frames = tf.stack([r["video/frames"] for r in chunk])            # [n, T] JPEG bytes
    videos.append(embed_video(frames=frames)["embedding"].numpy())
    captions = tf.constant([r["texts"][0].numpy() for r in chunk])
    texts.append(embed_text(text=captions)["embedding"].numpy())
    ids += [r["id"].numpy().decode() for r in chunk]
np.savez(out_path, video=np.concatenate(videos), text=np.concatenate(texts), ids=np.array(ids))
print(json.dumps({"clips": len(ids), "keras_mm_imported": "keras_mm" in sys.modules}))
"""

DEMO_RECIPES = {"two_tower": "siglip_digits", "limoe": "limoe_digits",
                "clippo": "clippo_digits", "coca": "coca_scenes", "cappa": "cappa_scenes",
                "mammut": "mammut_scenes", "pali": "pali_scenes",
                "video": "tubevit_from_frames_moving_digits"}
VIDEO_BASELINE_RECIPE = "frame_average_moving_digits"
CAPTIONERS = ("coca", "cappa", "mammut", "pali")
NUM_EXPORT_CHECK_SCENES = 64


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
    parser.add_argument("--scenes", default=None, metavar="TRAIN,VALIDATION,TEST",
                        help="captioners: digit scenes per split (default: the job's "
                             "60000,500,500)")
    parser.add_argument("--clips", default=None, metavar="TRAIN,VALIDATION,TEST",
                        help="video: moving-digits clips per split (default: the job's)")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="tokenizer vocabulary (default: 400 for the digits, the "
                             "digit-scenes job's default for the scenes)")
    return parser


def _count_flags(name: str, value: Optional[str]) -> list:
    """``--scenes`` / ``--clips`` TRAIN,VALIDATION,TEST -> the data job's ``--num_<split>``."""
    if not value:
        return []
    counts = value.split(",")
    if len(counts) != 3 or not all(c.strip().isdigit() for c in counts):
        raise FlagError(f"{name} takes three counts TRAIN,VALIDATION,TEST, got {value!r}")
    flags = []
    for split, count in zip(("train", "validation", "test"), counts):
        flags += [f"--num_{split}", count.strip()]
    return flags


def _generated_data(job_run, source: str, data_dir: str, count_flags: list,
                    vocab_size: Optional[int]) -> Dict:
    """Runs a data job on a generated source into ``data_dir``, unless an earlier run finished
    there (its tokenizer exists); the job's summary, or ``{"written": "reused"}``."""
    if os.path.exists(os.path.join(data_dir, "tokenizer.model")):
        return {"written": "reused"}
    flags = ["--source", source, "--out", data_dir] + list(count_flags)
    if vocab_size:
        flags += ["--vocab_size", str(vocab_size)]
    return job_run(flags)


def _stage(number: int, text: str) -> None:
    print(f"[{number}/5] {text}", flush=True)


def _export_stage(out: str, cfg, model, templates, **kwargs):
    """Stage 4: exports ``model`` to ``<out>/saved_models/<export name>/1`` (an older export
    there is replaced). Returns ``(export_dir, tokenizer)``."""
    import shutil

    from keras_mm.training import trainer
    from keras_mm.training.commands import export_model

    export_dir = os.path.join(out, "saved_models", cfg.export.name or cfg.name, "1")
    _stage(4, f"export -> {export_dir}")
    if os.path.exists(export_dir):
        shutil.rmtree(export_dir)
    tokenizer = trainer.load_tokenizer(cfg)
    export_model(model, tokenizer, cfg.data.input, templates, export_dir, **kwargs)
    return export_dir, tokenizer


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    from keras_mm.beam_jobs import label_as_text
    from keras_mm.evaluation.zero_shot import load_class_names, load_eval_templates
    from keras_mm.recipes import config as config_lib
    from keras_mm.training import trainer

    args = build_parser().parse_args(list(argv) if argv is not None else None)
    args.recipe = args.recipe or DEMO_RECIPES[args.model]
    if args.model in CAPTIONERS:
        return run_captioner(args)
    if args.model == "video":
        return run_video(args)
    start = time.time()
    out = os.path.abspath(args.out)
    data_dir = os.path.join(out, "digits")
    run_dir = os.path.join(out, "run")

    _stage(1, f"label-as-text Beam job on the digits -> {data_dir}")
    if os.path.exists(os.path.join(data_dir, "tokenizer.model")):
        data = {"written": "reused"}
    else:
        data = label_as_text.run(["--source", "digits", "--out", data_dir,
                                  "--vocab_size", str(args.vocab_size or 400)])

    _stage(2, f"training recipe {args.recipe} -> {run_dir} (resumes if interrupted)")
    cfg = config_lib.override(config_lib.get_recipe(args.recipe),
                              [f"data.folder={data_dir}", f"train.out_dir={run_dir}"]
                              + list(args.overrides))
    summary, model = trainer.train(cfg)

    _stage(3, "zero-shot evaluation with the eval templates on the test digits: "
              f"top-1 {summary['metrics'].get('zero_shot_top1', float('nan')):.3f}")

    export_dir, _ = _export_stage(out, cfg, model, load_eval_templates(data_dir),
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


def _write_pngs(folder: str, items) -> list:
    """``(name, uint8 [H, W, 3])`` items -> PNG files in ``folder``; their paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, image in items:
        path = os.path.join(folder, f"{name}.png")
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def _keras_captions(model, cfg, tokenizer, paths) -> Dict[str, str]:
    """The Keras model's captions of PNG files, preprocessed as the export does."""
    import numpy as np
    import tensorflow as tf

    from keras_mm.evaluation.caption_eval import generate_function
    from keras_mm.pipelines.datasets import eval_image_ops

    c = cfg.model.captioner
    prompt = cfg.data.input.caption_prompt if cfg.model.kind == "pali" else None
    generate = generate_function(model, method=c.decode, beam_size=c.beam_size,
                                 length_penalty=c.length_penalty, max_length=c.max_decode_len,
                                 with_prompt=prompt is not None)
    preprocess = eval_image_ops(cfg.data.input)
    out = {}
    for start in range(0, len(paths), 64):
        chunk = paths[start:start + 64]
        images = np.stack([preprocess({"image/encoded": tf.io.read_file(p)})["image"].numpy()
                           for p in chunk])
        prompt_ids = None
        if prompt is not None:
            prompt_ids = tokenizer.tokenize([prompt] * len(chunk),
                                            cfg.data.input.max_prompt_len, add_bos=False,
                                            add_eos=True).numpy()
        texts = tokenizer.detokenize(generate(images, prompt_ids)).numpy()
        out.update({p: t.decode("utf-8") for p, t in zip(chunk, texts)})
    return out


def run_captioner(args) -> Dict:
    """The captioner demo (module docstring): digit scenes -> train -> caption metrics ->
    export -> captions from the export in a fresh process."""
    from keras_mm.beam_jobs import digit_scenes, image_text, sample_photos
    from keras_mm.recipes import config as config_lib
    from keras_mm.training import trainer

    start = time.time()
    out = os.path.abspath(args.out)
    data_dir = os.path.join(out, "digit_scenes")
    run_dir = os.path.join(out, "run")

    _stage(1, f"digit-scenes Beam job -> {data_dir}")
    data = _generated_data(image_text.run, "digit-scenes", data_dir,
                           _count_flags("--scenes", args.scenes), args.vocab_size)

    _stage(2, f"training recipe {args.recipe} -> {run_dir} (resumes if interrupted)")
    cfg = config_lib.override(config_lib.get_recipe(args.recipe),
                              [f"data.folder={data_dir}", f"train.out_dir={run_dir}"]
                              + list(args.overrides))
    summary, model = trainer.train(cfg)
    metrics = summary["metrics"]
    _stage(3, "captions of the test scenes: " + ", ".join(
        f"{k} {metrics[k]:.3f}" for k in ("cider", "bleu4", "meteor", "rouge_l",
                                          "retrieval_i2t_r1", "vqa_accuracy") if k in metrics))

    export_dir, tokenizer = _export_stage(out, cfg, model, ["{}"],
                                          captioner=cfg.model.captioner)

    _stage(5, "captioning test scenes and real photos with the export in a fresh process "
              "(tensorflow + tensorflow_text only)")
    scenes = [digit_scenes.generate_scene("test", i) for i in range(NUM_EXPORT_CHECK_SCENES)]
    paths = _write_pngs(os.path.join(out, "export_check", "scenes"),
                        [(s.id, s.image) for s in scenes])
    photos = sample_photos.sample_photos()
    paths += _write_pngs(os.path.join(out, "export_check", "photos"),
                         [(n, image) for n, image, _ in photos])
    listing = os.path.join(out, "export_check", "files.txt")
    with open(listing, "w") as f:
        f.write("\n".join(paths) + "\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", CAPTION_EXPORT, export_dir, listing],
                            capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"the export failed in a fresh process: {result.stderr[-2000:]}")
    check = json.loads(result.stdout.strip().splitlines()[-1])
    exported = check["captions"]
    expected = _keras_captions(model, cfg, tokenizer, paths)
    same = sum(exported[p] == expected[p] for p in paths)
    photo_captions = {os.path.basename(p)[:-4]: exported[p] for p in paths
                      if "/photos/" in p}

    final = trainer.write_summary(cfg, train_seconds=summary["train_seconds"], metrics={},
                                  export_dir=export_dir)
    final["export_check"] = {"images": len(paths), "same_as_keras": same,
                             "keras_mm_imported": check["keras_mm_imported"],
                             "photo_captions": photo_captions}
    final["demo_seconds"] = round(time.time() - start, 1)
    final["records_written"] = data.get("written")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(final, f, indent=2, sort_keys=True)
    print(json.dumps({"export_captions_equal_keras": f"{same}/{len(paths)}",
                      "photo_captions": photo_captions}, indent=2))
    return final


def run_video(args) -> Dict:
    """The video demo (module docstring): moving digits -> frame-average baseline and TubeViT
    training -> retrieval and motion probe -> export -> embeddings from the export in a fresh
    process."""
    import numpy as np

    from keras_mm.beam_jobs import video_tubes
    from keras_mm.pipelines import datasets
    from keras_mm.recipes import config as config_lib
    from keras_mm.training import trainer

    start = time.time()
    out = os.path.abspath(args.out)
    data_dir = os.path.join(out, "moving_digits")
    base_dir, run_dir = os.path.join(out, "run_frame_average"), os.path.join(out, "run")

    _stage(1, f"moving-digits Beam job -> {data_dir}")
    data = _generated_data(video_tubes.run, "moving-digits", data_dir,
                           _count_flags("--clips", args.clips), args.vocab_size)

    _stage(2, f"training the frame-averaging baseline ({VIDEO_BASELINE_RECIPE} -> {base_dir}), "
              f"then {args.recipe} -> {run_dir} (both resume if interrupted)")
    common = [f"data.folder={data_dir}"] + list(args.overrides)
    base_cfg = config_lib.override(config_lib.get_recipe(VIDEO_BASELINE_RECIPE),
                                   common + [f"train.out_dir={base_dir}"])
    trainer.train(base_cfg)
    cfg = config_lib.override(config_lib.get_recipe(args.recipe),
                              common + [f"train.out_dir={run_dir}",
                                        f"eval.baseline_run={base_dir}"])
    if cfg.model.video.image_position_embedding and not cfg.model.init_checkpoint:
        # image-to-video: TubeViT starts from the frame-average run just trained
        cfg = config_lib.override(cfg, [f"model.init_checkpoint={base_dir}"])
    summary, model = trainer.train(cfg)
    metrics = summary["metrics"]
    _stage(3, "test gallery of 256 clips and motion probe: " + ", ".join(
        f"{k} {metrics[k]:.3f}" for k in (
            "retrieval_t2i_r1", "frame_average_retrieval_t2i_r1", "motion_probe_top1",
            "motion_probe_frame_average_top1") if k in metrics))

    export_dir, tokenizer = _export_stage(out, cfg, model, ["{}"])

    count = int(cfg.eval.gallery_size or 256)
    _stage(5, f"embedding {count} test clips and their captions with the export in a fresh "
              "process (tensorflow + tensorflow_text only)")
    npz = os.path.join(out, "export_check_embeddings.npz")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", EMBED_VIDEO_EXPORT, export_dir, data_dir,
                             str(count), npz], capture_output=True, text=True, env=env,
                            timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"the export failed in a fresh process: {result.stderr[-2000:]}")
    check = json.loads(result.stdout.strip().splitlines()[-1])
    exported = np.load(npz)
    # The Keras model on the same clips (the eval pipeline, canonical captions).
    video_fn, text_fn = trainer.embed_functions(model)
    keras_video, keras_text, keras_ids = [], [], []
    eval_cfg = cfg.data.input
    for batch in datasets.video_eval_dataset(data_dir, "test", eval_cfg, tokenizer=tokenizer):
        keras_video.append(video_fn(batch["video"].numpy()))
        keras_text.append(text_fn(batch["text"].numpy()))
        keras_ids += [i.decode() for i in batch["id"].numpy()]
    order = np.argsort(keras_ids)[:count]
    keras_video = np.concatenate(keras_video)[order]
    keras_text = np.concatenate(keras_text)[order]
    same_ids = [keras_ids[i] for i in order] == [str(i) for i in exported["ids"]]

    def t2v_r1(video, text):
        return float(np.mean(np.argmax(text @ video.T, axis=1) == np.arange(len(text))))

    final = trainer.write_summary(cfg, train_seconds=summary["train_seconds"], metrics={},
                                  export_dir=export_dir)
    final["export_check"] = {
        "clips": check["clips"], "same_clips": bool(same_ids),
        "keras_mm_imported": check["keras_mm_imported"],
        "max_abs_diff_video": float(np.max(np.abs(exported["video"] - keras_video))),
        "max_abs_diff_text": float(np.max(np.abs(exported["text"] - keras_text))),
        "canonical_t2v_r1_export": t2v_r1(exported["video"], exported["text"]),
        "canonical_t2v_r1_keras": t2v_r1(keras_video, keras_text)}
    final["baseline_run"] = base_dir
    final["demo_seconds"] = round(time.time() - start, 1)
    final["records_written"] = data.get("written")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(final, f, indent=2, sort_keys=True)
    return final
