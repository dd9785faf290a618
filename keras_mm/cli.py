"""``kmm``: the keras-mm command line.

    kmm data image-text --source manifest|coco|tsv|webdataset --input PATH --out DIR [beam flags]
    kmm data label-as-text --source digits|tfds|manifest --out DIR [beam flags]
    kmm data tokenizer --dataset DIR --vocab_size N [beam flags]
    kmm bench data [--out FILE]
    kmm bench decode [--preset tiny|b16] [--kind cappa] [--batch_size N] [--length N]
    kmm bench captioner [--preset tiny|b16] [--kinds coca,cappa,mammut,pali] [--batch_size N]

Every ``kmm data`` job passes flags it does not know to Apache Beam, so
``--runner=DataflowRunner --project=P --region=R --temp_location=gs://...`` runs it on Dataflow.
Bad flags and bad input end with a one-line ``kmm: error: ...`` and exit status 2; set
``KMM_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

# module path -> one-line description; each module has run(argv) -> summary dict.
DATA_JOBS: Dict[str, tuple] = {
    "image-text": ("keras_mm.beam_jobs.image_text",
                   "image-text TFRecords from a manifest, COCO JSON, URL TSV, WebDataset tars, "
                   "or built in: digit-scenes (captions + QA) and sample-photos"),
    "label-as-text": ("keras_mm.beam_jobs.label_as_text",
                      "image-text TFRecords from a classification dataset (default: digits)"),
    "video": ("keras_mm.beam_jobs.video_tubes",
              "video_tubes TFRecords (T-frame JPEG clips, captions, MV-GPT transcripts) from a "
              "video manifest (PyAV), or built in: moving-digits and sample-gif"),
    "tokenizer": ("keras_mm.beam_jobs.tokenizer",
                  "train a SentencePiece tokenizer on a dataset's training captions"),
}
BENCHES: Dict[str, tuple] = {
    "data": ("keras_mm.bench.data",
             "Beam job records/s on the digits and tf.data examples/s at 224x224"),
    "two-tower": ("keras_mm.bench.two_tower",
                  "SigLIP train step examples/s: ours vs keras-hub's SigLIPBackbone"),
    "moe": ("keras_mm.bench.moe",
            "LIMoE train step time at fixed per-token compute as experts grow"),
    "flexivit": ("keras_mm.bench.flexivit",
                 "FlexiViT vs fixed-patch ViTs on the digits: accuracy and speed per patch"),
    "decode": ("keras_mm.bench.decode",
               "cached (KV) vs full re-decoding greedy tokens/s, and that the tokens match"),
    "video": ("keras_mm.bench.video",
              "video input pipeline clips/s and TubeViT / frame-average train step clips/s"),
    "captioner": ("keras_mm.bench.captioner",
                  "CoCa / CapPa / MaMMUT / PaLI train step examples/s, FLOPs and MFU"),
}
# command -> (module:function taking argv and returning a summary dict, help)
COMMANDS: Dict[str, tuple] = {
    "train": ("keras_mm.training.commands:train",
              "train a recipe (resumes after a kill), evaluate, write summary.json"),
    "eval": ("keras_mm.training.commands:evaluate", "evaluate a trained run"),
    "export": ("keras_mm.training.commands:export",
               "export a run as a TF Serving SavedModel (saved_models/<name>/<version>)"),
    "serve": ("keras_mm.training.commands:serve",
              "serve an export over TF Serving's REST API (development and tests)"),
    "demo": ("keras_mm.demo:run",
             "bundled data -> training -> eval -> export -> fresh-process check "
             "(two_tower, limoe, clippo on digits; coca, cappa, mammut, pali on scenes)"),
}


class CliError(Exception):
    """An error to report in one line."""


def _quiet_logs() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("keras_mm").setLevel(logging.INFO)
    for noisy in ("apache_beam", "absl", "tensorflow", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def print_summary(title: str, summary: Dict, out=sys.stdout) -> None:
    """A readable two-column table of a (nested) summary dict."""
    rows = []

    def walk(prefix, value):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            rows.append((prefix, value if not isinstance(value, float) else round(value, 4)))

    walk("", summary)
    width = max((len(k) for k, _ in rows), default=0)
    print(f"\n== {title} ==", file=out)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}", file=out)


def _run_module(target: str, argv: Sequence[str], title: str, as_json: bool) -> Dict:
    module, _, function = target.partition(":")
    run: Callable = getattr(importlib.import_module(module), function or "run")
    summary = run(list(argv))
    if summary is None:  # serve
        return {}
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print_summary(title, summary)
    return summary


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmm", description="keras-mm: multimodal pretraining for TensorFlow / Keras 3.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `kmm COMMAND --help` (e.g. `kmm data label-as-text --help`) for details.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    data = sub.add_parser("data", help="Beam jobs that write TFRecord datasets",
                          description="Beam jobs that write TFRecord datasets.")
    data_sub = data.add_subparsers(dest="job", metavar="JOB")
    for name, (_, text) in DATA_JOBS.items():
        data_sub.add_parser(name, help=text, add_help=False)
    bench = sub.add_parser("bench", help="benchmarks printing JSON",
                           description="Benchmarks; each prints one JSON object.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH")
    for name, (_, text) in BENCHES.items():
        bench_sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_logs()
    parser = _top_parser()
    # Job-level flags belong to the job's own parser (Beam flags pass through there).
    if len(argv) >= 2 and argv[0] == "data" and argv[1] in DATA_JOBS:
        target, title = DATA_JOBS[argv[1]][0], f"kmm data {argv[1]}"
    elif len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        target, title = BENCHES[argv[1]][0], f"kmm bench {argv[1]}"
    elif argv and argv[0] in COMMANDS:
        target, title = COMMANDS[argv[0]][0], f"kmm {argv[0]}"
        argv = [argv[0], ""] + argv[1:]  # the command's own flags start at argv[2]
    else:
        args = parser.parse_args(argv)  # prints help / a usage error and exits
        if args.command is None:
            parser.print_help()
            return 0
        parser.parse_args([args.command, "--help"])
        return 0
    try:
        _run_module(target, argv[2:], title, as_json=argv[0] == "bench")
    except SystemExit as e:  # --help from a job parser
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("kmm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, traceback with KMM_DEBUG
        if os.environ.get("KMM_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"kmm: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
