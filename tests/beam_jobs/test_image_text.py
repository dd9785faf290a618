"""image-text job: the four sources, the downloader, and end-to-end runs read back with tfds.

Every expected value comes from how the test built its inputs: pixels from the arrays the images
were made from (image_samples.py), captions and ids from the manifest / JSON / tar / TSV written
here, reasons from what each input was made to be (a 404, a truncated file, ...).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline
from apache_beam.testing.util import assert_that, equal_to

from keras_mm.beam_jobs import dataset_writer, download, image_text, job_flags
from keras_mm.beam_jobs import records as rec
from tests.beam_jobs.image_samples import (Images, assert_close, dead_by_id, read_dataset,
                                           write_jsonl, write_tar)
from tests.beam_jobs.image_server import Route, closed_port_url

IMAGES = Images()
UA = "kmm-test-agent/1.0"
NON_ASCII = ["Ein Hund läuft über die Wiese", "一只猫", "party 🎉🐶 time"]


def _sha16(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _tfds_examples(out):
    """Every example of a dataset folder through tensorflow-datasets, by id."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(out)
    examples = {}
    for split in builder.info.splits:
        for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
            cid = ex["id"].decode("utf-8")
            assert cid not in examples
            examples[cid] = {"image": ex["image"]["encoded"],
                             "height": int(ex["image"]["height"]),
                             "width": int(ex["image"]["width"]),
                             "texts": [t.decode("utf-8") for t in ex["texts"]]}
    return examples


def _assert_counts_add_up(stats):
    assert stats["inputs"] == (stats["written"] + stats["dead_letters"]["total"]
                               + stats["duplicates"])
    assert stats["consistent"] is True


# ---------------------------------------------------------------------------------------------
# download.fetch against a local server

FAST = download.DownloadOptions(timeout=0.5, retries=2, backoff=0.01, max_bytes=50_000,
                                user_agent=UA)


def _fetch_error(url, options=FAST, **kw) -> download.DownloadError:
    with pytest.raises(download.DownloadError) as e:
        download.fetch(url, options, **kw)
    return e.value


def test_fetch_returns_body_and_sends_user_agent(http_server):
    body, _ = IMAGES.png(100)
    http_server.routes["/ok.png"] = Route(body=body)
    assert download.fetch(http_server.url("/ok.png"), FAST) == body
    assert http_server.user_agents("/ok.png") == [UA]


def test_fetch_4xx_is_not_retried(http_server):
    http_server.routes["/forbidden.png"] = Route(status=403, body=b"no")
    err = _fetch_error(http_server.url("/nothing-here.png"))
    assert err.reason == rec.DOWNLOAD_HTTP_ERROR and "HTTP 404" in err.detail
    assert http_server.hits("/nothing-here.png") == 1
    err = _fetch_error(http_server.url("/forbidden.png"))
    assert err.reason == rec.DOWNLOAD_HTTP_ERROR and "HTTP 403" in err.detail
    assert http_server.hits("/forbidden.png") == 1


def test_fetch_retries_5xx_and_429_with_exponential_backoff(http_server):
    body, _ = IMAGES.jpeg(101)
    http_server.routes["/flaky500.jpg"] = Route(body=body, fail_first=2, fail_status=500)
    http_server.routes["/flaky429.jpg"] = Route(body=body, fail_first=1, fail_status=429)
    http_server.routes["/down503.jpg"] = Route(body=body, fail_first=10**6, fail_status=503)
    options = download.DownloadOptions(timeout=1.0, retries=2, backoff=0.1, user_agent=UA)
    sleeps, retries = [], []
    got = download.fetch(http_server.url("/flaky500.jpg"), options, sleep=sleeps.append,
                         on_retry=lambda: retries.append(1))
    assert got == body and http_server.hits("/flaky500.jpg") == 3 and len(retries) == 2
    # backoff * 2**attempt, with at most 10% jitter on top
    assert 0.1 <= sleeps[0] <= 0.11 and 0.2 <= sleeps[1] <= 0.22
    assert download.fetch(http_server.url("/flaky429.jpg"), options, sleep=lambda s: None) == body
    assert http_server.hits("/flaky429.jpg") == 2
    err = _fetch_error(http_server.url("/down503.jpg"), options, sleep=lambda s: None)
    assert err.reason == rec.DOWNLOAD_HTTP_ERROR and "HTTP 503" in err.detail
    assert err.attempts == 3 and http_server.hits("/down503.jpg") == 3


def test_fetch_times_out_and_retries(http_server):
    http_server.routes["/slow.png"] = Route(body=IMAGES.png(102)[0], sleep=3.0)
    options = download.DownloadOptions(timeout=0.3, retries=1, backoff=0.01)
    start = time.monotonic()
    err = _fetch_error(http_server.url("/slow.png"), options)
    elapsed = time.monotonic() - start
    assert err.reason == rec.DOWNLOAD_TIMEOUT, err
    assert err.attempts == 2
    assert elapsed < 2.0, f"the 0.3 s timeout did not cut the 3 s answer short ({elapsed:.1f} s)"
    deadline = time.monotonic() + 2
    while http_server.hits("/slow.png") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http_server.hits("/slow.png") == 2


def test_fetch_caps_the_size(http_server):
    big = bytes(np.random.default_rng(0).integers(0, 256, 60_000, dtype=np.uint8))
    http_server.routes["/big.bin"] = Route(body=big)
    http_server.routes["/big-stream.bin"] = Route(body=big, content_length=False)
    http_server.routes["/fits.bin"] = Route(body=big[:50_000], content_length=False)
    for path in ("/big.bin", "/big-stream.bin"):
        err = _fetch_error(http_server.url(path))
        assert err.reason == rec.DOWNLOAD_TOO_LARGE, (path, err)
        assert http_server.hits(path) == 1  # never retried
    assert download.fetch(http_server.url("/fits.bin"), FAST) == big[:50_000]


def test_fetch_connection_refused_is_download_error():
    err = _fetch_error(closed_port_url())
    assert err.reason == rec.DOWNLOAD_ERROR and err.attempts == FAST.retries + 1


def test_fetch_only_http_and_https(http_server, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    before = len(http_server.requests)
    for url in (f"file://{secret}", "ftp://127.0.0.1/x.jpg", "not a url", "http://",
                "gs://bucket/x.jpg", "http://127.0.0.1:99999999/x.png"):
        err = _fetch_error(url)
        assert err.reason == rec.DOWNLOAD_ERROR, (url, err)
    assert len(http_server.requests) == before
    body, _ = IMAGES.png(103)
    http_server.routes["/target.png"] = Route(body=body)
    http_server.routes["/to-target"] = Route(status=302, location=http_server.url("/target.png"))
    http_server.routes["/to-file"] = Route(status=302, location=f"file://{secret}")
    assert download.fetch(http_server.url("/to-target"), FAST) == body
    err = _fetch_error(http_server.url("/to-file"))
    assert err.reason == rec.DOWNLOAD_ERROR and "scheme" in err.detail


# ---------------------------------------------------------------------------------------------
# Sources in a TestPipeline


def _candidate_summary(c: rec.Candidate):
    return (c.id, tuple(sorted(c.captions)), c.image_uri, c.image_bytes)


def _dead_summary(d: rec.DeadLetter):
    return (d.reason, d.detail)


def _check_bad_lines(markers, reason=rec.BAD_SOURCE_LINE):
    """Matcher: one dead letter per marker, each naming its line (the marker) in the detail."""

    def check(actual):
        assert len(actual) == len(markers), actual
        assert {r for r, _ in actual} == {reason}, actual
        for marker in markers:
            assert sum(marker in detail for _, detail in actual) == 1, (marker, actual)

    return check


def test_read_manifest_jsonl(tmp_path, http_server):
    folder = tmp_path / "m"
    folder.mkdir()
    remote, _ = IMAGES.png(110)
    http_server.routes["/remote.png"] = Route(body=remote)
    remote_url = http_server.url("/remote.png")
    manifest = write_jsonl(folder / "captions.jsonl", [
        {"image": "a.jpg", "caption": "first"},
        {"image": "./a.jpg", "captions": ["second", "third"]},   # same image: grouped
        {"image": "sub/b.png", "caption": NON_ASCII[0], "id": "my-b"},
        {"image": "/abs/c.png", "captions": NON_ASCII[1:]},
        {"image": "gs://bucket/d.jpg", "caption": "on a bucket"},
        {"image": "e.png", "captions": []},                      # empty: a record-level reason
        {"image": remote_url, "caption": "downloaded"},
        "   ",
        '{"image": "BAD1.jpg", "caption": "unterminated',
        {"caption": "BAD2 has no image"},
        {"image": "BAD3.png", "captions": "not a list"},
        '["BAD4", "not an object"]',
        {"image": "BAD5.png"},
        {"image": "BAD6.png", "caption": "x", "id": {"not": "an id"}},
    ])
    base = str(folder)
    a_uri = f"{base}/a.jpg"
    e_uri = f"{base}/e.png"
    expected = [
        (f"img-{_sha16(a_uri)}", ("first", "second", "third"), a_uri, None),
        ("my-b", (NON_ASCII[0],), f"{base}/sub/b.png", None),
        (f"img-{_sha16('/abs/c.png')}", tuple(sorted(NON_ASCII[1:])), "/abs/c.png", None),
        (f"img-{_sha16('gs://bucket/d.jpg')}", ("on a bucket",), "gs://bucket/d.jpg", None),
        (f"img-{_sha16(e_uri)}", (), e_uri, None),
        (f"img-{_sha16(remote_url)}", ("downloaded",), None, remote),
    ]
    with BeamPipeline() as p:
        candidates, dead = p | image_text.ReadManifest(str(manifest))
        assert_that(candidates | beam.Map(_candidate_summary), equal_to(expected),
                    label="Candidates")
        assert_that(dead | beam.Map(_dead_summary),
                    _check_bad_lines([f"BAD{i}" for i in range(1, 7)]), label="DeadLetters")


def test_read_manifest_csv_with_quotes_bom_and_crlf(tmp_path):
    path = tmp_path / "captions.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as f:  # BOM + CRLF, like Excel
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "id"])
        writer.writerow(["a.jpg", "A dog, running on grass", ""])
        writer.writerow(["a.jpg", 'the "same" dog', ""])
        writer.writerow(["b c.png", NON_ASCII[0], "b-1"])
        writer.writerow(["d.png", "", ""])
        writer.writerow(["BAD1.png", "too", "many", "columns"])
        writer.writerow(["BAD2-one-column"])
        writer.writerow(["", "BAD3 has no image", ""])
    a_uri, d_uri = f"{tmp_path}/a.jpg", f"{tmp_path}/d.png"
    expected = [
        (f"img-{_sha16(a_uri)}", ("A dog, running on grass", 'the "same" dog'), a_uri, None),
        ("b-1", (NON_ASCII[0],), f"{tmp_path}/b c.png", None),
        (f"img-{_sha16(d_uri)}", ("",), d_uri, None),
    ]
    source = image_text.ReadManifest(str(path))
    with BeamPipeline() as p:
        candidates, dead = p | source
        assert_that(candidates | beam.Map(_candidate_summary), equal_to(expected),
                    label="Candidates")
        assert_that(dead | beam.Map(_dead_summary), _check_bad_lines(["BAD1", "BAD2", "BAD3"]),
                    label="DeadLetters")


def test_read_manifest_glob_resolves_paths_per_manifest(tmp_path):
    """Relative paths resolve against each manifest's own folder."""
    for part in ("p1", "p2"):
        (tmp_path / part).mkdir()
        write_jsonl(tmp_path / part / "captions.jsonl",
                    [{"image": "same-name.jpg", "caption": f"from {part}"}])
    expected = [(f"img-{_sha16(f'{tmp_path}/{part}/same-name.jpg')}", (f"from {part}",),
                 f"{tmp_path}/{part}/same-name.jpg", None) for part in ("p1", "p2")]
    with BeamPipeline() as p:
        candidates, dead = p | image_text.ReadManifest(str(tmp_path / "*" / "captions.jsonl"))
        assert_that(candidates | beam.Map(_candidate_summary), equal_to(expected),
                    label="Candidates")
        assert_that(dead, equal_to([]), label="NoDeadLetters")


def test_read_manifest_rejects_csv_without_columns_and_missing_files(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("path,text\na.jpg,hello\n")
    with pytest.raises(ValueError, match="image"):
        image_text.ReadManifest(str(path))
    with pytest.raises(FileNotFoundError):
        image_text.ReadManifest(str(tmp_path / "nope.jsonl"))


def test_read_coco_captions(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"},
                   {"id": 3, "file_name": "000003.jpg"},          # no annotation
                   {"file_name": "BAD-no-id.jpg"},
                   {"id": 1, "file_name": "BAD-duplicate-id.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "a"},
                        {"id": 11, "image_id": 1, "caption": "b"},
                        {"id": 12, "image_id": 2, "caption": NON_ASCII[1]},
                        {"id": 13, "image_id": 99, "caption": "orphan"},
                        {"id": 14, "image_id": 2, "caption": 5}],
    }
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps(coco))
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    expected = [("coco-1", ("a", "b"), "/data/val2017/000001.jpg", None),
                ("coco-2", (NON_ASCII[1],), "/data/val2017/000002.jpg", None)]
    with BeamPipeline() as p:
        candidates, dead = p | "Coco" >> image_text.ReadCocoCaptions(str(path), "/data/val2017")
        _, broken_dead = p | "Broken" >> image_text.ReadCocoCaptions(str(broken))
        assert_that(candidates | beam.Map(_candidate_summary), equal_to(expected),
                    label="Candidates")
        assert_that(
            dead | beam.Map(lambda d: (d.id, d.reason)),
            lambda actual: (
                sorted(r for _, r in actual) == sorted([rec.EMPTY_CAPTION] + [
                    rec.BAD_SOURCE_LINE] * 4) and ("coco-3", rec.EMPTY_CAPTION) in actual
            ) or _fail(f"COCO dead letters {actual}"), label="DeadLetters")
        assert_that(broken_dead | beam.Map(lambda d: d.reason), equal_to([rec.BAD_SOURCE_LINE]),
                    label="BrokenJson")


def _fail(message):
    raise AssertionError(message)


def test_webdataset_key_split():
    assert image_text.wds_key("0001.jpg") == ("0001", "jpg")
    assert image_text.wds_key("dir/0001.seg.PNG") == ("dir/0001", "seg.png")
    assert image_text.wds_key("a.b/c.txt") == ("a.b/c", "txt")


# ---------------------------------------------------------------------------------------------
# End to end: manifest with every kind of bad input


@pytest.fixture(scope="module")
def manifest_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest_job")
    data = root / "data"
    data.mkdir()
    expect = {}  # id -> (captions, pixels, lossless)

    def put(name, payload):
        (data / name).write_bytes(payload)
        return name

    png, png_px = IMAGES.png(200)
    jpg, jpg_px = IMAGES.jpeg(201)
    rgba, rgba_px = IMAGES.rgba_png(202)
    gray, gray_px = IMAGES.gray_jpeg(203)
    cmyk, cmyk_px = IMAGES.cmyk_jpeg(204)
    abs_png, abs_px = IMAGES.png(205)
    (root / "elsewhere.png").write_bytes(abs_png)
    rows = [
        {"id": "e2e-png", "image": put("plain.png", png), "caption": "a plain PNG"},
        {"id": "e2e-png-copy", "image": put("copy.png", png), "caption": "the same PNG again"},
        {"id": "e2e-jpg", "image": put("photo.jpg", jpg), "captions": NON_ASCII},
        {"id": "e2e-rgba", "image": put("alpha.png", rgba), "caption": "see-through"},
        {"id": "e2e-gray", "image": put("gray.jpg", gray), "caption": "grey one"},
        {"image": "gray.jpg", "caption": "grey two"},
        {"id": "e2e-cmyk", "image": put("cmyk.jpg", cmyk), "caption": "printer colours"},
        {"id": "e2e-abs", "image": str(root / "elsewhere.png"), "caption": "absolute path"},
        {"id": "e2e-corrupt", "image": put("corrupt.jpg", IMAGES.corrupt_jpeg(206)),
         "caption": "c"},
        {"id": "e2e-truncated", "image": put("truncated.jpg", IMAGES.truncated_jpeg(207)),
         "caption": "t"},
        {"id": "e2e-missing", "image": "not-there.jpg", "caption": "m"},
        {"id": "e2e-empty", "image": put("empty.png", IMAGES.png(208)[0]), "caption": ""},
        {"id": "e2e-blank", "image": put("blank.png", IMAGES.png(209)[0]),
         "captions": ["  ", "\t\n"]},
        "{broken json",
        {"caption": "no image"},
    ]
    expect["e2e-png"] = (["a plain PNG", "the same PNG again"], png_px, True)
    expect["e2e-jpg"] = (NON_ASCII, jpg_px, False)
    expect["e2e-rgba"] = (["see-through"], rgba_px, True)
    expect["e2e-gray"] = (["grey one", "grey two"], gray_px, False)
    expect["e2e-cmyk"] = (["printer colours"], cmyk_px, False)
    expect["e2e-abs"] = (["absolute path"], abs_px, True)
    dead = {"e2e-corrupt": rec.CORRUPT_IMAGE, "e2e-truncated": rec.TRUNCATED_IMAGE,
            "e2e-missing": rec.MISSING_FILE, "e2e-empty": rec.EMPTY_CAPTION,
            "e2e-blank": rec.EMPTY_CAPTION}
    manifest = write_jsonl(data / "manifest.jsonl", rows)
    out = str(root / "out")
    summary = image_text.run(["--source", "manifest", "--input", str(manifest), "--out", out,
                              "--records_per_shard", "4"])
    return {"out": out, "summary": summary, "expect": expect, "dead": dead,
            "png": png, "bad_lines": sum(1 for r in rows if not isinstance(r, dict) or
                                         "image" not in r),
            "candidates": len({r["image"] for r in rows if isinstance(r, dict) and "image" in r})}


def test_manifest_job_counts_add_up(manifest_job):
    s = manifest_job["summary"]
    _assert_counts_add_up(s)
    # one candidate per distinct image (gray.jpg's two lines are one) + the bad lines
    assert s["inputs"] == manifest_job["candidates"] + manifest_job["bad_lines"]
    assert s["written"] == len(manifest_job["expect"])
    assert s["duplicates"] == 1
    assert s["dead_letters"]["by_reason"] == {
        rec.BAD_SOURCE_LINE: 2, rec.CORRUPT_IMAGE: 1, rec.TRUNCATED_IMAGE: 1,
        rec.MISSING_FILE: 1, rec.EMPTY_CAPTION: 2}
    assert s["out"] == manifest_job["out"] and s["seconds"] > 0 and s["records_per_second"] > 0
    assert s == {**dataset_writer.read_stats(manifest_job["out"]),
                 **{k: s[k] for k in ("job", "source", "out", "seconds", "records_per_second")}}


def test_manifest_job_dead_letters_have_the_right_reason(manifest_job):
    got = dead_by_id(manifest_job["out"])
    for cid, reason in manifest_job["dead"].items():
        assert got.pop(cid) == reason, cid
    assert sorted(got.values()) == [rec.BAD_SOURCE_LINE] * 2


def test_manifest_job_records_are_intact(manifest_job):
    records = read_dataset(manifest_job["out"])
    assert sorted(records) == sorted(manifest_job["expect"])
    for cid, (captions, pixels, lossless) in manifest_job["expect"].items():
        record = records[cid]
        assert sorted(record["texts"]) == sorted(captions), cid
        fmt, got = Images.decode(record["image/encoded"])
        assert fmt == ("PNG" if lossless else "JPEG"), (cid, fmt)
        assert (record["image/height"], record["image/width"]) == pixels.shape[:2]
        assert_close(got, pixels, lossless, cid)
    # the kept duplicate is the smaller id, its bytes untouched, the copy's caption merged
    assert records["e2e-png"]["image/encoded"] == manifest_job["png"]
    assert records["e2e-png"]["texts"][0] == "a plain PNG"


# ---------------------------------------------------------------------------------------------
# End to end: URL TSV against the local server


@pytest.fixture(scope="module")
def tsv_job(tmp_path_factory, http_server):
    root = tmp_path_factory.mktemp("tsv_job")
    ok, ok_px = IMAGES.png(300)
    flaky, flaky_px = IMAGES.jpeg(301)
    cat, cat_px = IMAGES.png(302)
    big = IMAGES.encode(
        np.random.default_rng(1).integers(0, 256, (120, 120, 3), dtype=np.uint8), "PNG")
    assert len(big) > 30_000
    routes = {
        "/tsv/ok.png": Route(body=ok),
        "/tsv/flaky.jpg": Route(body=flaky, fail_first=1, fail_status=500),
        "/tsv/cat.png": Route(body=cat),
        "/tsv/slow.png": Route(body=IMAGES.png(303)[0], sleep=4.0),
        "/tsv/big.png": Route(body=big),
        "/tsv/big-stream.png": Route(body=big, content_length=False),
        "/tsv/not-an-image.jpg": Route(body=b"<html>hello</html>"),
    }
    http_server.routes.update(routes)
    u = http_server.url
    refused = closed_port_url("/tsv/refused.png")
    lines = [
        "caption\turl",
        f"a downloaded PNG\t{u('/tsv/ok.png')}",
        f"needs a retry\t{u('/tsv/flaky.jpg')}",
        f"{NON_ASCII[1]}\t{u('/tsv/cat.png')}",
        f"{u('/tsv/cat.png')}\t{NON_ASCII[2]}",       # CC12M order, same URL: captions merged
        f"too slow\t{u('/tsv/slow.png')}",
        f"gone\t{u('/tsv/missing.png')}",
        f"too large\t{u('/tsv/big.png')}",
        f"too large, streamed\t{u('/tsv/big-stream.png')}",
        f"html\t{u('/tsv/not-an-image.jpg')}",
        f"nobody listens\t{refused}",
        "wrong scheme\tftp://127.0.0.1/x.jpg",
        "three\tfields\there",
        "",
    ]
    path = root / "cc.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = str(root / "out")
    summary = image_text.run([
        "--source", "tsv", "--input", str(path), "--out", out, "--timeout", "0.5",
        "--retries", "2", "--backoff", "0.02", "--max_download_bytes", "30000",
        "--user_agent", UA])
    ids = {name: f"url-{_sha16(u(name))}" for name in routes}
    ids["/tsv/missing.png"] = f"url-{_sha16(u('/tsv/missing.png'))}"
    ids["refused"] = f"url-{_sha16(refused)}"
    ids["ftp"] = f"url-{_sha16('ftp://127.0.0.1/x.jpg')}"
    expect = {ids["/tsv/ok.png"]: (["a downloaded PNG"], ok_px, True),
              ids["/tsv/flaky.jpg"]: (["needs a retry"], flaky_px, False),
              ids["/tsv/cat.png"]: ([NON_ASCII[1], NON_ASCII[2]], cat_px, True)}
    dead = {ids["/tsv/slow.png"]: rec.DOWNLOAD_TIMEOUT,
            ids["/tsv/missing.png"]: rec.DOWNLOAD_HTTP_ERROR,
            ids["/tsv/big.png"]: rec.DOWNLOAD_TOO_LARGE,
            ids["/tsv/big-stream.png"]: rec.DOWNLOAD_TOO_LARGE,
            ids["/tsv/not-an-image.jpg"]: rec.CORRUPT_IMAGE,
            ids["refused"]: rec.DOWNLOAD_ERROR,
            ids["ftp"]: rec.DOWNLOAD_ERROR}
    return {"out": out, "summary": summary, "expect": expect, "dead": dead,
            "server": http_server}


def test_tsv_job_downloads_and_dead_letters(tsv_job):
    s = tsv_job["summary"]
    _assert_counts_add_up(s)
    assert s["written"] == len(tsv_job["expect"])
    assert s["inputs"] == len(tsv_job["expect"]) + len(tsv_job["dead"]) + 1  # + the 3-field line
    got = dead_by_id(tsv_job["out"])
    for cid, reason in tsv_job["dead"].items():
        assert got.pop(cid) == reason, cid
    assert list(got.values()) == [rec.BAD_SOURCE_LINE]
    letters = {d["id"]: d for d in dataset_writer.read_dead_letters(tsv_job["out"])}
    missing = [d for d in letters.values() if d["reason"] == rec.DOWNLOAD_HTTP_ERROR]
    assert len(missing) == 1 and "HTTP 404" in missing[0]["detail"]


def test_tsv_job_retries_only_what_is_retryable(tsv_job):
    server = tsv_job["server"]
    assert server.hits("/tsv/flaky.jpg") == 2       # 500, then OK
    assert server.hits("/tsv/missing.png") == 1     # 404: no retry
    assert server.hits("/tsv/big.png") == 1         # too large: no retry
    assert server.hits("/tsv/cat.png") == 1         # two lines, one download
    assert server.hits("/tsv/slow.png") == 3        # timeout: 1 + 2 retries
    assert set(server.user_agents("/tsv/ok.png")) == {UA}


def test_tsv_job_records_are_intact(tsv_job):
    records = read_dataset(tsv_job["out"])
    assert sorted(records) == sorted(tsv_job["expect"])
    for cid, (captions, pixels, lossless) in tsv_job["expect"].items():
        assert sorted(records[cid]["texts"]) == sorted(captions)
        _, got = Images.decode(records[cid]["image/encoded"])
        assert_close(got, pixels, lossless, cid)


# ---------------------------------------------------------------------------------------------
# Round trips through tensorflow-datasets: COCO JSON and WebDataset tars


def test_coco_round_trip_through_tfds(tmp_path):
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    pixels, captions = {}, {}
    images, annotations = [], []
    for image_id in (139, 285, 632, 724):
        data, px = IMAGES.png(400 + image_id)
        name = f"val2017/{image_id:012d}.png"
        (root / name).write_bytes(data)
        images.append({"id": image_id, "file_name": name, "height": px.shape[0],
                       "width": px.shape[1]})
        pixels[f"coco-{image_id}"] = px
        caps = [f"caption {k} of image {image_id}" for k in range(5)]
        if image_id == 285:
            caps[1:4] = NON_ASCII
        captions[f"coco-{image_id}"] = caps
        annotations += [{"id": image_id * 10 + k, "image_id": image_id, "caption": c}
                        for k, c in enumerate(caps)]
    (root / "val2017" / "000000000001.png").write_bytes(IMAGES.png(499)[0])
    images.append({"id": 1, "file_name": "val2017/000000000001.png"})   # no annotation
    annotations.append({"id": 5, "image_id": 4242, "caption": "orphan"})
    json_path = root / "captions_val2017.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations},
                                    ensure_ascii=False), encoding="utf-8")
    out = str(tmp_path / "out")
    s = image_text.run(["--source", "coco", "--input", str(json_path), "--out", out])
    _assert_counts_add_up(s)
    assert (s["inputs"], s["written"], s["duplicates"]) == (6, 4, 0)
    assert dead_by_id(out)["coco-1"] == rec.EMPTY_CAPTION
    assert s["dead_letters"]["by_reason"] == {rec.EMPTY_CAPTION: 1, rec.BAD_SOURCE_LINE: 1}
    examples = _tfds_examples(out)
    assert sorted(examples) == sorted(pixels)
    for cid, ex in examples.items():
        np.testing.assert_array_equal(ex["image"], pixels[cid])
        assert (ex["height"], ex["width"]) == pixels[cid].shape[:2]
        assert ex["texts"] == captions[cid]


def _webdataset_shards(folder):
    """Three shards: plain tar, tar.gz, and a truncated tar. Returns (pattern, expect, dead)."""
    expect, dead = {}, {}
    png1, px1 = IMAGES.png(500)
    webp2, px2 = IMAGES.webp(501)
    jpg3, px3 = IMAGES.jpeg(502)
    write_tar(folder / "shard-000000.tar", [
        ("0001.png", png1), ("0001.txt", NON_ASCII[0].encode("utf-8")),
        ("0002.webp", webp2), ("0002.json", json.dumps(
            {"captions": NON_ASCII[1:], "url": "http://example.com"}).encode("utf-8")),
        ("0003.jpg", jpg3), ("0003.json", b'{"caption": "from json"}'),
        ("0003.txt", b"from txt"),
        ("0003.cls", b"7"),
    ])
    expect["shard-000000.tar/0001"] = ([NON_ASCII[0]], px1, True)
    expect["shard-000000.tar/0002"] = (NON_ASCII[1:], px2, True)
    expect["shard-000000.tar/0003"] = (["from txt", "from json"], px3, False)
    png4, px4 = IMAGES.png(503)
    png7, px7 = IMAGES.png(504)
    write_tar(folder / "shard-000001.tar.gz", [
        ("0004.png", png4), ("0004.txt", b"a gzipped shard"),
        ("0005.jpeg", IMAGES.jpeg(505)[0]),                       # image, no caption
        ("0006.txt", b"caption without an image"),
        ("sub/0007.png", png7), ("sub/0007.txt", b"  in a sub folder  "),
        ("0008.png", IMAGES.png(506)[0]), ("0008.txt", b""),      # empty caption
    ], mode="w:gz")
    expect["shard-000001.tar.gz/0004"] = (["a gzipped shard"], px4, True)
    expect["shard-000001.tar.gz/sub/0007"] = (["in a sub folder"], px7, True)
    dead["shard-000001.tar.gz/0005"] = rec.EMPTY_CAPTION
    dead["shard-000001.tar.gz/0006"] = rec.BAD_SOURCE_LINE
    dead["shard-000001.tar.gz/0008"] = rec.EMPTY_CAPTION
    png9, px9 = IMAGES.png(507)
    full = write_tar(folder / "full.tmp", [
        ("0009.png", png9), ("0009.txt", b"before the cut"),
        ("0010.png", IMAGES.png(508)[0]), ("0010.txt", b"after the cut")])
    import tarfile
    with tarfile.open(full) as tar:
        cut = tar.getmember("0010.png").offset_data + 100
    (folder / "shard-000002.tar").write_bytes(full.read_bytes()[:cut])
    full.unlink()
    expect["shard-000002.tar/0009"] = (["before the cut"], px9, True)
    dead["shard-000002.tar"] = rec.BAD_SOURCE_LINE
    return str(folder / "shard-*.tar*"), expect, dead


def test_webdataset_round_trip_through_tfds(tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    pattern, expect, dead = _webdataset_shards(shards)
    out = str(tmp_path / "out")
    s = image_text.run(["--source", "webdataset", "--input", pattern, "--out", out])
    _assert_counts_add_up(s)
    assert s["written"] == len(expect) and s["inputs"] == len(expect) + len(dead)
    assert dead_by_id(out) == dead
    examples = _tfds_examples(out)
    assert sorted(examples) == sorted(expect)
    for cid, (captions, pixels, lossless) in expect.items():
        assert examples[cid]["texts"] == captions, cid
        assert_close(examples[cid]["image"], pixels, lossless, cid)
        if lossless:
            np.testing.assert_array_equal(examples[cid]["image"], pixels)


# ---------------------------------------------------------------------------------------------
# Flags, runners, the tokenizer hook


@pytest.mark.parametrize("argv, message", [
    (["--source", "manifest", "--input", "/no/such/manifest.jsonl"], "no such file"),
    (["--source", "webdataset", "--input", "/no/such/shard-*.tar"], "no such file"),
    (["--source", "pictures", "--input", "x"], "--source"),
    (["--source", "tsv"], "--input"),
    (["--source", "tsv", "--input", "{tsv}", "--timeout", "0"], "--timeout"),
    (["--source", "tsv", "--input", "{tsv}", "--retries", "-1"], "--retries"),
    (["--source", "tsv", "--input", "{tsv}", "--max_download_bytes", "0"],
     "--max_download_bytes"),
    (["--source", "tsv", "--input", "{tsv}", "--image_dir", "/x"], "--image_dir"),
    (["--source", "coco", "--input", "{tsv}", "--image_dir", "/no/such/dir"], "--image_dir"),
    (["--source", "tsv", "--input", "{tsv}", "--no_such_flag", "1"], "no_such_flag"),
    (["--source", "manifest", "--input", "{csv}"], "lacks column"),
])
def test_bad_flags_are_one_line_errors(tmp_path, argv, message):
    tsv = tmp_path / "x.tsv"
    tsv.write_text("a\thttp://127.0.0.1/x.png\n")
    bad_csv = tmp_path / "x.csv"
    bad_csv.write_text("path,text\na.jpg,hello\n")
    argv = [a.replace("{tsv}", str(tsv)).replace("{csv}", str(bad_csv)) for a in argv]
    argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(job_flags.FlagError) as e:
        image_text.run(argv)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out" / dataset_writer.STATS_FILE)


def test_main_prints_one_line_for_bad_flags(capsys):
    assert image_text.main(["--source", "tsv", "--input", "/nope.tsv", "--out", "/tmp/x"]) == 2
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("error:") and "\n" not in printed


def test_multi_processing_runner(tmp_path, http_server):
    """Every DoFn pickles into worker processes (DirectRunner multi_processing)."""
    local, local_px = IMAGES.png(600)
    remote, remote_px = IMAGES.png(601)
    (tmp_path / "local.png").write_bytes(local)
    http_server.routes["/mp/remote.png"] = Route(body=remote)
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "local", "image": "local.png", "caption": "on disk"},
        {"id": "remote", "image": http_server.url("/mp/remote.png"), "caption": "over http"},
        {"id": "gone", "image": http_server.url("/mp/gone.png"), "caption": "404"},
        "not json"])
    out = str(tmp_path / "out")
    s = image_text.run(["--source", "manifest", "--input", str(manifest), "--out", out,
                        "--direct_running_mode", "multi_processing", "--direct_num_workers", "2",
                        "--timeout", "2", "--retries", "1", "--backoff", "0.01"])
    _assert_counts_add_up(s)
    assert (s["inputs"], s["written"]) == (4, 2)
    assert dead_by_id(out).get("gone") == rec.DOWNLOAD_HTTP_ERROR
    records = read_dataset(out)
    assert records["local"]["image/encoded"] == local
    assert records["remote"]["image/encoded"] == remote


def test_vocab_size_trains_a_tokenizer(tmp_path):
    """The tokenizer hook: --vocab_size > 0 writes tokenizer.model next to the shards."""
    pytest.importorskip("keras_mm.beam_jobs.tokenizer")
    shards = tmp_path / "wds"
    shards.mkdir()
    words = ["dog", "cat", "grass", "runs", "sleeps", "red", "blue", "big", "small", "the"]
    rng = np.random.default_rng(0)
    members = []
    for i in range(40):
        members.append((f"{i:04d}.png", IMAGES.png(700 + i)[0]))
        members.append((f"{i:04d}.txt", " ".join(rng.choice(words, 6)).encode()))
    write_tar(shards / "s-0.tar", members)
    out = str(tmp_path / "out")
    s = image_text.run(["--source", "webdataset", "--input", str(shards / "*.tar"), "--out", out,
                        "--vocab_size", "300", "--split_fractions", "1,0,0"])
    assert s["written"] == 40
    import sentencepiece as spm

    model = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    assert 260 < model.get_piece_size() <= 300
    assert model.decode(model.encode("the big dog runs")) == "the big dog runs"
