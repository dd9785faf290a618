"""The captioner path through the CLI: kmm demo --model pali (digit scenes -> train -> caption
metrics + VQA -> export with the caption signature -> captions from a fresh TF-only process
equal to the Keras model's, real photos included)."""

import json
import os

import pytest

from tests.e2e.test_demo import SHORT, SMALL_BATCH, _kmm


@pytest.mark.slow
def test_pali_demo(tmp_path):
    out = tmp_path / "demo"
    result = _kmm("demo", "--model", "pali", "--out", str(out), "--scenes", "300,30,40",
                  *SHORT, *SMALL_BATCH, "--set", "eval.batch_size=40")
    assert "[5/5]" in result.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["model"] == "pali" and summary["train_steps"] == 20
    metrics = summary["metrics"]
    for name in ("cider", "bleu4", "meteor", "rouge_l", "vqa_accuracy"):
        assert name in metrics and metrics[name] >= 0.0, name
    assert 0.0 <= metrics["vqa_accuracy"] <= 1.0
    check = summary["export_check"]
    assert not check["keras_mm_imported"]
    assert check["same_as_keras"] == check["images"] > 64       # 64 scenes + the photos
    assert len(check["photo_captions"]) >= 10
    info = json.load(open(os.path.join(summary["export_dir"], "assets.extra",
                                       "keras_mm_export.json")))
    assert "caption" in info["signatures"] and "answer" in info["signatures"]
    # TensorBoard: the eval writes sample captions next to the scalars.
    events = os.listdir(out / "run" / "tensorboard" / "eval")
    assert events, "no caption samples in TensorBoard"
