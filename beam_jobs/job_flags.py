"""Command-line flags every dataset job shares, and Beam pipeline options pass-through.

A job's ``run(argv)`` parses its own flags with :func:`job_parser` + its source flags; every
flag it does not know is handed to Beam's ``PipelineOptions``, so ``--runner=DataflowRunner
--project=... --region=... --temp_location=gs://...`` (or Flink / Spark flags) work unchanged.
A flag neither the job nor any Beam option class knows is an error, not a silent no-op.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# Beam (and records, which imports it) load lazily: the benchmarks share FlagError / ArgParser
# and run where only Keras and JAX are installed (the GPU machine).


class FlagError(ValueError):
    """A bad command-line flag; the CLI prints it as one line."""


class ArgParser(argparse.ArgumentParser):
    """argparse that raises FlagError instead of printing usage and exiting."""

    def error(self, message):  # argparse would print usage and sys.exit(2)
        raise FlagError(f"{self.prog}: {message}")


BEAM_EPILOG = ("Every Apache Beam pipeline option passes through unchanged, e.g. "
               "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp "
               "--setup_file=./setup.py, or --direct_running_mode=multi_processing "
               "--direct_num_workers=2 on the default DirectRunner.")


def beam_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A strict parser (FlagError, no exit) whose help says Beam options pass through."""
    return ArgParser(prog=prog, description=description, allow_abbrev=False,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                     epilog=BEAM_EPILOG)


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the flags shared by all dataset jobs."""
    parser = beam_parser(prog, description)
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, help="dataset folder to write (local or gs://)")
    group.add_argument("--split_fractions", default="0.8,0.1,0.1",
                       help="train,validation,test fractions (deterministic by id)")
    group.add_argument("--records_per_shard", type=int, default=10_000,
                       help="target records per TFRecord shard")
    group.add_argument("--vocab_size", type=int, default=0,
                       help="if > 0, also train a SentencePiece tokenizer of this size on the "
                            "training captions and store tokenizer.model")
    group.add_argument("--tokenizer_model_type", choices=("unigram", "bpe"), default=None,
                       help="SentencePiece model type for --vocab_size (default: bpe for "
                            "label-as-text, whose template captions unigram splits into "
                            "letters; unigram for image-text)")
    group = parser.add_argument_group("image validation")
    from keras_mm.beam_jobs import records as rec

    defaults = rec.ImageOptions()
    group.add_argument("--min_side", type=int, default=defaults.min_side,
                       help="reject images whose short side is smaller")
    group.add_argument("--max_side", type=int, default=defaults.max_side,
                       help="reject images whose long side is larger")
    group.add_argument("--max_aspect", type=float, default=defaults.max_aspect,
                       help="reject images with long/short side above this")
    group.add_argument("--resize_max_side", type=int, default=defaults.resize_max_side,
                       help="if > 0, downscale so the long side is at most this and re-encode")
    group.add_argument("--jpeg_quality", type=int, default=defaults.jpeg_quality)
    group.add_argument("--max_captions", type=int, default=defaults.max_captions,
                       help="keep at most this many captions per image")
    return parser


def image_options(args: argparse.Namespace) -> "rec.ImageOptions":
    if args.min_side < 1 or args.max_side < args.min_side:
        raise FlagError(f"need 1 <= --min_side <= --max_side, got {args.min_side}, {args.max_side}")
    if args.max_captions < 1:
        raise FlagError("--max_captions must be >= 1")
    if not 1 <= args.jpeg_quality <= 100:
        raise FlagError("--jpeg_quality must be in [1, 100]")
    from keras_mm.beam_jobs import records as rec

    return rec.ImageOptions(min_side=args.min_side, max_side=args.max_side,
                            max_aspect=args.max_aspect, resize_max_side=args.resize_max_side,
                            jpeg_quality=args.jpeg_quality, max_captions=args.max_captions)


def split_fractions(args: argparse.Namespace) -> Tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in args.split_fractions.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise FlagError(f"--split_fractions must be three non-negative numbers summing to 1, "
                        f"got {args.split_fractions!r}")
    return values


def parse_job_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]
                   ) -> Tuple[argparse.Namespace, "PipelineOptions"]:
    """Own flags -> Namespace; the rest -> PipelineOptions. Unknown to both -> FlagError."""
    from apache_beam.options.pipeline_options import PipelineOptions  # lazy: benches need no Beam

    args, rest = parser.parse_known_args(list(argv) if argv is not None else None)
    options = PipelineOptions(rest)
    known = options.get_all_options(retain_unknown_options=False)
    everything = options.get_all_options(retain_unknown_options=True)
    unknown = sorted(set(everything) - set(known))
    positional = [a for a in rest if not a.startswith("-")]
    if unknown or (positional and not rest[0].startswith("-")):
        bad = ", ".join(f"--{u}" for u in unknown) or positional[0]
        raise FlagError(f"{parser.prog}: unrecognised argument(s): {bad} (see --help)")
    return args, options


def run_pipeline(build: Callable, options: "PipelineOptions", name: str = "job") -> Dict:
    """Build the pipeline with ``build(pipeline)``, run it to completion, time it.

    ``build`` returns nothing; the caller reads stats.json afterwards (it is written by the
    pipeline itself, so the same works on Dataflow).
    """
    import apache_beam as beam

    runner = options.get_all_options().get("runner") or "DirectRunner"
    logging.getLogger(__name__).info("%s: running on %s ...", name, runner)
    start = time.time()
    with beam.Pipeline(options=options) as pipeline:
        build(pipeline)
    seconds = time.time() - start
    logging.getLogger(__name__).info("%s: finished in %.1f s", name, seconds)
    return {"seconds": seconds}


def run_dataset_job(build: Callable, options: "PipelineOptions", *, job: str, source: str,
                    out: str, name: str = "job") -> Dict:
    """Runs a dataset-writing pipeline (``run_pipeline``) and returns its summary: job, source,
    out, seconds, records/s and the ``stats.json`` counts the pipeline wrote."""
    from keras_mm.beam_jobs import dataset_writer

    seconds = run_pipeline(build, options, name=name)["seconds"]
    stats = dataset_writer.read_stats(out)
    return {"job": job, "source": source, "out": out, "seconds": round(seconds, 3),
            "records_per_second": round(stats["inputs"] / max(seconds, 1e-9), 2), **stats}


def main_for(run: Callable, argv: Optional[Sequence[str]] = None) -> int:
    """A job's ``main``: ``run(argv)``'s summary as JSON, or ``error: ...`` and exit status 2
    for bad flags."""
    import json

    try:
        summary = run(argv)
    except FlagError as e:
        print(f"error: {e}")
        return 2
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def output_flags(args: argparse.Namespace) -> List[str]:
    """Human-readable echo of the main choices, for the job's start-up line."""
    return [f"out={args.out}", f"splits={args.split_fractions}",
            f"records_per_shard={args.records_per_shard}"]
