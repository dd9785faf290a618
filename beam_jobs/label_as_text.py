"""label-as-text: a classification dataset -> image-text records whose captions come from prompts.

Each image of class ``c`` gets captions ``template.format(class_name[c])``: training-split records
use the *training* templates, validation and test records the *eval* templates, and the two sets
are disjoint, so zero-shot evaluation with the eval templates never sees a prompt used in
training. Records keep ``label`` and ``label/name``; the folder also gets ``classnames.txt``,
``templates_train.txt`` and ``templates_eval.txt`` (one per line, ``{}`` marks the class name).

Sources (each a PTransform yielding (candidates, dead letters)):
  digits     scikit-learn's 1797 real 8x8 handwritten digits (bundled; no download), stored
             losslessly as 8x8 RGB PNGs (grey value v in 0..16 -> round(v * 255 / 16)).
  tfds       any TFDS-style folder (``tfds.builder_from_directory``) with an image and a
             ClassLabel feature; the source's splits are kept (train / validation / test).
  manifest   JSONL lines ``{"image": PATH, "label": INT_OR_NAME}`` plus ``--classnames FILE``.

``--label_dp_epsilon`` releases the training labels under eps-label differential privacy
(randomized response, with a per-example prior if given; see label_dp.py).

    python -m keras_mm.beam_jobs.label_as_text --source digits --out /tmp/digits
    kmm data label-as-text --source digits --out /tmp/digits --runner=DataflowRunner ...
"""

from __future__ import annotations

import io
import json
import logging
import time
from importlib import resources
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from keras_mm.beam_jobs import dataset_writer, job_flags
from keras_mm.beam_jobs import records as rec
from keras_mm.pipelines import features

SOURCES = ("digits", "tfds", "manifest")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Built-in template sets (files in beam_jobs/templates/); a path to any text file works too.
TEMPLATE_SETS = ("digits_train", "digits_eval", "generic_train", "generic_eval", "clip_imagenet_80")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_TRAIN_FILE = "templates_train.txt"
TEMPLATES_EVAL_FILE = "templates_eval.txt"
LABEL_DP_FILE = "label_dp.json"


def load_templates(name_or_path: str) -> List[str]:
    """A built-in template set by name, or a text file with one template per line."""
    if name_or_path in TEMPLATE_SETS:
        text = (resources.files("keras_mm.beam_jobs") / "templates" /
                f"{name_or_path}.txt").read_text(encoding="utf-8")
    else:
        if not FileSystems.exists(name_or_path):
            raise job_flags.FlagError(
                f"templates {name_or_path!r}: not a built-in set {TEMPLATE_SETS} nor a file")
        with FileSystems.open(name_or_path) as f:
            text = f.read().decode("utf-8")
    templates = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise job_flags.FlagError(
            f"templates {name_or_path!r}: every line needs exactly one '{{}}' (bad: {bad[:3]})")
    return templates


def disjoint_templates(train: Sequence[str], eval_: Sequence[str]) -> List[str]:
    """Training templates minus the eval ones (eval prompts must never be trained on)."""
    eval_set = set(eval_)
    kept = [t for t in train if t not in eval_set]
    dropped = len(train) - len(kept)
    if dropped:
        logging.warning("dropped %d training templates that are also eval templates", dropped)
    if not kept:
        raise job_flags.FlagError("no training template left after removing the eval templates")
    return kept


MAX_CAPTIONS = rec.ImageOptions().max_captions


def captions_for(label_name: str, split: str, train_templates: Sequence[str],
                 eval_templates: Sequence[str], example_id: str = "",
                 limit: int = MAX_CAPTIONS) -> Tuple[str, ...]:
    """The split's templates filled with the class name; with more templates than ``limit``, a
    window of ``limit`` consecutive templates starting at a position hashed from the id, so every
    template is used across the dataset and each record is reproducible."""
    templates = list(train_templates if split == "train" else eval_templates)
    if len(templates) > limit:
        start = int(dataset_writer._unit_hash(example_id, "templates:") * len(templates))
        templates = [templates[(start + i) % len(templates)] for i in range(limit)]
    return tuple(t.format(label_name) for t in templates)


def digits_png(pixels) -> bytes:
    """One sklearn digit (8x8 floats in 0..16) -> lossless 8x8 RGB PNG bytes."""
    import numpy as np
    from PIL import Image

    grey = np.round(np.asarray(pixels, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


class _DigitsCandidates(beam.DoFn):
    """index range -> candidates of sklearn's digits (loaded once per worker)."""

    def __init__(self, fractions, train_templates, eval_templates):
        self._fractions = tuple(fractions)
        self._train = list(train_templates)
        self._eval = list(eval_templates)

    def setup(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        self._images, self._labels = digits.images, digits.target

    def process(self, bounds):
        start, stop = bounds
        for i in range(start, stop):
            label = int(self._labels[i])
            cid = f"digits-{i:04d}"
            split = dataset_writer.assign_split(cid, self._fractions)
            yield rec.Candidate(
                id=cid, source=f"sklearn.datasets.load_digits()[{i}]",
                captions=captions_for(DIGIT_NAMES[label], split, self._train, self._eval, cid),
                image_bytes=digits_png(self._images[i]), label=label,
                label_name=DIGIT_NAMES[label], split=split)


class ReadDigits(beam.PTransform):
    """scikit-learn's handwritten digits -> (candidates, no dead letters)."""

    NUM_IMAGES = 1797

    def __init__(self, fractions, train_templates, eval_templates, limit: int = 0,
                 chunk: int = 100):
        super().__init__()
        self._fn = _DigitsCandidates(fractions, train_templates, eval_templates)
        self._n = min(limit, self.NUM_IMAGES) if limit else self.NUM_IMAGES
        self._chunk = chunk

    def expand(self, pbegin):
        bounds = [(s, min(s + self._chunk, self._n)) for s in range(0, self._n, self._chunk)]
        candidates = (pbegin | "DigitChunks" >> beam.Create(bounds)
                      | "SpreadChunks" >> beam.Reshuffle()
                      | "DigitCandidates" >> beam.ParDo(self._fn))
        dead = pbegin | "NoSourceDeadLetters" >> beam.Create([])
        return candidates, dead


_TFDS_SPLITS = {"train": "train", "validation": "validation", "val": "validation",
                "test": "test"}


class _TfdsCandidates(beam.DoFn):
    """(split name) -> candidates from a TFDS folder, images kept encoded (SkipDecoding)."""

    def __init__(self, folder, image_key, label_key, class_names, train_templates,
                 eval_templates, fractions):
        self._folder, self._image_key, self._label_key = folder, image_key, label_key
        self._names = list(class_names)
        self._train, self._eval = list(train_templates), list(eval_templates)
        self._fractions = tuple(fractions)

    def process(self, source_split):
        import tensorflow_datasets as tfds

        builder = tfds.builder_from_directory(self._folder)
        path = image_feature_path(builder, self._image_key)
        decoders = tfds.decode.SkipDecoding()
        for part in reversed(path):
            decoders = {part: decoders}
        ds = builder.as_dataset(split=source_split, shuffle_files=False, decoders=decoders)
        for i, ex in enumerate(ds.as_numpy_iterator()):
            cid = f"{source_split}-{i:08d}"
            label = int(ex[self._label_key])
            image = ex
            for part in path:
                image = image[part]
            split = _TFDS_SPLITS.get(source_split) or dataset_writer.assign_split(
                cid, self._fractions)
            if not 0 <= label < len(self._names):
                yield rec.dead_letter(cid, self._folder, rec.BAD_LABEL, f"label {label}")
                continue
            name = self._names[label]
            yield rec.Candidate(
                id=cid, source=f"{self._folder}:{source_split}[{i}]",
                captions=captions_for(name, split, self._train, self._eval, cid),
                image_bytes=bytes(image), label=label, label_name=name,
                split=split)


def image_feature_path(builder, image_key: str) -> List[str]:
    """Path to a tfds Image feature: "image", or ["image", "encoded"] in keras-mm folders."""
    import tensorflow_datasets as tfds

    path = image_key.split("/")
    feature = builder.info.features
    for part in path:
        feature = feature[part]
    if isinstance(feature, tfds.features.FeaturesDict) and "encoded" in feature:
        path.append("encoded")
        feature = feature["encoded"]
    if not isinstance(feature, tfds.features.Image):
        raise ValueError(f"tfds feature {'/'.join(path)!r} is not an Image")
    return path


def tfds_class_names(folder: str, label_key: str) -> Tuple[List[str], List[str]]:
    """(class names, split names) of a TFDS folder's ClassLabel feature."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder_from_directory(folder)
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds for a bad folder
        raise job_flags.FlagError(f"{folder!r} is not a TFDS dataset folder: {e}") from e
    feature = builder.info.features[label_key] if label_key in builder.info.features else None
    names = getattr(feature, "names", None)
    if not names:
        raise job_flags.FlagError(f"{folder!r}: feature {label_key!r} is not a ClassLabel")
    return list(names), list(builder.info.splits)


class ReadTfdsFolder(beam.PTransform):
    def __init__(self, folder, image_key, label_key, class_names, splits, train_templates,
                 eval_templates, fractions):
        super().__init__()
        self._splits = list(splits)
        self._fn = _TfdsCandidates(folder, image_key, label_key, class_names, train_templates,
                                   eval_templates, fractions)

    def expand(self, pbegin):
        out = (pbegin | "SourceSplits" >> beam.Create(self._splits)
               | "TfdsCandidates" >> beam.ParDo(self._fn).with_outputs(
                   rec.DEAD_LETTERS, main="candidates"))
        candidates = out.candidates | "SpreadCandidates" >> beam.Reshuffle()
        return candidates, out[rec.DEAD_LETTERS]


class _ManifestCandidates(beam.DoFn):
    """JSON line -> candidate, or a dead letter for a bad line or label."""

    def __init__(self, manifest, class_names, train_templates, eval_templates, fractions):
        self._manifest = manifest
        self._base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
        self._names = list(class_names)
        self._index = {n: i for i, n in enumerate(self._names)}
        self._train, self._eval = list(train_templates), list(eval_templates)
        self._fractions = tuple(fractions)

    def process(self, line):
        where = f"{self._manifest}: {line[:120]}"
        try:
            obj = json.loads(line)
            image, label = obj["image"], obj["label"]
            if not isinstance(image, str) or isinstance(label, bool) or not isinstance(
                    label, (int, str)):
                raise TypeError("'image' must be a string and 'label' an int or a class name")
        except (ValueError, KeyError, TypeError) as e:
            yield rec.dead_letter(where, where, rec.BAD_SOURCE_LINE,
                                  f"{type(e).__name__}: {e}; line {line[:200]!r}")
            return
        index = self._index.get(label) if isinstance(label, str) else label
        if index is None or not 0 <= index < len(self._names):
            yield rec.dead_letter(where, where, rec.BAD_LABEL, f"label {label!r}")
            return
        uri = image if ("://" in image or image.startswith("/")) else FileSystems.join(
            self._base, image)
        cid = str(obj.get("id") or image)
        split = _TFDS_SPLITS.get(obj.get("split", "")) or dataset_writer.assign_split(
            cid, self._fractions)
        name = self._names[index]
        yield rec.Candidate(id=cid, source=where, image_uri=uri, label=index, label_name=name,
                            captions=captions_for(name, split, self._train, self._eval, cid),
                            split=split)


class ReadLabelManifest(beam.PTransform):
    def __init__(self, manifest, class_names, train_templates, eval_templates, fractions):
        super().__init__()
        self._manifest = manifest
        self._fn = _ManifestCandidates(manifest, class_names, train_templates, eval_templates,
                                       fractions)

    def expand(self, pbegin):
        lines = pbegin | "ReadManifest" >> beam.io.ReadFromText(self._manifest)
        out = (lines | "SkipBlank" >> beam.Filter(lambda s: s.strip())
               | "ManifestCandidates" >> beam.ParDo(self._fn).with_outputs(
                   rec.DEAD_LETTERS, main="candidates"))
        return out.candidates, out[rec.DEAD_LETTERS]


class _ApplyLabelDP(beam.DoFn):
    """Training candidates get a label drawn by RR(-with-prior); other splits pass unchanged.

    The true label of a training example is not written anywhere: captions are rebuilt from the
    released label. Priors (optional side input) map an id to a distribution over classes.
    """

    def __init__(self, class_names, train_templates, epsilon: float, seed: int):
        self._names = list(class_names)
        self._train = list(train_templates)
        self._epsilon = float(epsilon)
        self._seed = int(seed)
        self._changed = beam.metrics.Metrics.counter(rec.METRICS_NAMESPACE, "label_dp/changed")

    def process(self, candidate: rec.Candidate, priors=None):
        import dataclasses

        from keras_mm.beam_jobs import label_dp

        if candidate.split != "train" or candidate.label is None or not (
                0 <= candidate.label < len(self._names)):
            yield candidate
            return
        prior = (priors or {}).get(candidate.id)
        label = label_dp.randomize_label(candidate.label, len(self._names), self._epsilon,
                                         candidate.id, self._seed, prior)
        if label != candidate.label:
            self._changed.inc()
        name = self._names[label]
        yield dataclasses.replace(candidate, label=label, label_name=name,
                                  captions=captions_for(name, "train", self._train, (), candidate.id))


def _parse_prior(line: str):
    obj = json.loads(line)
    return str(obj["id"]), [float(v) for v in obj["prior"]]


class LabelDP(beam.PTransform):
    """(candidates, dead letters) -> the same with eps-LabelDP training labels."""

    def __init__(self, class_names, train_templates, epsilon, seed, prior_file=None):
        super().__init__()
        self._fn = _ApplyLabelDP(class_names, train_templates, epsilon, seed)
        self._prior_file = prior_file

    def expand(self, pcolls):
        candidates, dead = pcolls
        if self._prior_file:
            priors = (candidates.pipeline | "ReadPriors" >> beam.io.ReadFromText(self._prior_file)
                      | "ParsePriors" >> beam.Map(_parse_prior))
            out = candidates | "RandomizeLabels" >> beam.ParDo(
                self._fn, priors=beam.pvalue.AsDict(priors))
        else:
            out = candidates | "RandomizeLabels" >> beam.ParDo(self._fn)
        return out, dead


def read_lines(path: str) -> List[str]:
    if not FileSystems.exists(path):
        raise job_flags.FlagError(f"file not found: {path}")
    with FileSystems.open(path) as f:
        return [s.strip() for s in f.read().decode("utf-8").splitlines() if s.strip()]


def build_parser():
    parser = job_flags.job_parser(
        "kmm data label-as-text",
        "Turn a classification dataset into image-text records with prompt-template captions.")
    group = parser.add_argument_group("source")
    group.add_argument("--source", choices=SOURCES, default="digits")
    group.add_argument("--input", help="TFDS folder (tfds) or JSONL manifest (manifest)")
    group.add_argument("--classnames", help="class names file, one per line (manifest; "
                                            "optional for tfds, overrides its label names)")
    group.add_argument("--image_key", default="image", help="tfds image feature")
    group.add_argument("--label_key", default="label", help="tfds ClassLabel feature")
    group.add_argument("--templates_train", default=None,
                       help=f"training templates: a built-in set {TEMPLATE_SETS} or a file "
                            "(default: digits_train for digits, else generic_train)")
    group.add_argument("--templates_eval", default=None,
                       help="eval templates (default: digits_eval for digits, else "
                            "generic_eval; clip_imagenet_80 = CLIP's 80 ImageNet prompts)")
    group.add_argument("--limit", type=int, default=0, help="digits: use only the first N")
    group = parser.add_argument_group("label differential privacy (training split only)")
    group.add_argument("--label_dp_epsilon", type=float, default=0.0,
                       help="if > 0, release training labels with eps-LabelDP randomized "
                            "response (RR-with-prior when --label_dp_prior is given)")
    group.add_argument("--label_dp_prior", default=None,
                       help="JSONL of {\"id\": ..., \"prior\": [p_0, ..., p_K-1]} per example; "
                            "ids without a line use a uniform prior")
    group.add_argument("--label_dp_seed", type=int, default=0)
    parser.set_defaults(records_per_shard=1000)
    return parser


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the job; returns a summary (stats.json plus timing)."""
    parser = build_parser()
    args, options = job_flags.parse_job_args(parser, argv)
    fractions = job_flags.split_fractions(args)
    image_options = job_flags.image_options(args)
    default_set = "digits" if args.source == "digits" else "generic"
    eval_templates = load_templates(args.templates_eval or f"{default_set}_eval")
    train_templates = disjoint_templates(
        load_templates(args.templates_train or f"{default_set}_train"), eval_templates)

    if args.source == "digits":
        class_names = list(DIGIT_NAMES)
        source = ReadDigits(fractions, train_templates, eval_templates, limit=args.limit)
    elif not args.input:
        raise job_flags.FlagError(f"--source {args.source} needs --input")
    elif args.source == "tfds":
        class_names, splits = tfds_class_names(args.input, args.label_key)
        if args.classnames:
            class_names = read_lines(args.classnames)
        source = ReadTfdsFolder(args.input, args.image_key, args.label_key, class_names, splits,
                                train_templates, eval_templates, fractions)
    else:
        if not FileSystems.exists(args.input):
            raise job_flags.FlagError(f"manifest not found: {args.input}")
        if not args.classnames:
            raise job_flags.FlagError("--source manifest needs --classnames FILE")
        class_names = read_lines(args.classnames)
        source = ReadLabelManifest(args.input, class_names, train_templates, eval_templates,
                                   fractions)

    if args.label_dp_epsilon < 0:
        raise job_flags.FlagError("--label_dp_epsilon must be >= 0 (0 = off)")
    if args.label_dp_prior and not FileSystems.exists(args.label_dp_prior):
        raise job_flags.FlagError(f"--label_dp_prior not found: {args.label_dp_prior}")
    extra_files = {
        CLASSNAMES_FILE: "\n".join(class_names) + "\n",
        TEMPLATES_TRAIN_FILE: "\n".join(train_templates) + "\n",
        TEMPLATES_EVAL_FILE: "\n".join(eval_templates) + "\n",
    }
    if args.label_dp_epsilon > 0:
        extra_files[LABEL_DP_FILE] = json.dumps({
            "epsilon": args.label_dp_epsilon, "seed": args.label_dp_seed, "splits": ["train"],
            "mechanism": "rr_with_prior" if args.label_dp_prior else "randomized_response"})
    train_captions = None
    if args.vocab_size > 0:
        from keras_mm.beam_jobs.tokenizer import TrainTokenizer

        train_captions = TrainTokenizer(
            args.out, args.vocab_size,
            model_type=args.tokenizer_model_type or "bpe")

    def build(pipeline):
        pcolls = pipeline | "Source" >> source
        if args.label_dp_epsilon > 0:
            pcolls = pcolls | "LabelDP" >> LabelDP(class_names, train_templates,
                                                   args.label_dp_epsilon, args.label_dp_seed,
                                                   args.label_dp_prior)
        _ = pcolls | "BuildDataset" >> dataset_writer.BuildDataset(
            args.out, features.LABEL_AS_TEXT, class_names=class_names,
            split_fractions=fractions, records_per_shard=args.records_per_shard,
            image_options=image_options, extra_files=extra_files,
            train_captions=train_captions,
            description=f"label-as-text from {args.source} ({len(class_names)} classes)")

    start = time.time()
    job_flags.run_pipeline(build, options, name=f"label-as-text ({args.source} -> {args.out})")
    seconds = time.time() - start
    stats = dataset_writer.read_stats(args.out)
    return {"job": "label-as-text", "source": args.source, "out": args.out,
            "seconds": round(seconds, 3),
            "records_per_second": round(stats["inputs"] / max(seconds, 1e-9), 2), **stats}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
