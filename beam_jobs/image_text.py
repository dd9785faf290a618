"""image-text: image + caption sources -> an image-text dataset folder (DESIGN.md data contract).

Sources, each a PTransform applied to the pipeline that returns two PCollections,
``(candidates, source_dead_letters)``, ready for ``| dataset_writer.BuildDataset(...)``:

  ReadManifest      JSONL lines ``{"image": PATH_OR_URI, "captions": [...]}`` (or ``"caption"``,
                    optional ``"id"``) or a CSV with ``image`` and ``caption`` columns (optional
                    ``id``). Relative paths resolve against the manifest's folder; several lines
                    for one image become one candidate with all their captions; http(s) images
                    are downloaded.
  ReadCocoCaptions  a COCO captions JSON (``images`` + ``annotations``); ids ``coco-<image_id>``.
  ReadUrlTsv        CC3M / CC12M-style TSV lines ``caption<TAB>url`` (or ``url<TAB>caption``),
                    images downloaded with retries, timeouts and a byte cap (download.py).
  ReadWebDataset    WebDataset tar shards (``0001.jpg`` + ``0001.txt`` / ``0001.json``).
  DigitScenes       generated scenes of 1-3 real sklearn digits with true captions and
                    questions / answers, split by source digit (digit_scenes.py; no --input).
  ReadSamplePhotos  14 real photos bundled in scikit-image / scikit-learn with hand-written
                    captions, all in the test split (sample_photos.py; no --input).

A bad line, an orphan annotation, a failed download or a corrupt shard is a dead letter with
its reason, never a failed job; BuildDataset then validates, de-duplicates and writes.

    python -m keras_mm.beam_jobs.image_text --source manifest --input data/captions.jsonl \\
        --out /tmp/image_text
    kmm data image-text --source tsv --input gs://b/cc3m.tsv --out gs://b/cc3m \\
        --runner=DataflowRunner --project=... --region=... --temp_location=gs://b/tmp
    kmm data image-text --source digit-scenes --out /tmp/digit_scenes --num_train 60000
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import posixpath
import re
import tarfile
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from keras_mm.beam_jobs import dataset_writer, digit_scenes, download, job_flags, sample_photos
from keras_mm.beam_jobs import records as rec
from keras_mm.pipelines import features

SOURCES = ("manifest", "coco", "tsv", "webdataset", "digit-scenes", "sample-photos")
BUILT_IN_SOURCES = ("digit-scenes", "sample-photos")   # no --input
# digit-scenes flags: flag -> default (the parser's default is SUPPRESS, so giving one with
# another source is an error instead of a silent no-op).
SCENE_FLAGS = {"num_train": digit_scenes.DEFAULT_COUNTS["train"],
               "num_validation": digit_scenes.DEFAULT_COUNTS["validation"],
               "num_test": digit_scenes.DEFAULT_COUNTS["test"],
               "canvas_size": digit_scenes.DEFAULT_CANVAS_SIZE, "seed": 0}
MANIFEST_FORMATS = ("auto", "jsonl", "csv")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WDS_TEXT_EXTS = ("txt", "json")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


# ---------------------------------------------------------------------------------------------
# Paths and ids


def stable_id(prefix: str, text: str) -> str:
    """``<prefix>-<16 hex digits of SHA-256(text)>``: the same on every worker, run and machine."""
    return f"{prefix}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


def has_scheme(path: str) -> bool:
    """True for URIs like ``gs://b/x.jpg`` or ``https://h/x.jpg``."""
    return bool(_SCHEME.match(path))


def parent_dir(path: str) -> str:
    """The folder of a local path or URI (``gs://b/d/m.jsonl`` -> ``gs://b/d``)."""
    if has_scheme(path):
        return path.rsplit("/", 1)[0]
    return posixpath.dirname(posixpath.abspath(path))


def resolve_path(path: str, base: str) -> str:
    """Absolute paths and URIs are kept; relative ones are joined to ``base`` and normalised."""
    if has_scheme(path) or path.startswith("/"):
        return path
    if has_scheme(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    return posixpath.normpath(posixpath.join(base, path))


def is_http(uri: Optional[str]) -> bool:
    return bool(uri) and uri.split("://", 1)[0].lower() in download.SCHEMES and "://" in uri


def match_files(pattern: str) -> List[str]:
    """Paths matching a file name or glob (local or remote), sorted; [] when none."""
    try:
        result = FileSystems.match([pattern])[0]
    except Exception:  # noqa: BLE001 - a bad bucket / pattern: treated as no match
        return []
    return sorted(m.path for m in result.metadata_list)


def _decode_line(line) -> str:
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    return text.lstrip("\ufeff").rstrip("\r\n")


def _bad_line(filename: str, line: str, why: str):
    """A BAD_SOURCE_LINE dead letter for one text line (id: hash of file + line)."""
    return rec.dead_letter(stable_id("line", f"{filename}\n{line}"), filename,
                           rec.BAD_SOURCE_LINE, f"{why}; line {line[:200]!r}")


class _Downloaded(beam.PTransform):
    """candidates -> (candidates with bytes for their http(s) images, download dead letters).

    Candidates whose ``image_uri`` is not http(s) pass through untouched.
    """

    def __init__(self, options: download.DownloadOptions):
        super().__init__()
        self._options = options

    def expand(self, candidates):
        remote, local = candidates | "RemoteOrLocal" >> beam.Partition(
            lambda c, _: 0 if is_http(c.image_uri) else 1, 2)
        fetched = remote | "Download" >> beam.ParDo(
            download.DownloadImages(self._options)).with_outputs(rec.DEAD_LETTERS,
                                                                main="candidates")
        merged = (fetched.candidates, local) | "AllCandidates" >> beam.Flatten()
        return merged, fetched[rec.DEAD_LETTERS]


# ---------------------------------------------------------------------------------------------
# (a) JSONL / CSV manifests


def _read_first_line(path: str) -> str:
    with FileSystems.open(path) as f:  # compression detected from the extension
        head = f.read(1 << 16)
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    return text.splitlines()[0] if text else ""


def manifest_format(path: str, first_line: str) -> str:
    """'csv' or 'jsonl' from the extension (.csv / .jsonl, .json, .ndjson), else the content."""
    name = path.lower()
    for ext in (".gz", ".bz2", ".zst", ".deflate", ".lzma", ".xz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    return "jsonl" if first_line.lstrip().startswith("{") else "csv"


def csv_columns(header_line: str) -> Dict[str, int]:
    """``{column name (lower case): index}`` of a CSV header; needs ``image`` and ``caption``."""
    names = [c.strip().lower() for c in next(csv.reader([header_line]), [])]
    missing = [c for c in ("image", "caption") if c not in names]
    if missing:
        raise ValueError(f"CSV header {header_line[:200]!r} lacks column(s) {missing}")
    return {name: i for i, name in enumerate(names)}


class _ParseManifestLine(beam.DoFn):
    """(manifest file, raw line) -> (image uri, (explicit id or "", captions, image as written)).

    Bad lines leave as BAD_SOURCE_LINE dead letters.
    """

    def __init__(self, fmt: str, columns: Optional[Dict[str, int]] = None):
        self._fmt = fmt
        self._columns = dict(columns or {})

    def process(self, element):
        filename, raw = element
        try:
            line = _decode_line(raw)
        except UnicodeDecodeError as e:
            yield _bad_line(filename, repr(raw[:200]), f"not UTF-8: {e}")
            return
        if not line.strip():
            return
        try:
            image, explicit_id, captions = (
                self._parse_csv(line) if self._fmt == "csv" else self._parse_json(line))
        except (ValueError, TypeError, KeyError, csv.Error) as e:
            yield _bad_line(filename, line, f"{type(e).__name__}: {e}")
            return
        uri = resolve_path(image, parent_dir(filename))
        yield uri, (explicit_id, tuple(captions), f"{filename}: {image}")

    @staticmethod
    def _parse_json(line: str):
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise TypeError(f"a line must be a JSON object, got {type(obj).__name__}")
        image = obj.get("image")
        if not isinstance(image, str) or not image.strip():
            raise KeyError("'image' must be a non-empty string")
        if "caption" not in obj and "captions" not in obj:
            raise KeyError("no 'caption' or 'captions' field")
        captions = []
        if "caption" in obj:
            if not isinstance(obj["caption"], str):
                raise TypeError("'caption' must be a string")
            captions.append(obj["caption"])
        if "captions" in obj:
            value = obj["captions"]
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise TypeError("'captions' must be a list of strings")
            captions.extend(value)
        explicit_id = obj.get("id", "")
        if isinstance(explicit_id, bool) or not isinstance(explicit_id, (str, int)):
            raise TypeError("'id' must be a string or an integer")
        return image.strip(), str(explicit_id), captions

    def _parse_csv(self, line: str):
        row = next(csv.reader([line], strict=True))
        if len(row) != len(self._columns):
            raise ValueError(f"{len(row)} columns, the header has {len(self._columns)}")
        image = row[self._columns["image"]].strip()
        if not image:
            raise ValueError("empty 'image' column")
        explicit_id = row[self._columns["id"]].strip() if "id" in self._columns else ""
        return image, explicit_id, [row[self._columns["caption"]]]


def _group_to_candidate(prefix: str):
    """(image uri, [(explicit id, captions, where)]) -> one Candidate with all captions."""

    def to_candidate(element) -> rec.Candidate:
        uri, entries = element
        entries = sorted(entries)  # deterministic caption order on every runner
        ids = sorted(e[0] for e in entries if e[0])
        captions: List[str] = []
        for _, caps, _ in entries:
            captions.extend(caps)
        return rec.Candidate(id=ids[0] if ids else stable_id(prefix, uri),
                             captions=tuple(captions), source=entries[0][2], image_uri=uri)

    return to_candidate


class ReadManifest(beam.PTransform):
    """JSONL or CSV manifest(s) -> ``(candidates, source dead letters)``.

    Args:
      path: a manifest file or glob (local or gs://, optionally compressed).
      fmt: 'auto' (from the extension, else the first line), 'jsonl' or 'csv'. A CSV glob uses
        the header of its first file for every file; a caption with a line break inside quotes
        is not supported (lines are read independently, so the read splits).
      download_options: for manifest images given as http(s) URLs.

    Default ids are ``img-<hash of the resolved image path>``; lines with an ``id`` keep it
    (the smallest when several lines of one image disagree).
    """

    def __init__(self, path: str, fmt: str = "auto",
                 download_options: download.DownloadOptions = download.DownloadOptions()):
        super().__init__()
        if fmt not in MANIFEST_FORMATS:
            raise ValueError(f"manifest format must be one of {MANIFEST_FORMATS}, got {fmt!r}")
        files = match_files(path)
        if not files:
            raise FileNotFoundError(f"no manifest matches {path!r}")
        first_line = _read_first_line(files[0])
        self._path = path
        self._fmt = manifest_format(files[0], first_line) if fmt == "auto" else fmt
        self._columns = csv_columns(first_line) if self._fmt == "csv" else None
        self._download = download_options

    def expand(self, pbegin):
        lines = pbegin | "ReadLines" >> beam.io.ReadFromTextWithFilename(
            self._path, coder=beam.coders.BytesCoder(),
            skip_header_lines=1 if self._fmt == "csv" else 0)
        parsed = lines | "ParseLines" >> beam.ParDo(
            _ParseManifestLine(self._fmt, self._columns)).with_outputs(
                rec.DEAD_LETTERS, main="entries")
        candidates = (parsed.entries
                      | "GroupByImage" >> beam.GroupByKey()
                      | "ToCandidate" >> beam.Map(_group_to_candidate("img")))
        candidates, download_dead = candidates | "FetchHttpImages" >> _Downloaded(self._download)
        dead = ((parsed[rec.DEAD_LETTERS], download_dead)
                | "ManifestDeadLetters" >> beam.Flatten())
        return candidates, dead


# ---------------------------------------------------------------------------------------------
# (b) COCO captions JSON


def _is_coco_id(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


class _ParseCoco(beam.DoFn):
    """COCO captions JSON path -> candidates, dead letters for bad / orphan entries."""

    def __init__(self, image_dir: Optional[str]):
        self._image_dir = image_dir

    def process(self, json_path: str):
        try:
            with FileSystems.open(json_path) as f:
                data = json.loads(f.read().decode("utf-8"))
            images, annotations = data["images"], data["annotations"]
            if not isinstance(images, list) or not isinstance(annotations, list):
                raise TypeError("'images' and 'annotations' must be lists")
        except Exception as e:  # noqa: BLE001 - unreadable / invalid: one dead letter, no crash
            yield rec.dead_letter(stable_id("coco-file", json_path), json_path,
                                  rec.BAD_SOURCE_LINE, f"not a COCO captions JSON: "
                                                       f"{type(e).__name__}: {e}")
            return
        image_dir = self._image_dir or parent_dir(json_path)
        files: Dict = {}
        for i, image in enumerate(images):
            where = f"{json_path}:images[{i}]"
            if (not isinstance(image, dict) or not _is_coco_id(image.get("id"))
                    or not isinstance(image.get("file_name"), str) or not image["file_name"]):
                yield rec.dead_letter(stable_id("coco-image", where), where, rec.BAD_SOURCE_LINE,
                                      f"needs an 'id' and a 'file_name': {str(image)[:200]}")
            elif image["id"] in files:
                yield rec.dead_letter(f"coco-{image['id']}", where, rec.BAD_SOURCE_LINE,
                                      f"image id {image['id']!r} appears twice")
            else:
                files[image["id"]] = image["file_name"]
        captions: Dict = {image_id: [] for image_id in files}
        for j, ann in enumerate(annotations):
            where = f"{json_path}:annotations[{j}]"
            if (not isinstance(ann, dict) or not _is_coco_id(ann.get("image_id"))
                    or not isinstance(ann.get("caption"), str)):
                yield rec.dead_letter(stable_id("coco-ann", where), where, rec.BAD_SOURCE_LINE,
                                      f"needs an 'image_id' and a 'caption': {str(ann)[:200]}")
            elif ann["image_id"] not in captions:
                yield rec.dead_letter(stable_id("coco-ann", where), where, rec.BAD_SOURCE_LINE,
                                      f"annotation {ann.get('id')!r} points at unknown image "
                                      f"{ann['image_id']!r}")
            else:
                captions[ann["image_id"]].append(ann["caption"])
        for image_id, file_name in files.items():
            cid = f"coco-{image_id}"
            where = f"{json_path}: {file_name}"
            if not captions[image_id]:
                yield rec.dead_letter(cid, where, rec.EMPTY_CAPTION, "image has no annotation")
                continue
            yield rec.Candidate(id=cid, captions=tuple(captions[image_id]), source=where,
                                image_uri=resolve_path(file_name, image_dir))


class ReadCocoCaptions(beam.PTransform):
    """A COCO captions JSON -> ``(candidates, source dead letters)``.

    Images with no annotation are EMPTY_CAPTION dead letters, annotations of unknown images
    and malformed entries BAD_SOURCE_LINE. ``image_dir`` defaults to the JSON's folder. The JSON
    is parsed inside the pipeline (one worker), then the candidates are reshuffled so that the
    image reads spread over all workers.
    """

    def __init__(self, json_path: str, image_dir: Optional[str] = None):
        super().__init__()
        self._json_path = json_path
        self._image_dir = image_dir

    def expand(self, pbegin):
        parsed = (pbegin | "CocoJsonPath" >> beam.Create([self._json_path])
                  | "ParseCocoJson" >> beam.ParDo(_ParseCoco(self._image_dir)).with_outputs(
                      rec.DEAD_LETTERS, main="candidates"))
        candidates = parsed.candidates | "SpreadCandidates" >> beam.Reshuffle()
        return candidates, parsed[rec.DEAD_LETTERS]


# ---------------------------------------------------------------------------------------------
# (c) CC3M / CC12M-style URL TSVs

_TSV_HEADERS = (("caption", "url"), ("url", "caption"))


class _ParseTsvLine(beam.DoFn):
    """(file, raw line) -> (url, ("", (caption,), where)); header lines skipped."""

    def process(self, element):
        filename, raw = element
        try:
            line = _decode_line(raw)
        except UnicodeDecodeError as e:
            yield _bad_line(filename, repr(raw[:200]), f"not UTF-8: {e}")
            return
        if not line.strip():
            return
        fields = line.split("\t")
        if len(fields) != 2:
            yield _bad_line(filename, line, f"{len(fields)} tab-separated fields, expected 2 "
                                            "(caption, url)")
            return
        if tuple(f.strip().lower() for f in fields) in _TSV_HEADERS:
            return
        caption, url = fields
        if has_scheme(caption.strip()) and not has_scheme(url.strip()):
            url, caption = caption, url  # CC12M order: url<TAB>caption
        url = url.strip()
        if not url:
            yield _bad_line(filename, line, "empty url")
            return
        yield url, ("", (caption,), url)


class ReadUrlTsv(beam.PTransform):
    """TSV(s) of ``caption<TAB>url`` lines -> ``(downloaded candidates, dead letters)``.

    Also accepts CC12M's ``url<TAB>caption`` order (told apart per line by which field has a
    scheme) and skips a ``caption<TAB>url`` header. Lines of one URL become one candidate with
    all their captions (id ``url-<hash of the URL>``); grouping by URL is the shuffle that
    spreads the downloads over the workers. Download failures are DOWNLOAD_* dead letters.
    """

    def __init__(self, path: str,
                 download_options: download.DownloadOptions = download.DownloadOptions()):
        super().__init__()
        self._path = path
        self._download = download_options

    def expand(self, pbegin):
        lines = pbegin | "ReadLines" >> beam.io.ReadFromTextWithFilename(
            self._path, coder=beam.coders.BytesCoder())
        parsed = lines | "ParseLines" >> beam.ParDo(_ParseTsvLine()).with_outputs(
            rec.DEAD_LETTERS, main="entries")
        grouped = (parsed.entries
                   | "GroupByUrl" >> beam.GroupByKey()
                   | "ToCandidate" >> beam.Map(_group_to_candidate("url")))
        fetched = grouped | "Download" >> beam.ParDo(
            download.DownloadImages(self._download)).with_outputs(rec.DEAD_LETTERS,
                                                                 main="candidates")
        dead = ((parsed[rec.DEAD_LETTERS], fetched[rec.DEAD_LETTERS])
                | "TsvDeadLetters" >> beam.Flatten())
        return fetched.candidates, dead


# ---------------------------------------------------------------------------------------------
# (d) WebDataset tar shards


def wds_key(member_name: str) -> Tuple[str, str]:
    """``dir/0001.seg.png`` -> (``dir/0001``, ``seg.png``): key up to the basename's first dot."""
    folder, base = posixpath.split(member_name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


class _ReadTarShard(beam.DoFn):
    """One tar shard (path) -> a candidate per key, dead letters for incomplete keys.

    Streams the tar (``r|*``: plain, gz, bz2 or xz) and groups consecutive members by key, as
    WebDataset writes them; only one sample is held in memory. A key seen again after its
    sample was complete is a BAD_SOURCE_LINE. A corrupt or truncated shard gives one
    BAD_SOURCE_LINE for the shard (samples already read are kept) and the job goes on.
    """

    def process(self, path: str):
        shard = posixpath.basename(path)
        done = set()
        key, members = None, {}
        samples = 0
        try:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                with tarfile.open(fileobj=f, mode="r|*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        member_key, ext = wds_key(member.name)
                        if not posixpath.basename(member_key) or not ext:
                            continue  # "._x" resource forks, files without an extension
                        if member_key != key:
                            if key is not None:
                                samples += 1
                                yield from self._sample(path, shard, key, members, done)
                            key, members = member_key, {}
                        if ext in members:
                            continue  # a second member with the same extension: first wins
                        wanted = ext in WDS_IMAGE_EXTS or ext in WDS_TEXT_EXTS
                        members[ext] = tar.extractfile(member).read() if wanted else b""
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
            yield rec.dead_letter(shard, path, rec.BAD_SOURCE_LINE,
                                  f"corrupt tar after {samples} complete samples: "
                                  f"{type(e).__name__}: {e}")
            return
        if key is not None:
            yield from self._sample(path, shard, key, members, done)

    @staticmethod
    def _sample(path, shard, key, members, done):
        cid = f"{shard}/{key}"
        where = f"{path}:{key}.{{{','.join(members)}}}"
        if key in done:
            yield rec.dead_letter(cid, where, rec.BAD_SOURCE_LINE,
                                  "key appears again after its sample ended (members of a "
                                  "key must be consecutive)")
            return
        done.add(key)
        image_ext = next((e for e in members if e in WDS_IMAGE_EXTS), None)
        captions: List[str] = []
        try:
            if "txt" in members:
                captions.append(members["txt"].decode("utf-8"))
            if "json" in members:
                meta = json.loads(members["json"].decode("utf-8"))
                if isinstance(meta, dict):
                    if isinstance(meta.get("caption"), str):
                        captions.append(meta["caption"])
                    value = meta.get("captions")
                    if isinstance(value, list):
                        captions.extend(c for c in value if isinstance(c, str))
        except (UnicodeDecodeError, ValueError) as e:
            yield rec.dead_letter(cid, where, rec.BAD_SOURCE_LINE,
                                  f"unreadable caption: {type(e).__name__}: {e}")
            return
        has_text = any(e in members for e in WDS_TEXT_EXTS)
        if image_ext is None:
            yield rec.dead_letter(cid, where, rec.BAD_SOURCE_LINE,
                                  "caption without an image" if has_text
                                  else "sample has neither an image nor a caption")
        elif not captions:
            yield rec.dead_letter(cid, where, rec.EMPTY_CAPTION,
                                  "image without a caption (.txt or .json)")
        else:
            yield rec.Candidate(id=cid, captions=tuple(captions), source=where,
                                image_bytes=members[image_ext])


class ReadWebDataset(beam.PTransform):
    """WebDataset tar shards (a glob, local or gs://) -> ``(candidates, source dead letters)``.

    Samples are the members sharing a key (``0001.jpg`` + ``0001.txt``): images .jpg / .jpeg /
    .png / .webp, captions from .txt (the whole file is one caption) and/or .json (``caption``:
    str, ``captions``: list of str). Ids are ``<shard basename>/<key>``. One DoFn call reads one
    shard; the candidates are reshuffled afterwards.
    """

    def __init__(self, pattern: str):
        super().__init__()
        self._pattern = pattern

    def expand(self, pbegin):
        parsed = (pbegin | "ShardPattern" >> beam.Create([self._pattern])
                  | "MatchShards" >> beam.FlatMap(match_files)
                  | "SpreadShards" >> beam.Reshuffle()
                  | "ReadShards" >> beam.ParDo(_ReadTarShard()).with_outputs(
                      rec.DEAD_LETTERS, main="candidates"))
        candidates = parsed.candidates | "SpreadCandidates" >> beam.Reshuffle()
        return candidates, parsed[rec.DEAD_LETTERS]


# ---------------------------------------------------------------------------------------------
# The job


def build_parser():
    parser = job_flags.job_parser(
        "kmm data image-text",
        "Turn image-caption sources (manifest, COCO, URL TSV, WebDataset) into image-text "
        "TFRecords, or write a built-in dataset: digit-scenes (generated scenes of real digits "
        "with true captions and questions, split by source digit) or sample-photos (bundled "
        "real photos with hand-written captions, test split).")
    group = parser.add_argument_group("source")
    group.add_argument("--source", choices=SOURCES, required=True)
    group.add_argument("--input", default=None,
                       help="manifest (JSONL / CSV) file or glob, COCO captions JSON, TSV file "
                            "or glob, or WebDataset tar glob (not for digit-scenes / "
                            "sample-photos)")
    group.add_argument("--manifest_format", choices=MANIFEST_FORMATS, default="auto",
                       help="manifest: jsonl or csv (auto: from the extension)")
    group.add_argument("--image_dir", default=None,
                       help="coco: folder of the images (default: the JSON's folder)")
    group = parser.add_argument_group(
        "digit-scenes (source digits split as label-as-text with --split_fractions; a "
        "tokenizer.model is always trained on the training captions, questions and answers: "
        f"--vocab_size default {digit_scenes.DEFAULT_VOCAB_SIZE}, "
        f"--tokenizer_model_type default {digit_scenes.TOKENIZER_MODEL_TYPE})")
    for flag, help_text in (("num_train", "training scenes"),
                            ("num_validation", "validation scenes"),
                            ("num_test", "test scenes"),
                            ("canvas_size", "canvas side in px "
                                            f"({digit_scenes.MIN_CANVAS_SIZE}.."
                                            f"{digit_scenes.MAX_CANVAS_SIZE})"),
                            ("seed", "scene generator seed")):
        group.add_argument(f"--{flag}", type=int, default=argparse.SUPPRESS,
                           help=f"{help_text} (default {SCENE_FLAGS[flag]})")
    defaults = download.DownloadOptions()
    group = parser.add_argument_group("download (tsv, and http(s) images in a manifest)")
    group.add_argument("--timeout", type=float, default=defaults.timeout,
                       help="seconds per request")
    group.add_argument("--retries", type=int, default=defaults.retries,
                       help="retries after a timeout, connection error, HTTP 429 or 5xx")
    group.add_argument("--backoff", type=float, default=defaults.backoff,
                       help="seconds before the first retry (doubles each retry)")
    group.add_argument("--max_download_bytes", type=int, default=defaults.max_bytes,
                       help="largest image accepted")
    group.add_argument("--user_agent", default=defaults.user_agent)
    return parser


def download_options(args) -> download.DownloadOptions:
    if args.timeout <= 0:
        raise job_flags.FlagError(f"--timeout must be > 0, got {args.timeout}")
    if args.retries < 0:
        raise job_flags.FlagError(f"--retries must be >= 0, got {args.retries}")
    if args.backoff < 0:
        raise job_flags.FlagError(f"--backoff must be >= 0, got {args.backoff}")
    if args.max_download_bytes <= 0:
        raise job_flags.FlagError(
            f"--max_download_bytes must be > 0, got {args.max_download_bytes}")
    if not args.user_agent.strip():
        raise job_flags.FlagError("--user_agent must not be empty")
    return download.DownloadOptions(timeout=args.timeout, retries=args.retries,
                                    max_bytes=args.max_download_bytes,
                                    user_agent=args.user_agent, backoff=args.backoff)


def scene_source(args) -> digit_scenes.DigitScenes:
    """The DigitScenes of the digit-scenes flags; FlagError for bad values."""
    values = {flag: getattr(args, flag, default) for flag, default in SCENE_FLAGS.items()}
    counts = {split: values[f"num_{split}"] for split in dataset_writer.SPLITS}
    if counts["train"] < 1 or counts["validation"] < 0 or counts["test"] < 0:
        raise job_flags.FlagError(f"digit-scenes needs --num_train >= 1 (the tokenizer is "
                                  f"trained on it) and --num_validation, --num_test >= 0, got "
                                  f"{counts}")
    if not digit_scenes.MIN_CANVAS_SIZE <= values["canvas_size"] <= digit_scenes.MAX_CANVAS_SIZE:
        raise job_flags.FlagError(
            f"--canvas_size must be in [{digit_scenes.MIN_CANVAS_SIZE}, "
            f"{digit_scenes.MAX_CANVAS_SIZE}], got {values['canvas_size']}")
    if values["seed"] < 0:
        raise job_flags.FlagError(f"--seed must be >= 0, got {values['seed']}")
    if args.vocab_size < 0:
        raise job_flags.FlagError(f"digit-scenes always trains a tokenizer: --vocab_size must be "
                                  f"> 0 (0: {digit_scenes.DEFAULT_VOCAB_SIZE}), got "
                                  f"{args.vocab_size}")
    fractions = job_flags.split_fractions(args)
    try:
        for split in dataset_writer.SPLITS:
            digit_scenes.digit_pool(split, fractions)
    except ValueError as e:
        raise job_flags.FlagError(f"--split_fractions {args.split_fractions}: {e}") from e
    return digit_scenes.DigitScenes(counts, canvas_size=values["canvas_size"],
                                    seed=values["seed"], fractions=fractions)


def make_source(args, fetch_options: download.DownloadOptions) -> beam.PTransform:
    """The source PTransform the flags ask for; FlagError for a missing or bad input, or for a
    flag that does not apply to the source."""
    scene_flags = [f"--{flag}" for flag in SCENE_FLAGS if hasattr(args, flag)]
    if scene_flags and args.source != "digit-scenes":
        raise job_flags.FlagError(f"{', '.join(scene_flags)} only apply to --source "
                                  f"digit-scenes, not {args.source}")
    if args.source in BUILT_IN_SOURCES:
        if args.input is not None:
            raise job_flags.FlagError(f"--input does not apply to --source {args.source} "
                                      "(a built-in dataset)")
        if args.source == "sample-photos":
            if args.vocab_size > 0:
                raise job_flags.FlagError("--vocab_size does not apply to --source "
                                          "sample-photos (it has no training split)")
            return sample_photos.ReadSamplePhotos()
        return scene_source(args)
    if args.input is None:
        raise job_flags.FlagError(f"--source {args.source} needs --input")
    matches = match_files(args.input)
    if not matches:
        raise job_flags.FlagError(f"--input {args.input!r}: no such file")
    if args.source == "manifest":
        try:
            return ReadManifest(args.input, args.manifest_format, fetch_options)
        except (ValueError, OSError) as e:
            raise job_flags.FlagError(f"--input {args.input!r}: {e}") from e
    if args.source == "coco":
        if len(matches) != 1:
            raise job_flags.FlagError(f"--source coco needs one JSON file, --input "
                                      f"{args.input!r} matches {len(matches)}")
        if args.image_dir and not has_scheme(args.image_dir) and not FileSystems.exists(
                args.image_dir):
            raise job_flags.FlagError(f"--image_dir {args.image_dir!r}: no such folder")
        return ReadCocoCaptions(matches[0], args.image_dir)
    if args.source == "tsv":
        return ReadUrlTsv(args.input, fetch_options)
    return ReadWebDataset(args.input)


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the job; returns ``{"out", "seconds", "records_per_second", **stats.json}``."""
    parser = build_parser()
    args, options = job_flags.parse_job_args(parser, argv)
    fractions = job_flags.split_fractions(args)
    image_options = job_flags.image_options(args)
    fetch_options = download_options(args)
    if args.records_per_shard < 1:
        raise job_flags.FlagError("--records_per_shard must be >= 1")
    if args.image_dir and args.source != "coco":
        raise job_flags.FlagError("--image_dir only applies to --source coco")
    source = make_source(args, fetch_options)
    scenes = args.source == "digit-scenes"
    vocab_size = args.vocab_size or (digit_scenes.DEFAULT_VOCAB_SIZE if scenes else 0)
    tokenizer = None
    if vocab_size > 0:
        from keras_mm.beam_jobs.tokenizer import TrainTokenizer  # lazily: optional step

        tokenizer = TrainTokenizer(
            args.out, vocab_size, model_type=args.tokenizer_model_type or (
                digit_scenes.TOKENIZER_MODEL_TYPE if scenes else "unigram"))
    extra_files = source.extra_files() if scenes else {}
    description = (f"image-text from {args.source}" if args.source in BUILT_IN_SOURCES
                   else f"image-text from {args.source}: {args.input}")
    if not has_scheme(args.out) and not FileSystems.exists(args.out):
        FileSystems.mkdirs(args.out)
    logging.info("image-text: source=%s input=%s %s", args.source, args.input,
                 " ".join(job_flags.output_flags(args)))

    def build(pipeline):
        pcolls = pipeline | f"Read_{args.source}" >> source
        if scenes:  # the tokenizer also learns the questions and answers of the training scenes
            _ = (pcolls[0] | "TokenizerTexts" >> beam.FlatMap(digit_scenes.tokenizer_texts)
                 | "Tokenizer" >> tokenizer)
        _ = pcolls | "BuildDataset" >> dataset_writer.BuildDataset(
            args.out, features.IMAGE_TEXT, split_fractions=fractions,
            records_per_shard=args.records_per_shard, image_options=image_options,
            train_captions=None if scenes else tokenizer, extra_files=extra_files,
            description=description)

    return job_flags.run_dataset_job(build, options, job="image-text", source=args.source,
                                     out=args.out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return job_flags.main_for(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
