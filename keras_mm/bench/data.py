"""``kmm bench data``: how fast the data side is on this machine.

Two figures, printed as one JSON object:
  beam     the label-as-text Beam job on scikit-learn's 1797 digits (DirectRunner, end to end:
           pipeline start-up, PNG encoding, validation, dedup, shard writing, metadata), records/s.
  tf.data  the train pipeline at 224x224 (parse, JPEG decode, random resized crop + flip,
           optionally RandAugment, tokenize, batch) over real photos (scikit-learn's bundled
           sample images, cut into distinct JPEG crops of 256..427 px), examples/s.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from keras_mm.beam_jobs import job_flags

CAPTION_WORDS = ("a photo of", "a picture of", "a close-up of", "an image of")
SUBJECTS = ("a chinese temple", "a flower", "red petals", "a pagoda roof", "a garden")


def build_parser() -> argparse.ArgumentParser:
    parser = job_flags.ArgParser(
        prog="kmm bench data", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_batches", type=int, default=30, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches per setting")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--augment", default="crop_flip,randaugment",
                        help="comma-separated augment settings to time")
    parser.add_argument("--num_photos", type=int, default=256,
                        help="distinct photos in the tf.data benchmark dataset")
    parser.add_argument("--skip_beam", action="store_true", help="only time tf.data")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    return parser


def photo_records(num: int, seed: int = 0) -> List[Dict]:
    """``num`` distinct image-text records cut from scikit-learn's bundled sample photos."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from keras_mm.pipelines import features

    photos = load_sample_images().images  # two real 427x640 RGB photos
    rng = np.random.default_rng(seed)
    records = []
    for i in range(num):
        photo = photos[i % len(photos)]
        h = int(rng.integers(256, photo.shape[0] + 1))
        w = int(rng.integers(256, min(photo.shape[1], int(h * 1.5)) + 1))
        y = int(rng.integers(0, photo.shape[0] - h + 1))
        x = int(rng.integers(0, photo.shape[1] - w + 1))
        buf = io.BytesIO()
        Image.fromarray(photo[y:y + h, x:x + w]).save(buf, format="JPEG", quality=90)
        caption = f"{CAPTION_WORDS[i % 4]} {SUBJECTS[(i // 4) % len(SUBJECTS)]}"
        records.append({features.IMAGE_ENCODED: buf.getvalue(), features.IMAGE_HEIGHT: h,
                        features.IMAGE_WIDTH: w, features.TEXTS: [caption, caption + "."],
                        features.ID: f"photo-{i:05d}"})
    return records


def write_photo_dataset(folder: str, num: int, shards: int = 4) -> None:
    import tensorflow as tf

    from keras_mm.pipelines import features, tokenizer

    records = photo_records(num)
    for s in range(shards):
        path = os.path.join(folder, f"train.tfrecord-{s:05d}-of-{shards:05d}")
        with tf.io.TFRecordWriter(path) as writer:
            for r in records[s::shards]:
                writer.write(features.serialize(r, features.IMAGE_TEXT))
    model = tokenizer.train_sentencepiece(
        [t for r in records for t in r[features.TEXTS]], vocab_size=400)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model)


def bench_beam(workdir: str) -> Dict:
    """The whole digits job, and the same job on 10 digits to separate the fixed start-up cost."""
    from keras_mm.beam_jobs import label_as_text

    def timed(limit):
        argv = ["--source", "digits", "--out", os.path.join(workdir, f"digits{limit}_{time.time_ns()}")]
        start = time.perf_counter()
        summary = label_as_text.run(argv + (["--limit", str(limit)] if limit else []))
        return summary, time.perf_counter() - start

    timed(5)  # untimed warm-up: first imports (TensorFlow, Beam runners) happen once per process
    _, startup = timed(10)
    summary, seconds = timed(0)
    steady = max(seconds - startup, 1e-3)
    return {"job": "label-as-text --source digits (DirectRunner)", "records": summary["inputs"],
            "written": summary["written"], "seconds": round(seconds, 3),
            "records_per_second": round(summary["inputs"] / seconds, 1),
            "startup_seconds": round(startup, 3),
            "records_per_second_after_startup": round((summary["inputs"] - 10) / steady, 1)}


def bench_tfdata(folder: str, augment: str, args) -> Dict:
    from keras_mm.pipelines import datasets

    config = datasets.InputConfig(image_size=args.image_size, augment=augment,
                                  batch_size=args.batch_size, max_text_len=16,
                                  shuffle_buffer=256)
    result = datasets.benchmark_dataset(datasets.train_dataset(folder, config),
                                        num_batches=args.num_batches, warmup=args.warmup)
    return {"augment": augment, "image_size": args.image_size, "batch_size": args.batch_size,
            "examples_per_second": round(result["examples_per_second"], 1),
            "step_time_ms": round(1000 * result["seconds"] / result["batches"], 2),
            "batches": result["batches"]}


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    augments = [a.strip() for a in args.augment.split(",") if a.strip()]
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        out: Dict = {"cores": os.cpu_count()}
        if not args.skip_beam:
            out["beam"] = bench_beam(workdir)
        photos = os.path.join(workdir, "photos")
        os.makedirs(photos)
        write_photo_dataset(photos, args.num_photos)
        out["tf_data"] = [bench_tfdata(photos, augment, args) for augment in augments]
    return out
