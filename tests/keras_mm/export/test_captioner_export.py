"""keras_mm.export.captioner: the SavedModel captions (and answers) in-graph exactly as the Keras
captioner does, in a process that imports only tensorflow and tensorflow_text.

Each captioner (CoCa, CapPa, MaMMUT, PaLI-style; tiny models shrunk for speed) is trained 120
steps on real photos (scikit-image's and scikit-learn's bundled ones) with hand-written captions,
so its captions differ from image to image, then exported. One fresh interpreter loads all four
exports and runs every signature on PNG and JPEG bytes. The references are the Keras model's
``generate`` on the eval pipeline's own preprocessing (``eval_image_ops``),
detokenized with the tokenizer: the strings must be identical.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mm.export import captioner as export_lib
from keras_mm.export import serve, warmup
from keras_mm.export import two_tower
from keras_mm.models.captioners import build_captioner
from keras_mm.pipelines import datasets
from keras_mm.pipelines.tokenizer import Tokenizer, train_sentencepiece

MAX_LEN = 12                       # tokens incl. BOS / EOS: captions of at most 11 tokens
IMAGE = dict(image_size=32, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)
# the recipes' convolutional stem on two of the four, the hybrid CNN stem on CoCa, the
# patchify stem on the PaLI-style model
CONV_STEM = {"cappa": dict(stem="conv"), "mammut": dict(stem="conv"), "coca": dict(stem="cnn")}
DECODER = dict(width=32, depth=2, heads=2, mlp_dim=64)
# kind -> (decoder overrides, model kwargs, export kwargs). CoCa keeps the preset's 2 unimodal
# blocks and needs one multimodal block after them; CapPa exports beam search, MaMMUT a shorter
# max_length, so the export's decode settings are checked as well.
KINDS = {
    "coca": (dict(DECODER, depth=3), dict(pooler_heads=2, num_caption_queries=4), {}),
    "cappa": (DECODER, {}, dict(method="beam", beam_size=3, length_penalty=0.5)),
    "mammut": (DECODER, {}, dict(max_length=6)),
    "pali": (DECODER, dict(encoder_depth=1, max_prompt_len=8), {}),
}
# Enough for every model to caption its photos from memory (at 80 steps CoCa and MaMMUT still
# mix them up): well-separated logits, so graph and eager decoding cannot tip a near tie.
TRAIN_STEPS = 120
PROMPT_LEN = 8
QUESTION = "what is in the photo?"
UNSEEN_QUESTION = "Is it RED?"
LABELS = ["cat", "rocket", "flower"]
NOT_AN_IMAGE = b"this is not an image at all"


def _photos():
    """[(name, uint8 [H, W, 3], caption, answer)]: real photos with hand-written captions."""
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    photos = [("china", china, "a temple roof among green trees", "temple"),
              ("flower", flower, "a pink flower with a yellow centre", "flower")]
    try:
        from skimage import data
    except ImportError:                # the sklearn photos upside down as two more images
        return photos + [("china_flipped", china[::-1], "an upside down temple", "temple"),
                         ("flower_flipped", flower[::-1], "an upside down flower", "flower")]
    return photos + [
        ("astronaut", data.astronaut(), "an astronaut in a white suit next to a flag",
         "astronaut"),
        ("cat", data.chelsea(), "an orange cat looking to the side", "cat"),
        ("coffee", data.coffee(), "a cup of coffee on a saucer", "coffee"),
        ("rocket", data.rocket(), "a rocket standing on the launch pad", "rocket"),
    ]


PHOTOS = _photos()
CAPTIONS = [p[2] for p in PHOTOS]
ANSWERS = [p[3] for p in PHOTOS]


def _encoded():
    """Encoded bytes of every photo, PNG and JPEG alternating (the scikit-learn ones are the
    original JPEG files)."""
    from sklearn import datasets as sk_datasets

    folder = os.path.join(os.path.dirname(sk_datasets.__file__), "images")
    out = []
    for i, (name, pixels, _, _) in enumerate(PHOTOS):
        path = os.path.join(folder, f"{name}.jpg")
        if os.path.exists(path):
            with open(path, "rb") as f:
                out.append(f.read())
        elif i % 2:
            out.append(tf.io.encode_jpeg(pixels, quality=90).numpy())
        else:
            out.append(tf.io.encode_png(pixels).numpy())
    return out


# Runs in a fresh interpreter: tensorflow and tensorflow_text only.
LOADER = r'''
import base64, json, sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  registers the SentencePiece ops

spec = json.load(open(sys.argv[1]))
images = [base64.b64decode(b) for b in spec["images"]]
good, bad = images[0], base64.b64decode(spec["not_image"])


def strings(x):
    return [s.decode("utf-8") for s in x.numpy().tolist()]


def error(fn, **inputs):
    try:
        fn(**{k: tf.constant(v, tf.string) for k, v in inputs.items()})
        return ["no error", ""]
    except Exception as e:  # noqa: BLE001  recorded for the test to judge
        return [type(e).__name__, getattr(e, "message", str(e))]


results = {}
for kind, export_dir in spec["exports"].items():
    sigs = tf.saved_model.load(export_dir).signatures
    out = {"signatures": {
        name: {"inputs": {k: [v.dtype.name, v.shape.as_list()]
                          for k, v in fn.structured_input_signature[1].items()},
               "outputs": {k: [v.dtype.name, v.shape.as_list()]
                           for k, v in fn.structured_outputs.items()}}
        for name, fn in sigs.items()}}
    batch = tf.constant(images)
    out["caption"] = strings(sigs["caption"](image_bytes=batch)["caption"])
    out["serving_default"] = strings(sigs["serving_default"](image_bytes=batch)["caption"])
    out["caption_one"] = strings(sigs["caption"](image_bytes=batch[1:2])["caption"])
    out["caption_none"] = strings(sigs["caption"](image_bytes=tf.zeros([0], tf.string))["caption"])
    out["errors"] = {"not_image": error(sigs["caption"], image_bytes=[good, bad]),
                     "empty_image": error(sigs["caption"], image_bytes=[good, good, b""])}
    if "caption_parallel" in sigs:
        out["caption_parallel"] = strings(sigs["caption_parallel"](image_bytes=batch)["caption"])
    if "answer" in sigs:
        questions = spec["questions"][:len(images)]
        out["answer"] = strings(sigs["answer"](image_bytes=batch,
                                               question=tf.constant(questions))["answer"])
        out["errors"]["empty_question"] = error(sigs["answer"], image_bytes=[good, good],
                                                question=["what?", "  "])
        out["errors"]["count_mismatch"] = error(sigs["answer"], image_bytes=[good, good],
                                                question=["what?"])
        out["errors"]["answer_not_image"] = error(sigs["answer"], image_bytes=[bad],
                                                  question=["what?"])
    if "embed_image" in sigs:
        out["embed_image"] = sigs["embed_image"](image_bytes=batch)["embedding"].numpy().tolist()
        out["classify"] = sigs["classify"](image_bytes=batch, labels=tf.constant(
            spec["labels"]))["scores"].numpy().tolist()
    # Which search is in the graph: beam search ranks with TopKV2 (in the while loop body, a
    # function of the graph's library), greedy search takes an argmax.
    graph = sigs["caption"].graph.as_graph_def()
    op_types = {n.op for n in graph.node} | {n.op for f in graph.library.function
                                             for n in f.node_def}
    out["caption_ops"] = sorted(op_types & {"TopKV2", "ArgMax", "While", "StatelessWhile"})
    out["caption_after_errors"] = strings(sigs["caption"](image_bytes=batch)["caption"])
    results[kind] = out
results["keras_mm_imported"] = any(m.split(".")[0] == "keras_mm" for m in sys.modules)
print(json.dumps(results))
'''


def _pixels(config, images):
    """Encoded images -> float32 [N, S, S, 3] by the eval pipeline's own preprocessing."""
    preprocess = datasets.eval_image_ops(config)
    return tf.stack([preprocess({"image/encoded": tf.constant(b)})["image"] for b in images])


def _prompt_ids(tokenizer, texts):
    """Prompts as the training pipeline tokenizes them (no BOS, EOS-terminated)."""
    return tokenizer.tokenize(tf.constant(texts), PROMPT_LEN, add_bos=False, add_eos=True)


def _train_examples(kind, tokenizer, config):
    """One batch: every photo with its caption; PaLI also answers QUESTION about each."""
    pixels = _pixels(config, _encoded())
    tokens = tokenizer.tokenize(tf.constant(CAPTIONS), MAX_LEN, add_bos=True, add_eos=True)
    if kind != "pali":
        return {"image": pixels, "text": tokens}
    answers = tokenizer.tokenize(tf.constant(ANSWERS), MAX_LEN, add_bos=True, add_eos=True)
    n = len(PHOTOS)
    return {"image": tf.concat([pixels, pixels], 0),
            "prompt": _prompt_ids(tokenizer, [config.caption_prompt] * n + [QUESTION] * n),
            "text": tf.concat([tokens, answers], 0)}


def _strings(tokenizer, tokens):
    return [s.decode("utf-8").strip() for s in tokenizer.detokenize(tokens).numpy().tolist()]


def _keras_generate(model, tokenizer, config, images, decode, prompts=None):
    """The Keras model's strings for encoded images: eval preprocessing, generate, detokenize."""
    kwargs = dict(decode)
    if prompts is not None:
        kwargs["prompt"] = _prompt_ids(tokenizer, prompts)
    return _strings(tokenizer, model.generate(_pixels(config, images), **kwargs))


@pytest.fixture(scope="module")
def sp_model():
    questions = [QUESTION, UNSEEN_QUESTION, "caption en"] + LABELS
    return train_sentencepiece(CAPTIONS + ANSWERS + questions, vocab_size=330)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, sp_model):
    """kind -> dict(model, tokenizer, config, export_dir, keras reference strings), and the
    fresh interpreter's results for all four exports."""
    images = _encoded()
    root = tmp_path_factory.mktemp("captioners")
    made = {}
    for seed, (kind, (decoder, model_kwargs, export_kwargs)) in enumerate(sorted(KINDS.items())):
        keras.utils.set_random_seed(seed)
        # Made after seeding: tf.random.set_seed clears the eager kernel cache, which destroys
        # the SentencePiece resource of an earlier tokenizer.
        tokenizer = Tokenizer(sp_model, max_len=MAX_LEN)
        config = datasets.InputConfig(image_size=32, eval_mode="resize", add_bos=True,
                                      max_text_len=MAX_LEN, max_prompt_len=PROMPT_LEN)
        model = build_captioner(kind, "tiny", vocab_size=tokenizer.vocab_size, max_len=MAX_LEN,
                                image_overrides=dict(IMAGE, **CONV_STEM.get(kind, {})),
                                decoder_overrides=decoder, **model_kwargs)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=False)
        x = _train_examples(kind, tokenizer, config)
        model.fit(tf.data.Dataset.from_tensors(x).repeat(), steps_per_epoch=TRAIN_STEPS, epochs=1,
                  verbose=0)
        export_dir = str(root / kind / "1")
        returned = export_lib.export_captioner(model, tokenizer, config, export_dir,
                                               class_names=LABELS if kind == "coca" else None,
                                               **export_kwargs)
        assert returned == export_dir
        decode = export_lib.decode_settings(model, **export_kwargs)
        prompts = [config.caption_prompt] * len(images) if kind == "pali" else None
        reference = {"caption": _keras_generate(model, tokenizer, config, images, decode,
                                                prompts)}
        if kind == "pali":
            questions = [QUESTION, UNSEEN_QUESTION] * len(images)
            reference["answer"] = _keras_generate(model, tokenizer, config, images, decode,
                                                  questions[:len(images)])
        if kind == "cappa":
            reference["caption_parallel"] = _strings(tokenizer, model.parallel_decode(
                _pixels(config, images), max_length=decode["max_length"]))
        if kind in export_lib.CONTRASTIVE_FAMILIES:
            reference["embed_image"] = np.asarray(model.embed_image(_pixels(config, images)))
        made[kind] = dict(model=model, tokenizer=tokenizer, config=config, decode=decode,
                          export_dir=export_dir, reference=reference)

    spec = root / "spec.json"
    spec.write_text(json.dumps({
        "exports": {k: v["export_dir"] for k, v in made.items()},
        "images": [base64.b64encode(b).decode() for b in images],
        "not_image": base64.b64encode(NOT_AN_IMAGE).decode(),
        "questions": [QUESTION, UNSEEN_QUESTION] * len(images), "labels": LABELS}))
    proc = subprocess.run([sys.executable, "-c", LOADER, str(spec)], capture_output=True,
                          text=True, timeout=600, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return made, json.loads(proc.stdout.strip().splitlines()[-1])



@pytest.mark.slow  # the shared fixture trains and exports four captioners (~1.5 min)
def test_fresh_process_does_not_import_keras_mm(exports):
    _, results = exports
    assert results["keras_mm_imported"] is False


@pytest.mark.slow  # the shared fixture trains and exports four captioners (~1.5 min)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_caption_equals_the_keras_model(exports, kind):
    made, results = exports
    out, reference = results[kind], made[kind]["reference"]
    assert out["caption"] == reference["caption"], kind
    assert out["serving_default"] == out["caption"]
    # Trained captions, not a degenerate constant: non-empty and not all the same.
    assert all(out["caption"]) and len(set(out["caption"])) > 1, out["caption"]
    # The batch is dynamic and examples do not interact (greedy and beam search alike).
    assert out["caption_one"] == out["caption"][1:2]
    assert out["caption_none"] == []
    if kind == "cappa":
        assert out["caption_parallel"] == reference["caption_parallel"]
    # The search runs in a graph while loop; only the beam export (CapPa) ranks with top-k.
    assert {"While", "StatelessWhile"} & set(out["caption_ops"]), out["caption_ops"]
    assert ("TopKV2" in out["caption_ops"]) == (made[kind]["decode"]["method"] == "beam")


@pytest.mark.slow  # the shared fixture trains and exports four captioners (~1.5 min)
def test_pali_answers_equal_the_keras_model(exports):
    made, results = exports
    out = results["pali"]
    assert out["answer"] == made["pali"]["reference"]["answer"]
    assert all(out["answer"])
    # The question matters: the trained question gets the trained one-word answer.
    trained = [a for a, q in zip(out["answer"], [QUESTION, UNSEEN_QUESTION] * 4) if q == QUESTION]
    assert any(a in ANSWERS for a in trained), out["answer"]


@pytest.mark.slow  # the shared fixture trains and exports four captioners (~1.5 min)
def test_contrastive_captioners_keep_the_two_tower_signatures(exports):
    made, results = exports
    for kind in export_lib.CONTRASTIVE_FAMILIES:
        out = results[kind]
        np.testing.assert_allclose(np.asarray(out["embed_image"]),
                                   made[kind]["reference"]["embed_image"], atol=1e-4, rtol=0)
        scores = np.asarray(out["classify"])
        assert scores.shape == (len(PHOTOS), len(LABELS))
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)   # softmax heads


@pytest.mark.slow  # the shared fixture trains and exports four captioners (~1.5 min)
def test_signatures(exports):
    _, results = exports
    caption = {"inputs": {"image_bytes": ["string", [None]]},
               "outputs": {"caption": ["string", [None]]}}
    two_tower_names = {"embed_image", "embed_text", "classify"}
    expected = {"coca": {"caption", "serving_default", "classify_classes"} | two_tower_names,
                "mammut": {"caption", "serving_default"} | two_tower_names,
                "cappa": {"caption", "caption_parallel", "serving_default"},
                "pali": {"caption", "answer", "serving_default"}}
    for kind, names in expected.items():
        signatures = results[kind]["signatures"]
        assert set(signatures) == names, kind
        assert signatures["caption"] == caption and signatures["serving_default"] == caption
    assert results["cappa"]["signatures"]["caption_parallel"] == caption
    assert results["pali"]["signatures"]["answer"] == {
        "inputs": {"image_bytes": ["string", [None]], "question": ["string", [None]]},
        "outputs": {"answer": ["string", [None]]}}


@pytest.mark.slow  # the shared fixture trains and exports four captioners (~1.5 min)
def test_bad_inputs_give_clear_errors_and_the_model_keeps_working(exports):
    _, results = exports
    expected = {
        "not_image": "image_bytes[1] is not a JPEG/PNG/GIF/BMP image",
        "empty_image": "image_bytes[2] is empty",
        "empty_question": "question[1] is empty (or only whitespace)",
        "count_mismatch": "answer takes one question per image: image_bytes has 2 elements, "
                          "question 1",
        "answer_not_image": "image_bytes[0] is not a JPEG/PNG/GIF/BMP image",
    }
    for kind in KINDS:
        out = results[kind]
        for case, (error, message) in out["errors"].items():
            assert error == "InvalidArgumentError", (kind, case, error, message)
            assert expected[case] in message, (kind, case, message)
        assert len(out["errors"]) == (5 if kind == "pali" else 2)
        assert out["caption_after_errors"] == out["caption"]


@pytest.mark.slow  # the shared fixture trains and exports four captioners (~1.5 min)
def test_export_info_and_warmup_requests(exports):
    made, _ = exports
    for kind, entry in made.items():
        info = two_tower.read_export_info(entry["export_dir"])
        assert info["model"] == kind
        assert info["default_signature"] == "caption"
        assert info["decode"] == entry["decode"]
        assert info["image_size"] == 32 and info["max_len"] == MAX_LEN and info["add_bos"]
        assert info["vocab_size"] == entry["tokenizer"].vocab_size
        assert info["signatures"]["caption"] == {
            "inputs": {"image_bytes": {"dtype": "string", "shape": [None]}},
            "outputs": {"caption": {"dtype": "string", "shape": [None]}}}
        logs = warmup.read_warmup_requests(entry["export_dir"])
        names = sorted(log.predict_log.request.model_spec.signature_name for log in logs)
        assert names == sorted(list(info["signatures"]) + ["serving_default"]), (kind, names)
    assert made["cappa"]["decode"] == {"method": "beam", "beam_size": 3, "length_penalty": 0.5,
                                       "max_length": MAX_LEN - 1}
    assert made["mammut"]["decode"]["max_length"] == 6
    assert made["coca"]["decode"]["max_length"] == MAX_LEN - 1
    pali = two_tower.read_export_info(made["pali"]["export_dir"])
    assert pali["caption_prompt"] == "caption en" and pali["max_prompt_len"] == PROMPT_LEN
    coca = two_tower.read_export_info(made["coca"]["export_dir"])
    assert coca["templates"] == ["{}"] and coca["class_names"] == LABELS


@pytest.mark.slow  # the shared fixture trains and exports four captioners (~1.5 min)
def test_kmm_serve_answers_over_rest(exports):
    """``kmm serve``'s REST API (TF Serving's row format) serves the two-input ``answer``."""
    made, results = exports
    entry = made["pali"]
    model = serve.ServedModel("pali", os.path.dirname(entry["export_dir"]))
    assert model.refresh()
    api = serve.RestApi([model])
    images = _encoded()[:2]
    body = json.dumps({"signature_name": "answer", "instances": [
        {"image_bytes": {"b64": base64.b64encode(b).decode()}, "question": q}
        for b, q in zip(images, [QUESTION, UNSEEN_QUESTION])]}).encode()
    status, payload = api.handle("POST", "/v1/models/pali:predict", body)
    assert status == 200, payload
    assert payload == {"predictions": results["pali"]["answer"][:2]}
    status, payload = api.handle("POST", "/v1/models/pali:predict", json.dumps(
        {"instances": [{"b64": base64.b64encode(NOT_AN_IMAGE).decode()}]}).encode())
    assert status == 400 and "image_bytes[0] is not a JPEG/PNG/GIF/BMP image" in payload["error"]


def test_rejects_sampling_bad_settings_and_other_models(tmp_path):
    from keras_mm.models.two_tower import TwoTowerModel

    model = build_captioner("cappa", "tiny", vocab_size=300, max_len=MAX_LEN,
                            image_overrides=IMAGE, decoder_overrides=DECODER)
    assert export_lib.decode_settings(model) == {
        "method": "greedy", "beam_size": 4, "length_penalty": 0.6, "max_length": MAX_LEN - 1}
    with pytest.raises(ValueError, match="not exported"):
        export_lib.decode_settings(model, "sample")
    with pytest.raises(ValueError, match="method must be one of"):
        export_lib.decode_settings(model, "nucleus")
    with pytest.raises(ValueError, match="max_length must be in"):
        export_lib.decode_settings(model, max_length=MAX_LEN)
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        export_lib.decode_settings(model, "beam", beam_size=0)
    config = datasets.InputConfig(image_size=32, eval_mode="resize", max_text_len=MAX_LEN)
    with pytest.raises(ValueError, match="not a captioner: model family 'two_tower'"):
        export_lib.export_captioner(TwoTowerModel(None, None), None, config,
                                    str(tmp_path / "x" / "1"))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # the shared fixture trains and exports four captioners (~1.5 min)
def test_export_model_dispatches_captioners(exports, tmp_path):
    from keras_mm.recipes.config import CaptionerConfig
    from keras_mm.training.commands import export_model

    entry = exports[0]["cappa"]
    export_dir = str(tmp_path / "cappa" / "1")
    export_model(entry["model"], entry["tokenizer"], entry["config"], None, export_dir,
                 captioner=CaptionerConfig(decode="greedy", max_decode_len=4))
    info = two_tower.read_export_info(export_dir)
    assert info["model"] == "cappa" and info["decode"]["method"] == "greedy"
    assert info["decode"]["max_length"] == 4
