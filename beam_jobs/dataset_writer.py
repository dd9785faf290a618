"""BuildDataset: candidates -> a dataset folder per DESIGN.md's data contract.

    (candidates, source_dead_letters) | BuildDataset(out_dir, kind, ...)

Steps (each a named Beam step): validate + canonicalise every candidate (records.ToRecord),
de-duplicate by image content hash (the smallest id is kept; for image-text, distinct captions
of the duplicates are merged into it), assign a split deterministically from the id, write
sharded TFRecords ``{split}.tfrecord-{i:05d}-of-{n:05d}`` (records sorted by id inside a shard,
so every runner writes identical files), write the dead letters as JSON lines, and finish with
``stats.json``, the tfds metadata (``dataset_info.json``, ``features.json``) and any extra
files (class names, templates). Everything goes through Beam / TF filesystems, so ``gs://``
output works on Dataflow exactly as local output works on the DirectRunner.

Counts always add up: ``inputs = written + dead letters + duplicates`` (checked in tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from keras_mm.beam_jobs import records as rec
from keras_mm.pipelines import features

SPLITS = ("train", "validation", "test")
FILENAME_TEMPLATE = "{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
STATS_FILE = "stats.json"
DEAD_LETTER_FILE = "dead_letters.jsonl"


def shard_path(out_dir: str, split: str, index: int, num_shards: int) -> str:
    """``<out>/{split}.tfrecord-{i:05d}-of-{n:05d}`` (the data contract's shard name)."""
    return FileSystems.join(out_dir, f"{split}.tfrecord-{index:05d}-of-{num_shards:05d}")


def _unit_hash(text: str, salt: str = "") -> float:
    """A stable number in [0, 1) from a string (SHA-256), the same on every worker and run."""
    digest = hashlib.sha256((salt + text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(example_id: str, fractions: Sequence[float]) -> str:
    """Deterministic split of an id: train / validation / test with the given fractions."""
    u = _unit_hash(example_id, "split:")
    edge = 0.0
    for split, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return split
    return SPLITS[len(fractions) - 1]


def num_shards_for(count: int, records_per_shard: int) -> int:
    return max(1, math.ceil(count / max(1, records_per_shard)))


def train_texts(record: Mapping) -> Iterable[str]:
    """The texts of a record a tokenizer learns: its captions, and for video clips also the
    non-empty MV-GPT transcripts."""
    yield from record[features.TEXTS]
    for key in (features.TRANSCRIPT_CURRENT, features.TRANSCRIPT_FUTURE):
        if record.get(key):
            yield record[key]


class _MergeDuplicates(beam.DoFn):
    """(content_hash, [KeyedRecord]) -> the kept record; tagged 'duplicates' for the others."""

    def __init__(self, merge_captions: bool, max_captions: int):
        self._merge = merge_captions
        self._max = max_captions
        self._dups = Metrics.counter(rec.METRICS_NAMESPACE, "duplicates")

    def process(self, element):
        _, group = element
        group = sorted(group, key=lambda r: r.id)
        kept = group[0]
        if len(group) > 1:
            record = dict(kept.record)
            if self._merge:
                texts = list(record[features.TEXTS])
                for other in group[1:]:
                    same_label = other.record.get(features.LABEL) == record.get(features.LABEL)
                    for text in other.record[features.TEXTS]:
                        if same_label and text not in texts:
                            texts.append(text)
                record[features.TEXTS] = texts[: self._max]
            kept = rec.KeyedRecord(kept.id, kept.content_hash, record, kept.split)
            for other in group[1:]:
                self._dups.inc()
                yield beam.pvalue.TaggedOutput("duplicates", (other.id, kept.id))
        yield kept


class _WriteShard(beam.DoFn):
    """((split, index), [(id, serialized)]) -> writes one shard, yields its info."""

    def __init__(self, out_dir: str):
        self._out = out_dir
        self._written = Metrics.counter(rec.METRICS_NAMESPACE, "written")

    def process(self, element, num_shards: Mapping[str, int]):
        import tensorflow as tf

        (split, index), items = element
        items = sorted(items)
        path = shard_path(self._out, split, index, num_shards[split])
        size = 0
        with tf.io.TFRecordWriter(path) as writer:
            for _, serialized in items:
                writer.write(serialized)
                size += len(serialized)
        self._written.inc(len(items))
        logging.info("wrote %s (%d records)", path, len(items))
        yield {"split": split, "index": index, "records": len(items), "bytes": size}


class _Finalize(beam.DoFn):
    """Writes the empty shards nobody wrote, stats.json, tfds metadata and extra files."""

    def __init__(self, out_dir: str, kind: str, class_names, extra_files: Mapping[str, str],
                 description: str):
        self._out = out_dir
        self._kind = kind
        self._class_names = list(class_names) if class_names else None
        self._extra = dict(extra_files)
        self._description = description

    def process(self, _, shard_infos, split_counts, num_shards, dead_by_reason, duplicates,
                inputs):
        import tensorflow as tf
        import tensorflow_datasets as tfds

        by_split: Dict[str, Dict[int, dict]] = {}
        for info in shard_infos:
            by_split.setdefault(info["split"], {})[info["index"]] = info
        split_infos = []
        for split in SPLITS:
            n = num_shards.get(split, 0)
            if not split_counts.get(split):
                continue
            shards = by_split.get(split, {})
            for index in range(n):
                if index not in shards:  # no id hashed into this shard: an empty file keeps n
                    with tf.io.TFRecordWriter(shard_path(self._out, split, index, n)):
                        pass
                    shards[index] = {"records": 0, "bytes": 0}
            split_infos.append(tfds.core.SplitInfo(
                name=split,
                shard_lengths=[shards[i]["records"] for i in range(n)],
                num_bytes=sum(shards[i]["bytes"] for i in range(n)),
                filename_template=tfds.core.ShardedFileTemplate(
                    data_dir=self._out, template=FILENAME_TEMPLATE, split=split,
                    filetype_suffix="tfrecord", dataset_name=self._kind)))
        for name, text in self._extra.items():
            with FileSystems.create(FileSystems.join(self._out, name)) as f:
                f.write(text.encode("utf-8"))
        written = sum(split_counts.values())
        dead_total = sum(dead_by_reason.values())
        stats = {
            "kind": self._kind,
            "inputs": int(inputs),
            "written": int(written),
            "duplicates": int(duplicates),
            "dead_letters": {"total": int(dead_total),
                             "by_reason": {k: int(v) for k, v in sorted(dead_by_reason.items())}},
            "splits": {s: int(split_counts.get(s, 0)) for s in SPLITS},
            "shards": {s: int(num_shards.get(s, 0)) for s in SPLITS},
            "consistent": int(inputs) == written + dead_total + int(duplicates),
        }
        if self._class_names:
            stats["num_classes"] = len(self._class_names)
        with FileSystems.create(FileSystems.join(self._out, STATS_FILE)) as f:
            f.write(json.dumps(stats, indent=2, sort_keys=True).encode("utf-8"))
        if split_infos:
            tfds.folder_dataset.write_metadata(
                data_dir=self._out,
                features=features.tfds_features(self._kind, self._class_names),
                split_infos=split_infos,
                filename_template=FILENAME_TEMPLATE,
                check_data=False,
                description=self._description)
        yield stats


class BuildDataset(beam.PTransform):
    """(candidates, source_dead_letters) -> a dataset folder; outputs the stats dict.

    Args:
      out_dir: dataset folder (local or gs://).
      kind: ``features.IMAGE_TEXT``, ``features.LABEL_AS_TEXT`` or ``features.VIDEO_TUBES``
        (video candidates carry JPEG frames; ``image_options`` then only gives max_captions).
      class_names: label-as-text class names (index = label).
      split_fractions: (train, validation, test) fractions, summing to 1.
      records_per_shard: target records per TFRecord shard.
      image_options: validation / canonicalisation (records.ImageOptions).
      extra_files: {file name: text} written into the folder (class names, templates).
      train_captions: optional callable ``PCollection[str] -> PTransform result``, applied to the
        captions of the train split (the tokenizer step); for video clips also to their
        transcripts (:func:`train_texts`).
    """

    def __init__(self, out_dir: str, kind: str, *, class_names: Optional[Sequence[str]] = None,
                 split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
                 records_per_shard: int = 10_000,
                 image_options: rec.ImageOptions = rec.ImageOptions(),
                 extra_files: Optional[Mapping[str, str]] = None,
                 train_captions=None, description: str = ""):
        super().__init__()
        if len(split_fractions) != 3 or abs(sum(split_fractions) - 1.0) > 1e-6 or min(
                split_fractions) < 0:
            raise ValueError(f"split fractions must be 3 non-negative numbers summing to 1, "
                             f"got {tuple(split_fractions)}")
        self._out = out_dir
        self._kind = kind
        self._class_names = class_names
        self._fractions = tuple(float(f) for f in split_fractions)
        self._per_shard = int(records_per_shard)
        self._image_options = image_options
        self._extra = dict(extra_files or {})
        self._train_captions = train_captions
        self._description = description or f"keras-mm {kind} dataset"

    def expand(self, pcolls: Tuple[beam.PCollection, beam.PCollection]):
        candidates, source_dead = pcolls
        p = candidates.pipeline
        validated = candidates | "Validate" >> beam.ParDo(
            rec.ToRecord(self._kind, self._image_options)).with_outputs(
                rec.DEAD_LETTERS, main="records")
        deduped = (
            validated.records
            | "KeyByContentHash" >> beam.Map(lambda r: (r.content_hash, r))
            | "GroupByContentHash" >> beam.GroupByKey()
            | "MergeDuplicates" >> beam.ParDo(_MergeDuplicates(
                merge_captions=True, max_captions=self._image_options.max_captions)
            ).with_outputs("duplicates", main="records"))
        fractions = self._fractions
        kind = self._kind
        split_records = deduped.records | "AssignSplit" >> beam.Map(
            lambda r: (r.split or assign_split(r.id, fractions), r))
        split_counts = (split_records | "SplitOf" >> beam.Map(lambda kv: kv[0])
                        | "CountPerSplit" >> beam.combiners.Count.PerElement())
        per_shard = self._per_shard
        num_shards = split_counts | "NumShards" >> beam.MapTuple(
            lambda split, count: (split, num_shards_for(count, per_shard)))
        shard_infos = (
            split_records
            | "Serialize" >> beam.Map(
                lambda kv, n: ((kv[0], int(_unit_hash(kv[1].id, "shard:") * n[kv[0]])),
                               (kv[1].id, features.serialize(kv[1].record, kind))),
                n=beam.pvalue.AsDict(num_shards))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(_WriteShard(self._out),
                                          num_shards=beam.pvalue.AsDict(num_shards)))
        if self._train_captions is not None:
            _ = (split_records
                 | "TrainSplitOnly" >> beam.Filter(lambda kv: kv[0] == "train")
                 | "TrainCaptions" >> beam.FlatMap(lambda kv: train_texts(kv[1].record))
                 | "Tokenizer" >> self._train_captions)

        dead = ((source_dead, validated[rec.DEAD_LETTERS]) | "AllDeadLetters" >> beam.Flatten())
        _ = (dead | "DeadLetterJson" >> beam.Map(lambda d: d.to_json())
             | "WriteDeadLetters" >> beam.io.WriteToText(
                 FileSystems.join(self._out, DEAD_LETTER_FILE), shard_name_template="",
                 num_shards=1))
        dead_by_reason = (dead | "ReasonOf" >> beam.Map(lambda d: d.reason)
                          | "CountPerReason" >> beam.combiners.Count.PerElement())
        duplicates = (deduped.duplicates
                      | "CountDuplicates" >> beam.combiners.Count.Globally())
        inputs = ((candidates | "CountCandidates" >> beam.combiners.Count.Globally(),
                   source_dead | "CountSourceDead" >> beam.combiners.Count.Globally())
                  | "Inputs" >> beam.Flatten() | "SumInputs" >> beam.CombineGlobally(sum))
        return (
            p | "FinalizeTrigger" >> beam.Create([None])
            | "Finalize" >> beam.ParDo(
                _Finalize(self._out, self._kind, self._class_names, self._extra,
                          self._description),
                shard_infos=beam.pvalue.AsList(shard_infos),
                split_counts=beam.pvalue.AsDict(split_counts),
                num_shards=beam.pvalue.AsDict(num_shards),
                dead_by_reason=beam.pvalue.AsDict(dead_by_reason),
                duplicates=beam.pvalue.AsSingleton(duplicates),
                inputs=beam.pvalue.AsSingleton(inputs)))


def read_stats(out_dir: str) -> Dict:
    """The stats.json of a dataset folder."""
    with FileSystems.open(FileSystems.join(out_dir, STATS_FILE)) as f:
        return json.loads(f.read().decode("utf-8"))


def read_dead_letters(out_dir: str) -> Iterable[Dict]:
    """The dead letters of a dataset folder, one dict each."""
    path = FileSystems.join(out_dir, DEAD_LETTER_FILE)
    if not FileSystems.exists(path):
        return []
    with FileSystems.open(path) as f:
        return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line]
