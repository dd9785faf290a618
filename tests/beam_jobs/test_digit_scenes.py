"""digit-scenes: images, captions and QA checked against an independent reading of the layout.

Expected values come from the test's own computations: the split of every source digit from
label-as-text's own digits source, pixels from PIL resizing the sklearn digit, regions /
relations / orders / counts from box centres computed here, captions and questions parsed with
regular expressions written from the grammar in the module docstring.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from keras_mm.beam_jobs import dataset_writer, digit_scenes, image_text, job_flags
from keras_mm.pipelines.ops.text import normalize_text_py
from tests.beam_jobs.image_samples import read_dataset

SPLITS = ("train", "validation", "test")
COUNT = {"zero": 0, "one": 1, "two": 2, "three": 3}
SIZE_RANGE_64 = {"small": (12, 16), "large": (24, 30)}   # the docstring's numbers at S = 64
DIGIT = r"(?:a (small|large) (\d)|(an?) (\d))"


@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


@pytest.fixture(scope="module")
def label_as_text_split():
    """{sklearn index: split} as the label-as-text job's digits source assigns it."""
    from keras_mm.beam_jobs import label_as_text

    fn = label_as_text._DigitsCandidates((0.8, 0.1, 0.1), ["a {}"], ["the {}"])
    fn.setup()
    return {int(c.id.split("-")[1]): c.split for c in fn.process((0, 1797))}


def _scenes(split="train", n=120, seed=0, canvas_size=64):
    return [digit_scenes.generate_scene(split, i, seed=seed, canvas_size=canvas_size)
            for i in range(n)]


# --------------------------------------------------------------------------- independent geometry


def _centre(item):
    return item["x"] + item["w"] / 2, item["y"] + item["h"] / 2


def _region(item, s):
    cx, cy = _centre(item)
    col = "left" if cx < s / 3 else "right" if cx > 2 * s / 3 else None
    row = "top" if cy < s / 3 else "bottom" if cy > 2 * s / 3 else None
    return " ".join(p for p in (row, col) if p) or "centre"


def _region_phrase(item, s):
    name = _region(item, s)
    return {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
            "right": "on the right"}.get(name, f"in the {name}")


def _holds(rel, a, b):
    """Is ``a`` <rel> ``b`` by the documented rule (vertical when |dy| > |dx|)?"""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    dx, dy = ax - bx, ay - by
    vertical = abs(dy) > abs(dx)
    return {"to the left of": not vertical and dx < 0, "to the right of": not vertical and dx > 0,
            "above": vertical and dy < 0, "below": vertical and dy > 0}[rel]


def _matches(item, size, digit):
    return item["digit"] == int(digit) and (size is None or item["size"] == size)


def _phrases(text):
    """"a small 3, an 8 and a 9" -> [(size or None, digit)]; checks the article."""
    out = []
    for part in re.split(r", | and ", text):
        m = re.fullmatch(DIGIT, part)
        assert m, f"not a digit phrase: {part!r} in {text!r}"
        if m.group(2):
            out.append((m.group(1), m.group(2)))
        else:
            assert m.group(3) == ("an" if m.group(4) == "8" else "a"), part
            out.append((None, m.group(4)))
    return out


def _check_caption(caption, layout, s):
    """Asserts one caption is a grammar template and true for the layout; returns its kind."""
    if m := re.fullmatch(r"(.+) (to the left of|to the right of|above|below) (.+)", caption):
        (sa, da), (sb, db) = _phrases(m.group(1)) + _phrases(m.group(3))
        assert len(layout) == 2, caption
        assert any(_matches(a, sa, da) and _matches(b, sb, db) and _holds(m.group(2), a, b)
                   for a, b in itertools.permutations(layout, 2)), (caption, layout)
        return "relation"
    if m := re.fullmatch(r"(.+) from (left to right|top to bottom)", caption):
        listed = _phrases(m.group(1))
        axis = 0 if m.group(2) == "left to right" else 1
        assert len(listed) == len(layout) == 3, caption
        assert any(all(_matches(item, *p) for item, p in zip(order, listed))
                   and all(_centre(u)[axis] < _centre(v)[axis] for u, v in zip(order, order[1:]))
                   for order in itertools.permutations(layout)), (caption, layout)
        return "order"
    if re.fullmatch(r"(one|two|three) (large|small) digits?( and (one|two|three) small digits?)?",
                    caption):
        counts = {size: COUNT[n] for n, size in re.findall(r"(one|two|three) (large|small)",
                                                            caption)}
        for size in ("large", "small"):
            assert counts.get(size, 0) == sum(i["size"] == size for i in layout), caption
        plural = re.findall(r"(one|two|three) \w+ digit(s?)", caption)
        assert all((n == "one") == (not s_) for n, s_ in plural), caption
        return "count"
    if m := re.fullmatch(r"(.+) (in the .+|at the .+|on the .+)", caption):
        (size, digit), = _phrases(m.group(1))
        (item,) = layout
        assert _matches(item, size, digit) and m.group(2) == _region_phrase(item, s), caption
        return "region"
    if re.fullmatch(rf"{DIGIT} and {DIGIT}", caption):
        listed = _phrases(caption)
        assert sorted(int(d) for _, d in listed) == sorted(i["digit"] for i in layout), caption
        return "pair"
    (size, digit), = _phrases(caption)
    (item,) = layout
    assert _matches(item, size, digit), caption
    return "single"


def _expected_answer(question, layout, s):
    """``(template, answer)``, the answer computed here from the layout; asserts the question
    is well-posed."""
    digits = [i["digit"] for i in layout]
    words = ["zero", "one", "two", "three"]
    if question == "how many digits are there?":
        return "count", words[len(layout)]
    if m := re.fullmatch(r"how many (small|large) digits are there\?", question):
        return "count size", words[sum(i["size"] == m.group(1) for i in layout)]
    if m := re.fullmatch(r"(?:is the (\d) small or large|where is the (\d))\?", question):
        d = int(m.group(1) or m.group(2))
        (item,) = [i for i in layout if i["digit"] == d]   # asked only about a unique digit
        return ("size", item["size"]) if m.group(1) else ("where", _region(item, s))
    if m := re.fullmatch(r"what digit is (to the left of|to the right of|above|below) the (\d)\?",
                         question):
        assert len(layout) == 2 and digits[0] != digits[1]
        (ref,) = [i for i in layout if i["digit"] == int(m.group(2))]
        (other,) = [i for i in layout if i is not ref]
        assert _holds(m.group(1), other, ref), (question, layout)
        return "relation", str(other["digit"])
    if m := re.fullmatch(r"what is the (first|second|third) digit from the (left|top)\?", question):
        axis = 0 if m.group(2) == "left" else 1
        ordered = sorted(layout, key=lambda i: _centre(i)[axis])
        return "order", str(ordered[("first", "second", "third").index(m.group(1))]["digit"])
    if question == "which digit is the biggest?":
        (large,) = [i for i in layout if i["size"] == "large"]
        assert len(layout) >= 2
        return "biggest", str(large["digit"])
    if question == "what is the highest number?":
        assert len(layout) >= 2
        return "highest", str(max(digits))
    raise AssertionError(f"question outside the grammar: {question!r}")


# --------------------------------------------------------------------------- source digits


def test_split_by_source_digit_is_label_as_texts(label_as_text_split):
    for split, count in zip(SPLITS, (1454, 174, 169)):
        pool = digit_scenes.digit_pool(split)
        assert len(pool.indices) == count
        assert all(label_as_text_split[int(i)] == split for i in pool.indices)
    assert all(digit_scenes.source_digit_split(i) == s for i, s in label_as_text_split.items())


@pytest.mark.parametrize("split", SPLITS)
def test_scenes_use_only_their_splits_digits(split, label_as_text_split, sklearn_digits):
    _, labels = sklearn_digits
    for scene in _scenes(split, n=150):
        sources = [item["source"] for item in scene.layout]
        assert len(set(sources)) == len(sources)
        assert all(label_as_text_split[i] == split for i in sources), (scene.id, sources)
        assert all(item["digit"] == labels[item["source"]] for item in scene.layout)


# --------------------------------------------------------------------------- images and layouts


@pytest.mark.parametrize("canvas_size", [64, 32, 100])
def test_image_is_the_layout(canvas_size, sklearn_digits):
    """Boxes inside the canvas, apart, of the documented sizes; pixels = the resized digits."""
    images, _ = sklearn_digits
    s = canvas_size
    small = (round(3 * s / 16), s // 4)
    large = (round(3 * s / 8), round(15 * s / 32))
    if s == 64:
        assert (small, large) == (SIZE_RANGE_64["small"], SIZE_RANGE_64["large"])
    counts = {1: 0, 2: 0, 3: 0}
    for scene in _scenes("validation", n=90, canvas_size=s):
        image, layout = scene.image, scene.layout
        assert image.shape == (s, s, 3) and image.dtype == np.uint8
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
        counts[len(layout)] += 1
        expected = np.zeros((s, s), np.uint8)
        for item in layout:
            x, y, w, h = item["x"], item["y"], item["w"], item["h"]
            lo, hi = small if item["size"] == "small" else large
            assert w == h and lo <= w <= hi and 0 <= x <= s - w and 0 <= y <= s - h, item
            grey = np.round(images[item["source"]] * 255 / 16).astype(np.uint8)
            expected[y:y + h, x:x + w] = np.asarray(
                Image.fromarray(grey).resize((w, h), Image.BILINEAR))
        for a, b in itertools.combinations(layout, 2):
            assert (a["x"] + a["w"] < b["x"] or b["x"] + b["w"] < a["x"]
                    or a["y"] + a["h"] < b["y"] or b["y"] + b["h"] < a["y"]), (a, b)
            assert _centre(a)[0] != _centre(b)[0] and _centre(a)[1] != _centre(b)[1]
        np.testing.assert_array_equal(image[..., 0], expected)
    assert all(counts.values()), counts


def test_scenes_are_deterministic_per_seed_and_index():
    a, b = _scenes(n=20), _scenes(n=20)
    other = _scenes(n=20, seed=1)
    for x, y, z in zip(a, b, other):
        np.testing.assert_array_equal(x.image, y.image)
        assert (x.layout, x.captions, x.questions, x.answers) == (
            y.layout, y.captions, y.questions, y.answers)
    assert sum(x.layout != z.layout for x, z in zip(a, other)) >= 18
    assert len({x.image.tobytes() for x in a}) == 20


def test_make_scene_takes_any_pool_and_generator(sklearn_digits):
    images, labels = sklearn_digits
    rng = np.random.default_rng(7)
    image, layout = digit_scenes.make_scene(images[:5], labels[:5], rng, 64)
    assert image.shape == (64, 64, 3)
    assert all(0 <= item["source"] < 5 and item["digit"] == labels[item["source"]]
               for item in layout)
    with pytest.raises(ValueError):
        digit_scenes.make_scene(images, labels, rng, 16)


# --------------------------------------------------------------------------- captions and QA


def test_captions_are_true_and_canonical_first():
    kinds = set()
    for canvas_size in (64, 96):
        for scene in _scenes("train", n=200, canvas_size=canvas_size):
            captions = scene.captions
            assert captions == digit_scenes.captions_for(scene.layout, canvas_size)
            assert len(captions) == 4 and len(set(captions)) == 4
            assert all(normalize_text_py(c) == c and c == c.lower() for c in captions)
            found = [_check_caption(c, scene.layout, canvas_size) for c in captions]
            kinds.update(found)
            # canonical: names every digit with its size
            named = sorted((size, int(d)) for size, d in _phrases(
                re.sub(r" (in|at|on) the .+$| from .+$", "", captions[0]).replace(
                    " to the left of ", " and ").replace(" to the right of ", " and ").replace(
                    " above ", " and ").replace(" below ", " and ")))
            assert named == sorted((i["size"], i["digit"]) for i in scene.layout), captions[0]
    assert kinds == {"relation", "order", "count", "region", "pair", "single"}


def test_three_digit_canonical_caption_follows_the_larger_spread():
    for scene in _scenes("test", n=150):
        if len(scene.layout) != 3:
            continue
        xs = [_centre(i)[0] for i in scene.layout]
        ys = [_centre(i)[1] for i in scene.layout]
        direction = "left to right" if max(xs) - min(xs) >= max(ys) - min(ys) else "top to bottom"
        assert scene.captions[0].endswith(f"from {direction}")


def test_answers_are_true():
    asked = set()
    for canvas_size in (64, 48):
        for scene in _scenes("train", n=250, canvas_size=canvas_size):
            qs, ans = scene.questions, scene.answers
            assert 2 <= len(qs) == len(ans) <= 4 and len(set(qs)) == len(qs)
            assert qs[0] == "how many digits are there?"
            for q, a in zip(qs, ans):
                template, expected = _expected_answer(q, scene.layout, canvas_size)
                assert a == expected, (q, a, scene.layout)
                asked.add(template)
            assert all(q.endswith("?") and normalize_text_py(q) == q for q in qs)
    assert len(asked) == 8, asked   # every question template was asked


def test_questions_for_draws_from_the_pool():
    scene = digit_scenes.generate_scene("train", 3)
    pool = digit_scenes.question_pool(scene.layout)
    for seed in range(20):
        qa = digit_scenes.questions_for(scene.layout, np.random.default_rng(seed))
        assert qa[0] == pool[0] and set(qa) <= set(pool)


# --------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def scenes_job(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digit_scenes"))
    summary = image_text.run(["--source", "digit-scenes", "--out", out, "--num_train", "40",
                              "--num_validation", "10", "--num_test", "10",
                              "--records_per_shard", "16", "--seed", "3"])
    return out, summary


def test_job_counts_and_metadata(scenes_job):
    out, s = scenes_job
    assert s["splits"] == {"train": 40, "validation": 10, "test": 10}
    assert (s["written"], s["inputs"], s["dead_letters"]["total"]) == (60, 60, 0)
    assert s["consistent"] is True and s["shards"]["train"] == 3
    with open(os.path.join(out, digit_scenes.METADATA_FILE)) as f:
        meta = json.load(f)
    assert meta["scenes"] == {"train": 40, "validation": 10, "test": 10}
    assert meta["source_digits"] == {"train": 1454, "validation": 174, "test": 169}
    assert (meta["canvas_size"], meta["seed"], meta["grammar_version"]) == (64, 3, 1)


def test_job_records_round_trip(scenes_job):
    out, _ = scenes_job
    records = read_dataset(out)
    assert len(records) == 60
    for split, n in zip(SPLITS, (40, 10, 10)):
        for i in range(n):
            scene = digit_scenes.generate_scene(split, i, seed=3)
            record = records.pop(f"scene-{split}-{i:06d}")
            decoded = np.asarray(Image.open(io.BytesIO(record["image/encoded"])))
            np.testing.assert_array_equal(decoded, scene.image)
            assert (record["image/height"], record["image/width"]) == (64, 64)
            assert record["texts"] == scene.captions
            assert record["questions"] == scene.questions and record["answers"] == scene.answers
    assert not records


def test_job_folder_reads_with_eval_dataset_and_tokenizer(scenes_job):
    import sentencepiece as spm

    from keras_mm.pipelines import datasets

    out, _ = scenes_job
    config = datasets.InputConfig(image_size=64, eval_mode="resize", value_range="0_1",
                                  batch_size=4, eval_texts="all", max_text_len=24)
    tokenizer = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    batches = list(datasets.eval_dataset(out, "test", config))
    ids = [i.decode() for b in batches for i in b["id"].numpy()]
    assert sorted(ids) == [f"scene-test-{i:06d}" for i in range(10)]
    for batch in batches:
        for k, cid in enumerate(batch["id"].numpy()):
            scene = digit_scenes.generate_scene("test", int(cid.decode()[-6:]), seed=3)
            np.testing.assert_allclose(batch["image"][k].numpy() * 255, scene.image, atol=1e-3)
            assert int(batch["num_texts"][k]) == len(scene.captions)
            first = [t for t in batch["text"][k].numpy().tolist() if t > 2]   # no pad / eos
            assert tokenizer.decode(first) == scene.captions[0]
    # the tokenizer learned the questions too: whole words, no byte pieces
    for text in ("how many digits are there?", "a small 3 to the left of a large 7"):
        pieces = tokenizer.encode(text, out_type=str)
        assert not any(p.startswith("<0x") for p in pieces), pieces
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_default_tokenizer_makes_every_word_one_piece():
    """On a corpus of 6000 training scenes every grammar word is a single piece."""
    import sentencepiece as spm

    from keras_mm.pipelines.tokenizer import train_sentencepiece

    texts = []
    for scene in _scenes("train", n=6000):
        texts += scene.captions + scene.questions + scene.answers
    model = spm.SentencePieceProcessor(model_proto=train_sentencepiece(
        texts, digit_scenes.DEFAULT_VOCAB_SIZE, model_type=digit_scenes.TOKENIZER_MODEL_TYPE))
    words = {w for t in texts for w in re.findall(r"[a-z0-9]+", t)}
    assert len(words) > 40
    assert [w for w in words if len(model.encode(w)) != 1] == []
    assert max(len(model.encode(t)) for t in texts) <= 16


@pytest.mark.parametrize("argv, message", [
    (["--source", "digit-scenes", "--input", "x.jsonl"], "--input"),
    (["--source", "manifest"], "needs --input"),
    (["--source", "tsv", "--input", "{tsv}", "--num_train", "5"], "--num_train"),
    (["--source", "sample-photos", "--seed", "1"], "--seed"),
    (["--source", "digit-scenes", "--num_train", "0"], "--num_train"),
    (["--source", "digit-scenes", "--num_test", "-1"], "--num_test"),
    (["--source", "digit-scenes", "--canvas_size", "16"], "--canvas_size"),
    (["--source", "digit-scenes", "--seed", "-2"], "--seed"),
    (["--source", "digit-scenes", "--split_fractions", "1,0,0"], "--split_fractions"),
    (["--source", "digit-scenes", "--num_train", "many"], "--num_train"),
    (["--source", "digit-scenes", "--vocab_size", "-1"], "--vocab_size"),
    (["--source", "sample-photos", "--vocab_size", "300"], "--vocab_size"),
])
def test_bad_flags_are_one_line_errors(tmp_path, argv, message):
    tsv = tmp_path / "x.tsv"
    tsv.write_text("a\thttp://127.0.0.1/x.png\n")
    argv = [a.replace("{tsv}", str(tsv)) for a in argv] + ["--out", str(tmp_path / "out")]
    with pytest.raises(job_flags.FlagError) as e:
        image_text.run(argv)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out" / dataset_writer.STATS_FILE)


def test_cli_help_mentions_the_built_in_sources(capsys):
    from keras_mm import cli

    assert cli.main(["data", "image-text", "--help"]) == 0
    text = capsys.readouterr().out
    assert "digit-scenes" in text and "sample-photos" in text and "--num_train" in text
    assert "digit-scenes" in cli.DATA_JOBS["image-text"][1]


def test_questions_and_answers_are_optional_features():
    """Records without QA are written without the keys and parse to empty lists."""
    import tensorflow as tf
    from tensorflow.core.example import example_pb2

    from keras_mm.pipelines import features as F

    base = {F.IMAGE_ENCODED: b"png", F.IMAGE_HEIGHT: 8, F.IMAGE_WIDTH: 8, F.TEXTS: ["a 3"],
            F.ID: "x"}
    plain = F.serialize(base, F.IMAGE_TEXT)
    assert set(example_pb2.Example.FromString(plain).features.feature) == {
        "image/encoded", "image/height", "image/width", "texts", "id"}
    assert F.deserialize(plain, F.IMAGE_TEXT)["questions"] == []
    parsed = F.parse(tf.constant(plain), F.IMAGE_TEXT)
    assert parsed["questions"].shape == [0] and parsed["answers"].shape == [0]
    qa = F.serialize({**base, F.QUESTIONS: ["how many digits are there?"],
                      F.ANSWERS: ["one"]}, F.IMAGE_TEXT)
    parsed = F.parse(tf.constant(qa), F.IMAGE_TEXT)
    assert parsed["questions"].numpy().tolist() == [b"how many digits are there?"]
    assert F.deserialize(qa, F.IMAGE_TEXT)["answers"] == ["one"]
    with pytest.raises(ValueError, match="same length"):
        F.serialize({**base, F.QUESTIONS: ["q?"]}, F.IMAGE_TEXT)


def test_to_record_carries_questions_and_rejects_unpaired_ones():
    from keras_mm.beam_jobs import records as rec
    from keras_mm.pipelines import features as F

    png = digit_scenes.png_bytes(np.zeros((16, 16, 3), np.uint8))
    paired = rec.Candidate(id="x", captions=("a 3",), image_bytes=png,
                           questions=("where is  the 3?",), answers=("top",))
    (record,) = rec.ToRecord(F.IMAGE_TEXT).process(paired)
    assert record.record[F.QUESTIONS] == ["where is the 3?"] and record.record[F.ANSWERS] == [
        "top"]
    unpaired = rec.Candidate(id="y", captions=("a 3",), image_bytes=png, questions=("q?",))
    (dead,) = rec.ToRecord(F.IMAGE_TEXT).process(unpaired)
    assert dead.tag == rec.DEAD_LETTERS and dead.value.reason == rec.BAD_SOURCE_LINE
