"""keras_mm.export.two_tower: the SavedModel serves what the Keras model computes.

The export is loaded in a subprocess that imports only tensorflow and tensorflow_text (DESIGN.md's
SavedModel contract). References come from the Keras model on the eval pipeline's own
preprocessing (``eval_image_ops``) and the tokenizer's ids; ``classify`` is recomputed here with
NumPy from the Keras text embeddings of ``template.replace("{}", label)`` and the CLIP / SigLIP
formulas. Inputs are real: digit PNGs from a label-as-text folder and a bundled JPEG photo.
"""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mm.encoders.text import TextEncoder
from keras_mm.encoders.vit import ViTEncoder
from keras_mm.export import two_tower as export_lib
from keras_mm.export import warmup
from keras_mm.models.two_tower import TwoTowerModel
from keras_mm.pipelines import datasets
from keras_mm.pipelines.tokenizer import Tokenizer

MAX_LEN = 16
DIM = 32
TEXTS = ["a photo of the number seven.", "zero", "  Ünïcode   CAFÉ text ", "the digit 3"]
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NOT_AN_IMAGE = b"this is not an image at all"
TRUNCATED_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 20

# Each export kind: (loss, model kwargs, InputConfig kwargs). At random init the scores would
# sit where any tolerance accepts them (SigLIP's b = -10 gives ~1e-5; CLIP's t = 1 / 0.07 gives
# ~1 / K): the sigmoid model starts at b = 0, the softmax one at t = 150, which the export must
# clip to 100 as the model does.
KINDS = {
    "sigmoid": ("sigmoid", {"bias_init": 0.0},
                {"eval_mode": "resize", "value_range": "-1_1"}),
    "softmax": ("softmax", {"log_scale_init": math.log(150.0)},
                {"eval_mode": "center_crop", "eval_resize_ratio": 0.875, "value_range": "0_1"}),
}

# Runs in a fresh interpreter: tensorflow and tensorflow_text only.
LOADER = r'''
import base64, json, sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  registers the SentencePiece ops

export_dir, spec_path, out_path = sys.argv[1:4]
with open(spec_path) as f:
    spec = json.load(f)
images = [base64.b64decode(b) for b in spec["images"]]
loaded = tf.saved_model.load(export_dir)
sigs = loaded.signatures

def run(name, **inputs):
    return {k: v.numpy() for k, v in sigs[name](**{k: tf.constant(v, tf.string)
                                                    for k, v in inputs.items()}).items()}

arrays = {}
arrays["embed_image"] = run("embed_image", image_bytes=images)["embedding"]
arrays["embed_text"] = run("embed_text", text=spec["texts"])["embedding"]
arrays["classify"] = run("classify", image_bytes=images, labels=spec["labels"])["scores"]
arrays["serving_default"] = run("serving_default", image_bytes=images,
                                labels=spec["labels"])["scores"]
stored = run("classify_classes", image_bytes=images)
arrays["classify_classes"] = stored["scores"]
arrays["class_index"] = stored["class_index"]
arrays["class_name"] = stored["class_name"].astype(str)

good = images[0]
bad_cases = {
    "not_image": ("embed_image", {"image_bytes": [good, base64.b64decode(spec["not_image"])]}),
    "empty_image": ("embed_image", {"image_bytes": [good, good, b""]}),
    "truncated_png": ("embed_image", {"image_bytes": [base64.b64decode(spec["truncated_png"])]}),
    "classify_not_image": ("classify", {"image_bytes": [base64.b64decode(spec["not_image"])],
                                        "labels": ["one"]}),
    "empty_text": ("embed_text", {"text": ["seven", ""]}),
    "blank_text": ("embed_text", {"text": ["   "]}),
    "empty_label": ("classify", {"image_bytes": [good], "labels": ["one", ""]}),
    "no_labels": ("classify", {"image_bytes": [good], "labels": []}),
}
errors = {}
for case, (name, inputs) in bad_cases.items():
    try:
        run(name, **inputs)
        errors[case] = ["no error", ""]
    except Exception as e:  # noqa: BLE001  recorded for the test to judge
        errors[case] = [type(e).__name__, getattr(e, "message", str(e))]
arrays["embed_image_after_errors"] = run("embed_image", image_bytes=images)["embedding"]
arrays["classify_after_errors"] = run("classify", image_bytes=images,
                                      labels=spec["labels"])["scores"]

def describe(structure):
    return {k: [v.dtype.name, v.shape.as_list()] for k, v in structure.items()}

signatures = {name: {"inputs": describe(fn.structured_input_signature[1]),
                     "outputs": describe(fn.structured_outputs)}
              for name, fn in sigs.items()}
np.savez(out_path, **arrays)
print(json.dumps({"errors": errors, "signatures": signatures,
                  "keras_mm_imported": any(m.split(".")[0] == "keras_mm" for m in sys.modules)}))
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from keras_mm.beam_jobs import label_as_text

    out = str(tmp_path_factory.mktemp("export") / "digits")
    label_as_text.run(["--source", "digits", "--out", out, "--vocab_size", "400",
                       "--limit", "300"])
    return out


@pytest.fixture(scope="module")
def images(folder):
    """6 real digit PNGs (8x8) from the test split and a real JPEG photo (427x640)."""
    from sklearn import datasets as sk_datasets

    records = tf.data.TFRecordDataset(datasets.split_files(folder, "test")).take(6)
    spec = {"image/encoded": tf.io.FixedLenFeature([], tf.string)}
    pngs = [tf.io.parse_single_example(r, spec)["image/encoded"].numpy() for r in records]
    assert all(p.startswith(b"\x89PNG") for p in pngs)
    photo = os.path.join(os.path.dirname(sk_datasets.__file__), "images", "china.jpg")
    with open(photo, "rb") as f:
        return pngs + [f.read()]


@pytest.fixture(scope="module")
def templates(folder):
    from keras_mm.evaluation.zero_shot import load_eval_templates

    return load_eval_templates(folder)


@pytest.fixture(scope="module")
def tokenizer_path(folder):
    return os.path.join(folder, "tokenizer.model")


def build(tokenizer_path, loss, model_kwargs, seed):
    """(model, tokenizer). The tokenizer is made after seeding: tf.random.set_seed clears the
    eager kernel cache, which destroys the SentencePiece resource of an earlier tokenizer."""
    keras.utils.set_random_seed(seed)
    tokenizer = Tokenizer.from_file(tokenizer_path, max_len=MAX_LEN)
    return build_model(loss, model_kwargs, tokenizer.vocab_size), tokenizer


def build_model(loss, model_kwargs, vocab_size):
    image = ViTEncoder(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp_dim=128,
                       pool="map", output_dim=DIM)
    text = TextEncoder(vocab_size=vocab_size, max_len=MAX_LEN, width=64, depth=2, heads=2,
                       mlp_dim=128, pool="last", output_dim=DIM)
    return TwoTowerModel(image, text, loss=loss, **model_kwargs)


def l2(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def keras_reference(model, tokenizer, config, templates, images):
    """Keras-model outputs for the loader's inputs, classify recomputed with NumPy."""
    preprocess = datasets.eval_image_ops(config)
    pixels = tf.stack([preprocess({"image/encoded": tf.constant(b)})["image"] for b in images])
    image_emb = np.asarray(model.embed_image(pixels))                          # [N, D]
    text_emb = np.asarray(model.embed_text(tokenizer.tokenize(tf.constant(TEXTS))))
    prompts = [t.replace("{}", label) for label in LABELS for t in templates]
    prompt_emb = np.asarray(model.embed_text(tokenizer.tokenize(tf.constant(prompts))))
    prompt_emb = prompt_emb.astype(np.float64).reshape(len(LABELS), len(templates), -1)
    classes = l2(l2(prompt_emb).mean(axis=1))                                  # [K, D]
    cos = image_emb.astype(np.float64) @ classes.T                            # [N, K]
    scale = math.exp(float(model.logits.log_scale.numpy()))
    if model.loss_type == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-(scale * cos + float(model.logits.bias.numpy()))))
    else:
        scale = min(scale, 100.0)
        logits = scale * cos
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = e / e.sum(axis=1, keepdims=True)
    return {"embed_image": image_emb, "embed_text": text_emb, "classify": scores}


@pytest.fixture(scope="module", params=sorted(KINDS))
def exported(request, tmp_path_factory, tokenizer_path, templates, images):
    """(kind, model, config, export_dir, reference, loader output, loader arrays)."""
    loss, model_kwargs, config_kwargs = KINDS[request.param]
    config = datasets.InputConfig(image_size=32, max_text_len=MAX_LEN, **config_kwargs)
    seed = 1 + sorted(KINDS).index(request.param)
    model, tokenizer = build(tokenizer_path, loss, model_kwargs, seed)
    root = tmp_path_factory.mktemp(f"saved_models_{request.param}")
    export_dir = str(root / "two_tower" / "1")
    returned = export_lib.export_two_tower(model, tokenizer, config, templates, export_dir,
                                           class_names=LABELS)
    assert returned == export_dir
    reference = keras_reference(model, tokenizer, config, templates, images)

    spec_path, out_path = root / "spec.json", root / "out.npz"
    spec_path.write_text(json.dumps({
        "images": [base64.b64encode(b).decode() for b in images], "texts": TEXTS,
        "labels": LABELS, "not_image": base64.b64encode(NOT_AN_IMAGE).decode(),
        "truncated_png": base64.b64encode(TRUNCATED_PNG).decode()}))
    proc = subprocess.run([sys.executable, "-c", LOADER, export_dir, str(spec_path),
                           str(out_path)], capture_output=True, text=True, timeout=120,
                          cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    arrays = dict(np.load(out_path))
    return request.param, model, tokenizer, config, export_dir, reference, result, arrays


def test_fresh_process_outputs_equal_the_keras_model(exported, images):
    kind, _, _, _, _, reference, result, arrays = exported
    assert not result["keras_mm_imported"]
    n, k = len(images), len(LABELS)
    assert arrays["embed_image"].shape == (n, DIM)
    assert arrays["embed_text"].shape == (len(TEXTS), DIM)
    assert arrays["classify"].shape == (n, k)
    for name in ("embed_image", "embed_text", "classify"):
        assert arrays[name].dtype == np.float32, name
        np.testing.assert_allclose(arrays[name], reference[name], atol=1e-4, rtol=0,
                                   err_msg=f"{kind} {name}")
    np.testing.assert_allclose(np.linalg.norm(arrays["embed_image"], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(arrays["embed_text"], axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(arrays["serving_default"], arrays["classify"])
    # classify_classes: the class names' embeddings stored at export == classify on them.
    np.testing.assert_allclose(arrays["classify_classes"], reference["classify"], atol=1e-4,
                               rtol=0)
    best = reference["classify"].argmax(axis=1)
    np.testing.assert_array_equal(arrays["class_index"], best)
    assert list(arrays["class_name"]) == [LABELS[i] for i in best]
    # The scores say something (not all saturated), and softmax rows are distributions.
    assert arrays["classify"].std() > 1e-3
    if kind == "softmax":
        np.testing.assert_allclose(arrays["classify"].sum(axis=1), 1.0, atol=1e-5)


def test_bad_inputs_give_clear_errors_and_the_model_keeps_working(exported):
    _, _, _, _, _, _, result, arrays = exported
    errors = result["errors"]
    expected = {
        "not_image": "image_bytes[1] is not a JPEG/PNG/GIF/BMP image",
        "empty_image": "image_bytes[2] is empty",
        "classify_not_image": "image_bytes[0] is not a JPEG/PNG/GIF/BMP image",
        "empty_text": "text[1] is empty",
        "blank_text": "text[0] is empty (or only whitespace)",
        "empty_label": "labels[1] is empty",
        "no_labels": "labels is empty",
    }
    for case, needle in expected.items():
        kind, message = errors[case]
        assert kind == "InvalidArgumentError", (case, kind, message)
        assert needle in message, (case, message)
    # A PNG header over garbage passes the format check; TF's decoder rejects it (no crash).
    assert errors["truncated_png"][0] == "InvalidArgumentError", errors["truncated_png"]
    np.testing.assert_array_equal(arrays["embed_image_after_errors"], arrays["embed_image"])
    np.testing.assert_array_equal(arrays["classify_after_errors"], arrays["classify"])


def test_signatures_have_the_documented_names_and_dtypes(exported):
    _, _, _, _, _, _, result, _ = exported
    signatures = result["signatures"]
    assert set(signatures) == {"embed_image", "embed_text", "classify", "classify_classes",
                               "serving_default"}
    assert signatures["embed_image"] == {
        "inputs": {"image_bytes": ["string", [None]]},
        "outputs": {"embedding": ["float32", [None, DIM]]}}
    assert signatures["embed_text"] == {
        "inputs": {"text": ["string", [None]]},
        "outputs": {"embedding": ["float32", [None, DIM]]}}
    assert signatures["classify"] == {
        "inputs": {"image_bytes": ["string", [None]], "labels": ["string", [None]]},
        "outputs": {"scores": ["float32", [None, None]]}}
    assert signatures["serving_default"] == signatures["classify"]
    # Every input and output has the batch dimension first: TF Serving can batch it.
    assert signatures["classify_classes"] == {
        "inputs": {"image_bytes": ["string", [None]]},
        "outputs": {"scores": ["float32", [None, len(LABELS)]],
                    "class_index": ["int64", [None]], "class_name": ["string", [None]]}}


def test_export_info_and_warmup_requests(exported, templates):
    kind, model, tokenizer, config, export_dir, _, _, _ = exported
    info = export_lib.read_export_info(export_dir)
    assert info["model"] == "two_tower" and info["loss"] == kind
    assert info["image_size"] == 32 and info["max_len"] == MAX_LEN
    assert info["eval_mode"] == config.eval_mode and info["value_range"] == config.value_range
    assert info["templates"] == templates and info["embedding_dim"] == DIM
    assert info["vocab_size"] == tokenizer.vocab_size
    assert info["default_signature"] == "classify"
    assert info["signatures"]["classify"] == {
        "inputs": {"image_bytes": {"dtype": "string", "shape": [None]},
                   "labels": {"dtype": "string", "shape": [None]}},
        "outputs": {"scores": {"dtype": "float32", "shape": [None, None]}}}
    assert info["signatures"]["embed_text"]["outputs"] == {
        "embedding": {"dtype": "float32", "shape": [None, DIM]}}
    assert math.isclose(info["logit_scale"], float(model.logits.scale), rel_tol=1e-6)
    assert (info["logit_bias"] is None) == (kind == "softmax")
    # One warm-up request a signature, and they all run against the export.
    logs = warmup.read_warmup_requests(export_dir)
    names = sorted(log.predict_log.request.model_spec.signature_name for log in logs)
    assert names == ["classify", "classify_classes", "embed_image", "embed_text",
                     "serving_default"]
    assert info["class_names"] == LABELS
    assert info["signatures"]["classify_classes"]["outputs"]["scores"] == {
        "dtype": "float32", "shape": [None, len(LABELS)]}
    assert {log.predict_log.request.model_spec.name for log in logs} == {"two_tower"}
    # No staging folder is left next to the version.
    assert os.listdir(os.path.dirname(export_dir)) == ["1"]


def test_refuses_to_overwrite_and_rejects_bad_templates(tmp_path, tokenizer_path, templates):
    config = datasets.InputConfig(image_size=32, max_text_len=MAX_LEN, eval_mode="resize")
    model, tokenizer = build(tokenizer_path, "sigmoid", {}, seed=0)
    target = tmp_path / "m" / "1"
    target.mkdir(parents=True)
    (target / "saved_model.pb").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="not empty"):
        export_lib.export_two_tower(model, tokenizer, config, templates, str(target))
    assert (target / "saved_model.pb").read_bytes() == b"old"
    for bad in ([], ["no placeholder"], ["{} and {}"]):
        with pytest.raises(ValueError, match="template"):
            export_lib.export_two_tower(model, tokenizer, config, bad, str(tmp_path / "x" / "1"))
    assert not (tmp_path / "x" / "1").exists()
    # overwrite=True replaces the folder with a loadable export.
    export_lib.export_two_tower(model, tokenizer, config, templates, str(target),
                                warmup=False, overwrite=True)
    assert sorted(os.listdir(tmp_path / "m")) == ["1"]
    loaded = tf.saved_model.load(str(target))
    scores = loaded.signatures["classify"](image_bytes=tf.constant([warmup.sample_jpeg()]),
                                           labels=tf.constant(["one", "two"]))["scores"]
    assert scores.shape == (1, 2)
