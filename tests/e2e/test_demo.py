"""The whole user path through the CLI: kmm demo (data -> train -> eval -> export -> fresh-process
classification), then kmm eval and kmm export on its run folder, and a resumed kmm train."""

import json
import os
import subprocess
import sys

import pytest

SHORT = ["--set", "train.steps=20", "--set", "train.checkpoint_every=10",
         "--set", "train.steps_per_epoch=10",
         "--set", "train.log_every=10", "--set", "optimizer.warmup_steps=5"]
# 16 examples a step instead of the recipes' 64 (captioners, video): the path is the same, each
# step a quarter of the work (a step of 64 clips of 8 frames, or of 64 scenes through PaLI, took
# 1-2 s on 2 cores)
SMALL_BATCH = ["--set", "data.input.batch_size=16"]


def _kmm(*args, timeout=900):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-m", "keras_mm.cli", *args], capture_output=True,
                            text=True, timeout=timeout, env=env)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = _kmm("demo", "--out", str(out), *SHORT)
    return out, result


@pytest.mark.slow
def test_demo_writes_the_summary_contract(demo):
    out, result = demo
    assert "[5/5]" in result.stdout and "== kmm demo ==" in result.stdout
    summary = json.load(open(out / "summary.json"))
    assert set(summary) >= {"model", "preset", "train_seconds", "train_steps", "export_dir",
                            "metrics"}
    assert summary["model"] == "two_tower_sigmoid" and summary["preset"] == "tiny"
    assert summary["train_steps"] == 20 and summary["train_seconds"] > 0
    metrics = summary["metrics"]
    for name in ("zero_shot_top1", "zero_shot_top5", "retrieval_i2t_r1", "retrieval_t2i_r10"):
        assert 0.0 <= metrics[name] <= 1.0
    # The export, in a process without keras_mm, classifies like the Keras model.
    check = summary["export_check"]
    assert not check["keras_mm_imported"] and check["examples"] > 100
    assert abs(check["zero_shot_top1"] - metrics["zero_shot_top1"]) < 0.02
    assert os.path.exists(os.path.join(summary["export_dir"], "saved_model.pb"))
    assert os.path.exists(os.path.join(summary["export_dir"], "assets.extra",
                                       "tf_serving_warmup_requests"))
    assert os.listdir(out / "run" / "tensorboard")
    assert os.path.exists(out / "run" / "checkpoints" / "config.json")


@pytest.mark.slow
def test_eval_export_and_resumed_train_on_the_run(demo):
    out, _ = demo
    run = str(out / "run")
    evaluated = _kmm("eval", "--run", run, "--set", "eval.tasks=zero_shot,linear_probe,few_shot")
    for name in ("zero_shot_top1", "linear_probe_top1", "few_shot_1shot_top1",
                 "few_shot_10shot_top1"):
        assert f"metrics.{name}" in evaluated.stdout, name
    metrics = json.load(open(out / "run" / "summary.json"))["metrics"]
    assert 0.1 < metrics["linear_probe_top1"] <= 1.0   # 20 steps: above chance, not more
    # A first export is version 1 (the numbering after it: test_commands.py::test_next_version)
    exported = _kmm("export", "--run", run, "--base_dir", str(out / "exports"))
    assert os.path.exists(out / "exports" / "siglip_digits" / "1" / "saved_model.pb")
    assert "export_dir" in exported.stdout and "siglip_digits/1" in exported.stdout
    # Training the same run to 30 steps resumes from step 20 instead of starting over.
    # With eval.every_steps=5, the run evaluates at step 25 too (logged and in TensorBoard).
    resumed = _kmm("train", "--config", os.path.join(run, "checkpoints", "config.json"),
                   "--set", "train.steps=30", "--set", "eval.every_steps=5")
    logs = resumed.stdout + resumed.stderr
    assert "resuming from step 20 of 30" in logs
    assert "step 25 eval: " in logs and "step 20 eval" not in logs, logs[-3000:]
    assert json.load(open(out / "run" / "summary.json"))["train_steps"] == 30
    ckpts = sorted(os.listdir(out / "run" / "checkpoints"))
    assert "ckpt-00000030" in ckpts and "ckpt-00000020" in ckpts, ckpts


@pytest.mark.slow
def test_limoe_demo_reports_routing_and_exports(tmp_path):
    """kmm demo --model limoe: one sparse MoE transformer through the same path; the summary
    has the routing success per modality, the export serves it in a TF-only process."""
    out = tmp_path / "limoe"
    result = _kmm("demo", "--model", "limoe", "--out", str(out), *SHORT)
    assert "[5/5]" in result.stdout and "limoe_digits" in result.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["model"] == "limoe_sigmoid" and summary["train_steps"] == 20
    for name in ("routing_success_image", "routing_success_text", "zero_shot_top1"):
        assert 0.0 <= summary["metrics"][name] <= 1.0, name
    check = summary["export_check"]
    assert not check["keras_mm_imported"]
    assert abs(check["zero_shot_top1"] - summary["metrics"]["zero_shot_top1"]) < 0.02
    info = json.load(open(os.path.join(summary["export_dir"], "assets.extra",
                                       "keras_mm_export.json")))
    assert info["model"] == "limoe" and "classify_classes" in info["signatures"]
    for figure in ("routing_experts.png", "routing_success.png"):
        assert (out / "run" / figure).stat().st_size > 1000, figure


@pytest.mark.slow
def test_clippo_demo_renders_text_end_to_end(tmp_path):
    """kmm demo --model clippo: one ViT for digits and rendered captions; the export renders
    the labels in-graph in a TF-only process."""
    out = tmp_path / "clippo"
    result = _kmm("demo", "--model", "clippo", "--out", str(out), *SHORT)
    assert "[5/5]" in result.stdout and "clippo_digits" in result.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["model"] == "clippo_softmax" and summary["train_steps"] == 20
    assert 0.0 <= summary["metrics"]["zero_shot_top1"] <= 1.0
    check = summary["export_check"]
    assert not check["keras_mm_imported"] and check["examples"] > 100
    assert abs(check["zero_shot_top1"] - summary["metrics"]["zero_shot_top1"]) < 0.02
    info = json.load(open(os.path.join(summary["export_dir"], "assets.extra",
                                       "keras_mm_export.json")))
    assert info["model"] == "clippo" and info["renderer"]["max_chars"] > 40
