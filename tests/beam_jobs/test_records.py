"""records.ToRecord and dataset_writer.BuildDataset: reasons, canonicalisation, dedup, counts.

Expected pixels come from the arrays the test images were built from (image_samples.py), with
the textbook conversions (alpha over white, CMYK -> RGB, grey -> three equal channels).
"""

from __future__ import annotations

import io
import json
import math
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from tests.beam_jobs.image_samples import Images, assert_close, dead_by_id, read_dataset
from keras_mm.beam_jobs import dataset_writer
from keras_mm.beam_jobs import records as rec
from keras_mm.pipelines import features

IMAGES = Images()


def _summary(keyed: rec.KeyedRecord):
    r = keyed.record
    return (keyed.id, tuple(r[features.TEXTS]), r[features.IMAGE_ENCODED],
            r[features.IMAGE_HEIGHT], r[features.IMAGE_WIDTH])


def _check_records(expected):
    """Matcher: ``expected = {id: (texts, pixels, lossless, format, exact_bytes or None)}``."""

    def check(actual):
        got = {a[0]: a for a in actual}
        assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
        for cid, (texts, pixels, lossless, fmt, exact_bytes) in expected.items():
            _, got_texts, encoded, height, width = got[cid]
            assert got_texts == tuple(texts), (cid, got_texts, texts)
            out_fmt, out_pixels = Images.decode(encoded)
            assert out_fmt == fmt, (cid, out_fmt, fmt)
            assert (height, width) == pixels.shape[:2], (cid, height, width, pixels.shape)
            assert_close(out_pixels, pixels, lossless, cid)
            if exact_bytes is not None:
                assert encoded == exact_bytes, f"{cid}: RGB {fmt} bytes were re-encoded"

    return check


def test_to_record_canonicalises_modes_and_rejects_bad_input(tmp_path):
    png, png_px = IMAGES.png(1)
    jpg, jpg_px = IMAGES.jpeg(2)
    rgba, rgba_px = IMAGES.rgba_png(3)
    gray, gray_px = IMAGES.gray_jpeg(4)
    cmyk, cmyk_px = IMAGES.cmyk_jpeg(5)
    on_disk, on_disk_px = IMAGES.png(6)
    (tmp_path / "on_disk.png").write_bytes(on_disk)
    bmp_px = IMAGES.smooth(7)
    bmp = Images.encode(bmp_px, "BMP")
    tiny = Images.encode(IMAGES.smooth(8, height=4, width=4), "PNG")
    C = rec.Candidate
    candidates = [
        C("png", ("a plain PNG",), image_bytes=png),
        C("jpg", ("Ein Hund läuft über die Wiese", "一只猫", "party 🎉🐶"), image_bytes=jpg),
        C("rgba", ("  spaces \t and\nnewlines  ", "", "spaces and newlines"), image_bytes=rgba),
        C("gray", ("grey",), image_bytes=gray),
        C("cmyk", ("cmyk",), image_bytes=cmyk),
        C("disk", ("read from a file",), image_uri=str(tmp_path / "on_disk.png")),
        C("bmp", ("a bitmap",), image_bytes=bmp),
        C("corrupt", ("x",), image_bytes=IMAGES.corrupt_jpeg()),
        C("truncated", ("x",), image_bytes=IMAGES.truncated_jpeg(9)),
        C("missing", ("x",), image_uri=str(tmp_path / "nope.jpg")),
        C("empty", ("",), image_bytes=IMAGES.png(10)[0]),
        C("blank", ("  \t \n ",), image_bytes=IMAGES.png(11)[0]),
        C("no_captions", (), image_bytes=IMAGES.png(12)[0]),
        C("tiny", ("too small",), image_bytes=tiny),
    ]
    expected = {
        "png": (["a plain PNG"], png_px, True, "PNG", png),
        "jpg": (["Ein Hund läuft über die Wiese", "一只猫", "party 🎉🐶"], jpg_px, False,
                "JPEG", jpg),
        # whitespace runs -> one space, empty dropped, exact repeats dropped
        "rgba": (["spaces and newlines"], rgba_px, True, "PNG", None),
        "gray": (["grey"], gray_px, False, "JPEG", None),
        "cmyk": (["cmyk"], cmyk_px, False, "JPEG", None),
        "disk": (["read from a file"], on_disk_px, True, "PNG", on_disk),
        "bmp": (["a bitmap"], bmp_px, True, "PNG", None),  # lossless source -> PNG
    }
    expected_dead = [
        ("corrupt", rec.CORRUPT_IMAGE), ("truncated", rec.TRUNCATED_IMAGE),
        ("missing", rec.MISSING_FILE), ("empty", rec.EMPTY_CAPTION),
        ("blank", rec.EMPTY_CAPTION), ("no_captions", rec.EMPTY_CAPTION),
        ("tiny", rec.IMAGE_TOO_SMALL),
    ]
    with BeamPipeline() as p:
        out = (p | beam.Create(candidates)
               | beam.ParDo(rec.ToRecord(features.IMAGE_TEXT)).with_outputs(
                   rec.DEAD_LETTERS, main="records"))
        assert_that(out.records | "Summaries" >> beam.Map(_summary),
                    _check_records(expected), label="CheckRecords")
        assert_that(out[rec.DEAD_LETTERS] | beam.Map(lambda d: (d.id, d.reason)),
                    equal_to(expected_dead), label="CheckDeadLetters")


def test_canonicalize_keeps_rgb_bytes_and_hashes_pixels():
    """Same pixels in another lossless container -> same content hash; other pixels -> not."""
    arr = IMAGES.smooth(20)
    png = Images.encode(arr, "PNG")
    png_uncompressed = Images.encode(arr, "PNG", compress_level=0)
    bmp = Images.encode(arr, "BMP")
    assert len({png, png_uncompressed, bmp}) == 3
    options = rec.ImageOptions()
    hashes = {rec.canonicalize_image(b, options)[3] for b in (png, png_uncompressed, bmp)}
    assert len(hashes) == 1
    other = arr.copy()
    other[0, 0, 0] ^= 1
    assert rec.canonicalize_image(Images.encode(other, "PNG"), options)[3] not in hashes
    encoded, height, width, _ = rec.canonicalize_image(png, options)
    assert encoded == png and (height, width) == arr.shape[:2]
    # resize_max_side downscales (never upscales) and re-encodes
    resized, h2, w2, _ = rec.canonicalize_image(png, rec.ImageOptions(resize_max_side=28))
    assert max(h2, w2) == 28 and Image.open(io.BytesIO(resized)).size == (w2, h2)
    with pytest.raises(rec.RecordError) as e:
        rec.canonicalize_image(png, rec.ImageOptions(max_side=30))
    assert e.value.reason == rec.IMAGE_TOO_LARGE


def test_dead_letter_rejects_unknown_reason():
    with pytest.raises(ValueError):
        rec.dead_letter("x", "src", "not_a_reason")


def test_build_dataset_dedups_merges_captions_and_counts_add_up(tmp_path):
    """The same pixels under three ids (PNG, uncompressed PNG, BMP) -> one record, 2 duplicates."""
    out = str(tmp_path / "ds")
    dup_px = IMAGES.smooth(30)
    C = rec.Candidate
    dups = [
        C("dup-b", ("a red square", "shared caption"), image_bytes=Images.encode(dup_px, "PNG")),
        C("dup-a", ("a crimson square",),
          image_bytes=Images.encode(dup_px, "PNG", compress_level=0)),
        C("dup-c", ("shared caption", "a bitmap copy"), image_bytes=Images.encode(dup_px, "BMP")),
    ]
    goods = {f"good-{i:02d}": IMAGES.png(40 + i) for i in range(7)}
    good_candidates = [C(cid, (f"caption {cid}", "一只猫"), image_bytes=data)
                       for cid, (data, _) in goods.items()]
    bad = [C("bad-corrupt", ("x",), image_bytes=IMAGES.corrupt_jpeg()),
           C("bad-empty", (" ",), image_bytes=IMAGES.png(60)[0])]
    source_dead = [rec.DeadLetter("line-1", "manifest", rec.BAD_SOURCE_LINE, "not json"),
                   rec.DeadLetter("line-2", "manifest", rec.BAD_SOURCE_LINE, "no image")]
    candidates = dups + good_candidates + bad
    with BeamPipeline() as p:
        stats = ((p | "Candidates" >> beam.Create(candidates),
                  p | "SourceDead" >> beam.Create(source_dead))
                 | dataset_writer.BuildDataset(out, features.IMAGE_TEXT, records_per_shard=3))
        assert_that(stats | beam.Map(lambda s: (s["inputs"], s["written"], s["duplicates"])),
                    equal_to([(len(candidates) + 2, len(goods) + 1, 2)]))

    stats = dataset_writer.read_stats(out)
    assert stats["inputs"] == len(candidates) + len(source_dead)
    assert stats["written"] == len(goods) + 1
    assert stats["duplicates"] == 2
    assert stats["dead_letters"] == {
        "total": 4, "by_reason": {rec.BAD_SOURCE_LINE: 2, rec.CORRUPT_IMAGE: 1,
                                  rec.EMPTY_CAPTION: 1}}
    assert stats["inputs"] == (stats["written"] + stats["dead_letters"]["total"]
                               + stats["duplicates"])
    assert stats["consistent"] is True
    assert sum(stats["splits"].values()) == stats["written"]
    for split, count in stats["splits"].items():  # sharding follows records_per_shard
        assert stats["shards"][split] == (math.ceil(count / 3) if count else 0)
        shards = [f for f in os.listdir(out) if f.startswith(f"{split}.tfrecord-")]
        assert len(shards) == stats["shards"][split]

    records = read_dataset(out)
    assert sorted(records) == sorted(["dup-a", *goods])  # the smallest id of the copies is kept
    merged = records["dup-a"]["texts"]
    assert merged[0] == "a crimson square"
    assert sorted(merged) == sorted(
        {"a red square", "shared caption", "a crimson square", "a bitmap copy"})
    assert len(merged) == len(set(merged))
    _, pixels = Images.decode(records["dup-a"]["image/encoded"])
    assert_close(pixels, dup_px, lossless=True, what="dup-a")
    for cid, (data, px) in goods.items():
        assert records[cid]["texts"] == [f"caption {cid}", "一只猫"]
        assert records[cid]["image/encoded"] == data
    assert dead_by_id(out) == {"line-1": rec.BAD_SOURCE_LINE, "line-2": rec.BAD_SOURCE_LINE,
                               "bad-corrupt": rec.CORRUPT_IMAGE, "bad-empty": rec.EMPTY_CAPTION}
    with open(os.path.join(out, dataset_writer.DEAD_LETTER_FILE), encoding="utf-8") as f:
        letters = [json.loads(line) for line in f if line.strip()]
    assert all(set(d) == {"id", "source", "reason", "detail"} for d in letters)


def test_assign_split_is_deterministic_and_follows_fractions():
    ids = [f"id-{i}" for i in range(4000)]
    splits = [dataset_writer.assign_split(i, (0.8, 0.1, 0.1)) for i in ids]
    assert splits == [dataset_writer.assign_split(i, (0.8, 0.1, 0.1)) for i in ids]
    share = {s: splits.count(s) / len(ids) for s in dataset_writer.SPLITS}
    assert abs(share["train"] - 0.8) < 0.03 and abs(share["test"] - 0.1) < 0.03
    assert {dataset_writer.assign_split(i, (1.0, 0.0, 0.0)) for i in ids} == {"train"}
    np.testing.assert_equal(dataset_writer.num_shards_for(0, 10), 1)
