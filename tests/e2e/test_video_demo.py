"""The video path through the CLI: kmm demo --model video (moving digits -> frame-average
baseline and TubeViT training -> retrieval on the 256-clip gallery and the motion probe for
both -> export with embed_video / embed_text -> embeddings from a fresh TF-only process equal
to the Keras model's), then kmm export of MV-GPT and kmm eval of the run."""

import json
import os

import pytest

from tests.e2e.test_demo import SHORT, SMALL_BATCH, _kmm


@pytest.mark.slow
def test_video_demo(tmp_path):
    out = tmp_path / "demo"
    result = _kmm("demo", "--model", "video", "--out", str(out), "--clips", "300,64,256",
                  *SHORT, *SMALL_BATCH, "--set", "eval.batch_size=64",
                  "--set", "eval.probe_max_train=256")
    assert "[5/5]" in result.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["model"] == "video_two_tower_softmax" and summary["train_steps"] == 20
    metrics = summary["metrics"]
    for name in ("retrieval_t2i_r1", "retrieval_i2t_r1", "motion_probe_top1",
                 "motion_probe_frame_average_top1", "frame_average_retrieval_t2i_r1"):
        assert 0.0 <= metrics[name] <= 1.0, name
    # a frame-averaging model's best: below 1, as some gallery captions have a time-reversed twin
    assert 0.5 < metrics["retrieval_t2i_r1_frame_average_ceiling"] < 1.0
    check = summary["export_check"]
    assert not check["keras_mm_imported"] and check["same_clips"]
    assert check["clips"] == 256
    assert check["max_abs_diff_video"] < 1e-4 and check["max_abs_diff_text"] < 1e-4
    assert check["canonical_t2v_r1_export"] == check["canonical_t2v_r1_keras"]
    info = json.load(open(os.path.join(summary["export_dir"], "assets.extra",
                                       "keras_mm_export.json")))
    assert set(info["signatures"]) == {"embed_video", "embed_text"}
    assert info["num_frames"] == 8 and info["model"] == "video_two_tower"
    # The baseline run is a run of its own (summary, checkpoints) next to the main one.
    baseline = json.load(open(out / "run_frame_average" / "summary.json"))
    assert baseline["model"] == "video_two_tower_frame_average_softmax"

    # MV-GPT on the same clips: train briefly, score the next utterance, export it.
    run = str(tmp_path / "mvgpt")
    trained = _kmm("train", "--recipe", "mvgpt_moving_digits", "--set",
                   f"data.folder={out / 'moving_digits'}", "--set", f"train.out_dir={run}",
                   *SHORT, *SMALL_BATCH, "--set", "eval.batch_size=64",
                   "--set", "eval.max_examples=64")
    assert "next_cider" in trained.stdout
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["model"] == "mvgpt" and summary["metrics"]["next_count"] == 64
    exported = _kmm("export", "--run", run, "--base_dir", str(tmp_path / "saved"))
    assert "next_utterance" in exported.stdout

    # MaMMUT video on the same clips: caption metrics of its generated captions.
    run = str(tmp_path / "mammut_video")
    trained = _kmm("train", "--recipe", "mammut_video_moving_digits", "--set",
                   f"data.folder={out / 'moving_digits'}", "--set", f"train.out_dir={run}",
                   *SHORT, *SMALL_BATCH, "--set", "eval.batch_size=64",
                   "--set", "eval.max_examples=64",
                   "--set", "eval.tasks=captioning")
    metrics = json.load(open(os.path.join(run, "summary.json")))["metrics"]
    assert {"cider", "bleu4", "meteor", "rouge_l"} <= set(metrics), trained.stdout[-2000:]
    assert os.listdir(os.path.join(run, "tensorboard", "eval"))      # sample captions
